"""Job specs and ``strata run``: ``spec`` (the YAML's pydantic models), ``load`` (the bounded YAML
loader and validation), ``messages`` (one-line errors), ``checks`` (cross-field and model-depth
checks), ``plan`` (resolving a job, its version folder, the dry run), ``workspace`` (URLs, local
paths, the version folder's local mirror), ``run`` (executing the stages)."""

from .load import load_spec, parse_spec
from .messages import JobSpecError
from .plan import LATEST, Job, plan_job, resolve_job, version_id
from .run import add_run_arguments, build_indexes, cmd_run, read_latest, run_job
from .spec import JobSpec

__all__ = ["JobSpec", "JobSpecError", "Job", "load_spec", "parse_spec", "resolve_job", "plan_job", "run_job",
           "read_latest", "version_id", "add_run_arguments", "cmd_run", "build_indexes", "LATEST"]

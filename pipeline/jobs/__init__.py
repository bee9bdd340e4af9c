"""Job specs and ``strata run``: ``spec`` (the YAML's models and one-line errors), ``plan``
(resolving a job, its version folder, the dry run), ``run`` (executing the stages)."""

from .plan import LATEST, Job, plan_job, resolve_job, version_id
from .run import add_run_arguments, build_indexes, cmd_run, read_latest, run_job
from .spec import JobSpec, JobSpecError, load_spec, parse_spec

__all__ = ["JobSpec", "JobSpecError", "Job", "load_spec", "parse_spec", "resolve_job", "plan_job", "run_job",
           "read_latest", "version_id", "add_run_arguments", "cmd_run", "build_indexes", "LATEST"]

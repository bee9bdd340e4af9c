"""Job specs and ``strata run``: one YAML file -> embed (incremental) -> index -> evaluate -> report.

A job spec (``jobs/*.yaml``) is validated by the pydantic models below before anything runs;
an unknown key, a wrong type, an unknown pooling or a layer the model does not have is ONE
error line naming the file and the field (``jobs/x.yaml: variants.poolings[1]: ...``).

Relative local paths in a spec (input, output, evaluation data, a model directory) resolve
against the current working directory of ``strata run``, not the spec's folder: run jobs from
the project root (the examples in ``jobs/`` assume it).

What ``input`` says decides what a job does:

- ``input: {location: URL, text_column, id_column}``: a Parquet corpus (any fsspec URL) is
  embedded incrementally into a version of the job's output, then indexed and evaluated;
- ``input: {embeddings: URL}``: an existing output (a job folder, which follows its LATEST,
  a version folder, or any ``strata embed`` output): nothing is embedded; indexes and
  evaluations are made in that output, with its model and variants (index-only jobs);
- ``input: null``: no corpus; the job only evaluates the variants (a model comparison).

Output layout and versioning::

    {output}/{name}/
      LATEST               {"version": "v-…", …}: the last version whose whole job succeeded,
                           replaced atomically (write aside, then rename) only at the very end
      v-{hash}/            one folder per hash of (model name, weights digest, resolved variants,
                           max_length, dtype, normalize, format, text_column, id_column)
        version.json       the hashed settings, readable
        manifest.json, embeddings/   the corpus embeddings (pipeline.runner, incremental)
        indexes/           {variant}.faiss (+ .ids.parquet, .json), and _built.json: which
                           committed embedding files each index was built from
        eval-cache/        evaluation texts, embedded once by pipeline.evaluate (a strata output)
        eval/results.json  tidy rows, merged across runs
        report.md, heatmap_*.png
        job.json           the spec and summary of the last run into this version

The version is a content hash rather than a counter so that two machines (or a dry run and
the real run) name the same settings the same way without a shared counter to update, and
re-running an old spec finds its old version again instead of re-embedding everything. A
change of model or variants therefore lands in a new folder next to the old ones, which stay
complete and readable; a change of input shards, batch_tokens or resources does not (the
runner's incremental plan handles changed shards in place).

An index is rebuilt when the list of committed embedding files it was built from differs from
the manifest's (a shard embedded, changed or dropped — committed outputs get fresh folder
names), when its files are missing, or when its kind changed; otherwise it is left alone.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeFloat, PositiveInt,
                      PrivateAttr, ValidationError)

from .models import DEFAULT_MODEL
from .storage import Output, redact, safe_name, utc_now
from .variants import POOLINGS, SpecError, Variant, make_variants, parse_layers

LATEST = "LATEST"
VERSION_FILE = "version.json"
JOB_FILE = "job.json"
BUILT_FILE = "_built.json"
EVAL_CACHE = "eval-cache"
# Depths of the built-in aliases, so a spec's layers can be checked without loading anything.
KNOWN_DEPTHS = {"smollm2-135m": 30, "all-minilm-l6-v2": 6}
CHARS_PER_TOKEN_ESTIMATE = 4  # dry-run token estimate: uncompressed text bytes / 4


class JobSpecError(ValueError):
    """A job spec that cannot run; the message is one line: ``FILE: FIELD: what was expected``."""


class _Problem(Exception):
    """A cross-field problem found after pydantic validation: (field path, message)."""

    def __init__(self, loc: str, message: str):
        super().__init__(message)
        self.loc, self.message = loc, message


# --------------------------------------------------------------------------- field validators
def _is_url(text: str) -> bool:
    return "://" in text


def _check_name(name: str) -> str:
    if safe_name(name) != name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a safe directory name: use letters, digits, '.', '_' and '-' only, "
                         f"not starting with '.' (e.g. {safe_name(name)!r})")
    return name


def _normalize_layers(value: Any) -> Any:
    """A layer spec as one canonical string; its syntax checked against a very deep model."""
    if isinstance(value, bool) or not isinstance(value, (str, int, list)):
        raise ValueError(f"expected a layer spec (an integer, 'P%', 'a:b', 'all', or a list of them), "
                         f"got {type(value).__name__} {value!r}")
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ValueError(f"expected integers or strings in the layer list, got {item!r}")
    text = ",".join(str(i).strip() for i in items)
    try:
        parse_layers(text, 10**6)  # syntax only; the range is checked once the depth is known
    except SpecError as e:
        raise ValueError(str(e)) from None
    return text


def _expand_poolings(value: Any) -> Any:
    if value == "all":
        return list(POOLINGS)
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return value


def _check_pooling(name: str) -> str:
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r} (choose from {', '.join(POOLINGS)})")
    return name


def _check_variant(name: str) -> str:
    try:
        Variant.parse(name)
    except SpecError as e:
        raise ValueError(str(e)) from None
    return name


def _all_to_none(value: Any) -> Any:
    return None if value == "all" else value


def _input_shorthand(value: Any) -> Any:
    return {"location": value} if isinstance(value, str) else value


def _model_shorthand(value: Any) -> Any:
    return {"spec": value} if isinstance(value, str) else value


def _check_local_path(value: str) -> str:
    if _is_url(value) and not value.startswith("file://"):
        raise ValueError(f"evaluation data is read from local disk; got the URL {value!r}")
    return value


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


PoolingName = Annotated[str, AfterValidator(_check_pooling)]
VariantName = Annotated[str, AfterValidator(_check_variant)]
LocalPath = Annotated[str, AfterValidator(_non_empty), AfterValidator(_check_local_path)]
Location = Annotated[str, AfterValidator(_non_empty)]


# --------------------------------------------------------------------------- the spec
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InputSpec(_Section):
    """Exactly one of ``location`` (a Parquet corpus) or ``embeddings`` (an existing output)."""

    location: Location | None = None
    text_column: str = "text"
    id_column: str | None = None
    embeddings: Location | None = None


class ModelSpec(_Section):
    spec: Annotated[str, AfterValidator(_non_empty)] = DEFAULT_MODEL
    trust_remote_code: bool = False
    allow_pickle: bool = False


class VariantsSpec(_Section):
    layers: Annotated[str, BeforeValidator(_normalize_layers)] = "-1"
    poolings: Annotated[list[PoolingName], BeforeValidator(_expand_poolings), Field(min_length=1)] = ["mean"]


class EmbeddingSpec(_Section):
    max_length: PositiveInt = 512
    dtype: Literal["float32", "float16"] = "float32"
    normalize: bool = False
    batch_tokens: PositiveInt | None = None  # None: the encoder's default for the device
    format: Literal["parquet", "arrow"] = "parquet"


class ResourcesSpec(_Section):
    actors: PositiveInt | None = None
    gpus_per_actor: NonNegativeFloat | None = None
    ray_address: str | None = None


class IndexSpec(_Section):
    variants: Annotated[list[VariantName] | None, BeforeValidator(_all_to_none)] = None  # None = all
    kind: Literal["auto", "flat", "hnsw", "ivfpq"] = "auto"


class StsEval(_Section):
    task: Literal["sts"]
    data: LocalPath


class RetrievalEval(_Section):
    task: Literal["retrieval"]
    data: LocalPath
    split: str = "test"
    max_queries: PositiveInt | None = None
    max_docs: PositiveInt | None = None


Evaluation = Annotated[StsEval | RetrievalEval, Field(discriminator="task")]


class JobSpec(_Section):
    name: Annotated[str, AfterValidator(_check_name)]
    # required; null = evaluation only; a bare string is shorthand for {location: ...}
    input: Annotated[InputSpec | None, BeforeValidator(_input_shorthand)]
    model: Annotated[ModelSpec, BeforeValidator(_model_shorthand)] = Field(default_factory=ModelSpec)
    variants: VariantsSpec = Field(default_factory=VariantsSpec)
    output: Location | None = None
    embedding: EmbeddingSpec = Field(default_factory=EmbeddingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    indexes: IndexSpec | None = None
    evaluations: list[Evaluation] = Field(default_factory=list)
    report: bool | None = None  # default: true when there are evaluations

    _source: str = PrivateAttr(default="<spec>")

    @property
    def source(self) -> str:
        return self._source

    @property
    def mode(self) -> str:
        """'corpus' (embed a Parquet corpus), 'existing' (an existing output) or 'eval-only'."""
        if self.input is None:
            return "eval-only"
        return "existing" if self.input.embeddings is not None else "corpus"

    @property
    def wants_report(self) -> bool:
        return bool(self.evaluations) if self.report is None else self.report


# --------------------------------------------------------------------------- loading
def _loc_text(loc: tuple, data: Any) -> str:
    """('variants', 'poolings', 1) -> 'variants.poolings[1]'; union tags pydantic inserts are dropped."""
    out, node = "", data
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        last = i == len(loc) - 1
        if not last and not (isinstance(node, dict) and part in node):
            continue  # a tag such as 'retrieval' in ('evaluations', 0, 'retrieval', 'split')
        out += f".{part}" if out else str(part)
        node = node.get(part) if isinstance(node, dict) else None
    return out or "(top level)"


_SECTIONS: dict[str, type[BaseModel]] = {"input": InputSpec, "model": ModelSpec, "variants": VariantsSpec,
                                          "embedding": EmbeddingSpec, "resources": ResourcesSpec,
                                          "indexes": IndexSpec}
_TASKS: dict[str, type[BaseModel]] = {"sts": StsEval, "retrieval": RetrievalEval}


def _section_fields(loc: tuple, data: Any) -> list[str]:
    """Allowed keys of the section in which an unknown key was found."""
    section: Any = JobSpec
    node = data
    for part in loc[:-1]:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if section == "evaluations":
                task = node.get("task") if isinstance(node, dict) else None
                section = _TASKS.get(task) or "evaluation"
            continue
        if not (isinstance(node, dict) and part in node):
            continue  # a union tag pydantic put in the path
        node = node[part]
        section = "evaluations" if part == "evaluations" else _SECTIONS.get(part)
    if section == "evaluation":
        return sorted(set(StsEval.model_fields) | set(RetrievalEval.model_fields))
    return list(section.model_fields) if isinstance(section, type) else []


_MISSING_HINTS = {
    ("input",): ": input.location (a Parquet corpus to embed), input.embeddings (an existing output to index or "
                "evaluate), or `input: null` for an evaluation-only job",
    ("name",): ": a name for the job; it names the folder {output}/{name}",
    ("data",): ": the evaluation data (an STS pairs file, or a BEIR folder for retrieval)",
    ("task",): ": 'sts' or 'retrieval'",
}


def _describe(err: dict, data: Any) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        return "missing (required)" + _MISSING_HINTS.get(tuple(p for p in err["loc"] if isinstance(p, str))[-1:], "")
    if kind == "extra_forbidden":
        key = err["loc"][-1]
        allowed = _section_fields(err["loc"], data)
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key ({hint}expected one of: {', '.join(allowed)})" if allowed else "unknown key"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "literal_error":
        return f"{value!r} is not allowed (choose from {ctx.get('expected')})"
    if kind == "union_tag_invalid":
        return f"unknown task {ctx.get('tag')!r} (choose from {ctx.get('expected_tags')})"
    if kind == "union_tag_not_found":
        return "missing 'task' (choose from 'sts', 'retrieval')"
    expected = {"int_type": "an integer", "int_parsing": "an integer", "float_type": "a number",
                "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
                "dict_type": "a mapping", "model_type": "a mapping", "greater_than": f"a number > {ctx.get('gt')}",
                "greater_than_equal": f"a number >= {ctx.get('ge')}", "too_short": "at least one item"}.get(kind)
    if expected:
        return f"expected {expected}, got {type(value).__name__} {value!r}" if kind != "too_short" else \
            f"expected {expected}"
    return f"{err['msg']} (got {value!r})"


def _line(source: str, loc: str, message: str, more: int = 0) -> str:
    extra = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
    return f"{source}: {loc}: {message}{extra}".replace("\n", " ")


def parse_spec(data: Any, source: str = "<spec>", *, check_model: bool = True) -> JobSpec:
    """Validate already-parsed YAML; raises JobSpecError with one line."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise JobSpecError(f"{source}: expected a mapping of job settings (name, input, ...), got {got}")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        loc, message = _loc_text(errs[0]["loc"], data), _describe(errs[0], data)
        raise JobSpecError(_line(source, loc, message, len(errs) - 1)) from None
    spec._source = source
    try:
        _cross_checks(spec)
        if check_model:
            depth = model_depth(spec.model.spec, trust_remote_code=spec.model.trust_remote_code) \
                if spec.mode != "existing" else None
            if depth is not None:
                check_variants(spec, depth)
    except _Problem as p:
        raise JobSpecError(_line(source, p.loc, p.message)) from None
    return spec


def load_spec(path: str | os.PathLike, *, check_model: bool = True) -> JobSpec:
    """Read and validate a job spec file.

    ``check_model`` also checks the layers against the model's depth when that is cheap to
    know (a built-in alias, or a model directory's config.json); otherwise at run start.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobSpecError(f"{source}: job spec not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JobSpecError(f"{source}: cannot read the job spec ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(top level)"
        problem = getattr(e, "problem", None) or str(e)
        raise JobSpecError(_line(source, where, f"invalid YAML: {problem}")) from None
    return parse_spec(data, source, check_model=check_model)


def _cross_checks(spec: JobSpec) -> None:
    inp = spec.input
    if inp is not None:
        if inp.location is None and inp.embeddings is None:
            raise _Problem("input", "give location (a Parquet corpus to embed) or embeddings (an existing "
                                    "output to index or evaluate); or write `input: null` for an evaluation-only job")
        if inp.location is not None and inp.embeddings is not None:
            raise _Problem("input", "give location (a corpus to embed) or embeddings (an existing output), not both")
        if inp.embeddings is not None:
            extra = sorted(inp.model_fields_set - {"embeddings"})
            if extra:
                raise _Problem(f"input.{extra[0]}", "not used with input.embeddings (the existing output's "
                                                    "manifest says how it was made)")
    if spec.mode == "existing":
        for key in ("output", "variants", "embedding"):
            if key in spec.model_fields_set:
                raise _Problem(key, "not allowed with input.embeddings: the existing output's manifest fixes the "
                                    "model, variants and settings, and indexes/results are written into it")
        if "spec" in spec.model.model_fields_set:
            raise _Problem("model.spec", "not allowed with input.embeddings: the model is read from the existing "
                                         "output's manifest")
    elif spec.output is None:
        raise _Problem("output", "missing (required): where the job writes {output}/{name}/v-…")
    if spec.mode == "eval-only":
        if spec.indexes is not None:
            raise _Problem("indexes", "`input: null` means evaluation only: there is no corpus to index")
        if not spec.evaluations:
            raise _Problem("evaluations", "`input: null` (evaluation only) needs at least one evaluation")
    if spec.report and not spec.evaluations:
        raise _Problem("report", "true needs at least one evaluation to report on")
    if spec.mode == "existing" and spec.indexes is None and not spec.evaluations:
        raise _Problem("indexes", "an input.embeddings job has nothing to do without indexes or evaluations")


def check_variants(spec: JobSpec, depth: int) -> list[Variant]:
    """The spec's variant grid for a model of ``depth`` blocks; layer and index names checked."""
    try:
        variants = make_variants(spec.variants.layers, spec.variants.poolings, depth)
    except SpecError as e:
        raise _Problem("variants.layers", f"{e} (model {spec.model.spec})") from None
    if spec.indexes and spec.indexes.variants:
        names = [v.name for v in variants]
        for i, name in enumerate(spec.indexes.variants):
            if name not in names:
                raise _Problem(f"indexes.variants[{i}]", f"{name} is not one of the job's variants "
                                                         f"({_short_list(names)})")
    return variants


def _short_list(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", … ({len(items)} in all)" if len(items) > n else "")


def model_depth(spec: str, *, trust_remote_code: bool = False, load: bool = False) -> int | None:
    """Number of blocks of a model when cheap to know (alias table, a directory's config.json).

    With ``load``, anything else is resolved too (a GGUF file is converted once into the cache).
    """
    if spec in KNOWN_DEPTHS:
        return KNOWN_DEPTHS[spec]
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        try:
            n = json.loads((p / "config.json").read_text()).get("num_hidden_layers")
            if isinstance(n, int):
                return n
        except (OSError, ValueError):
            pass
    if not load:
        return None
    from transformers import AutoConfig

    from . import models

    where = models.materialize(models.resolve(_model_ref(spec)))
    return int(AutoConfig.from_pretrained(str(where), trust_remote_code=trust_remote_code).num_hidden_layers)


# --------------------------------------------------------------------------- resolving a job
def _local(url: str) -> str:
    """A relative local path made absolute against the working directory (Ray workers may run elsewhere)."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    return url if _is_url(url) else os.path.abspath(os.path.expanduser(url))


def _model_ref(spec: str) -> str:
    p = Path(spec).expanduser()
    return str(p.resolve()) if (p.exists() and spec not in KNOWN_DEPTHS) else spec


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _is_local_fs(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


@dataclass
class Job:
    """A validated spec with everything resolved that the run and the dry run need."""

    spec: JobSpec
    model_ref: str
    n_layers: int | None
    variants: list[str]
    settings: dict  # max_length, dtype, normalize, format, batch_tokens
    trust_remote_code: bool = False
    allow_pickle: bool = False
    weights_digest: str | None = None
    job_url: str | None = None  # {output}/{name}; None for input.embeddings jobs
    version: str | None = None
    version_url: str = ""
    version_key: dict = field(default_factory=dict)

    @property
    def layers_arg(self) -> str:
        return ",".join(str(v) for v in sorted({Variant.parse(n).layer for n in self.variants}))

    @property
    def poolings_arg(self) -> str:
        return ",".join(dict.fromkeys(Variant.parse(n).pooling for n in self.variants))

    def embed_options(self, progress: bool) -> dict:
        r = self.spec.resources
        return dict(model=self.model_ref, layers=self.layers_arg, poolings=self.poolings_arg,
                    max_length=self.settings["max_length"], dtype=self.settings["dtype"],
                    normalize=self.settings["normalize"], batch_tokens=self.settings["batch_tokens"],
                    output_format=self.settings["format"], actors=r.actors, gpus_per_actor=r.gpus_per_actor,
                    ray_address=r.ray_address, progress=progress, trust_remote_code=self.trust_remote_code,
                    allow_pickle=self.allow_pickle)


def version_id(key: dict) -> str:
    blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
    return "v-" + hashlib.sha256(blob).hexdigest()[:12]


def resolve_job(spec: JobSpec) -> Job:
    """Resolve the model (digest, depth), the variants and the version folder of a job."""
    from . import models

    try:
        if spec.mode == "existing":
            return _resolve_existing(spec)
        ref = _model_ref(spec.model.spec)
        depth = model_depth(ref, trust_remote_code=spec.model.trust_remote_code, load=True)
        variants = [v.name for v in check_variants(spec, depth)]
        digest = models.weights_digest(models.resolve(ref))
    except _Problem as p:
        raise JobSpecError(_line(spec.source, p.loc, p.message)) from None
    except (models.ModelError, OSError) as e:
        raise JobSpecError(_line(spec.source, "model.spec", str(e))) from None
    e, inp = spec.embedding, spec.input or InputSpec()
    key = {"model": ref, "weights_digest": digest, "variants": variants, "max_length": e.max_length,
           "dtype": e.dtype, "normalize": e.normalize, "format": e.format, "text_column": inp.text_column,
           "id_column": inp.id_column}
    job_url = _join(_local(spec.output), spec.name)
    version = version_id(key)
    return Job(spec=spec, model_ref=ref, n_layers=depth, variants=variants,
               settings={"max_length": e.max_length, "dtype": e.dtype, "normalize": e.normalize,
                         "format": e.format, "batch_tokens": e.batch_tokens},
               trust_remote_code=spec.model.trust_remote_code, allow_pickle=spec.model.allow_pickle,
               weights_digest=digest, job_url=job_url, version=version, version_url=_join(job_url, version),
               version_key=key)


def _resolve_existing(spec: JobSpec) -> Job:
    url = _local(spec.input.embeddings)
    out = Output(url)
    manifest = out.read_manifest()
    if manifest is None:
        latest = out.read_json(LATEST)
        if latest is None:
            raise _Problem("input.embeddings", f"no strata output at {redact(url)} (neither manifest.json nor "
                                               f"{LATEST} found)")
        url = _join(url, latest["version"])
        manifest = Output(url).read_manifest()
        if manifest is None:
            raise _Problem("input.embeddings", f"{LATEST} points to {redact(url)}, which has no manifest.json")
    sig = manifest.get("signature", {})
    variants = [v["name"] for v in manifest.get("variants", [])]
    if not variants:
        raise _Problem("input.embeddings", f"the manifest at {redact(url)} lists no variants")
    if spec.indexes and spec.indexes.variants:
        for i, name in enumerate(spec.indexes.variants):
            if name not in variants:
                raise _Problem(f"indexes.variants[{i}]", f"{name} is not in the existing output "
                                                         f"({_short_list(variants)})")
    ref = sig.get("model") or manifest.get("model", {}).get("name")
    depth = model_depth(ref, trust_remote_code=spec.model.trust_remote_code) if ref else None
    settings = {k: sig.get(k, d) for k, d in (("max_length", 512), ("dtype", "float32"), ("normalize", False),
                                               ("format", "parquet"))}
    settings["batch_tokens"] = EmbeddingSpec().batch_tokens
    return Job(spec=spec, model_ref=ref, n_layers=depth, variants=variants, settings=settings,
               trust_remote_code=spec.model.trust_remote_code, allow_pickle=spec.model.allow_pickle,
               weights_digest=sig.get("weights_digest"), version=url.rstrip("/").rsplit("/", 1)[-1],
               version_url=url, version_key={})


def _preflight(job: Job) -> None:
    """Problems that would otherwise surface only after the (expensive) embedding."""
    for i, ev in enumerate(job.spec.evaluations):
        p = Path(_local(ev.data))
        if ev.task == "sts" and not p.is_file():
            raise JobSpecError(_line(job.spec.source, f"evaluations[{i}].data", f"{ev.data}: file not found "
                                     f"(relative paths resolve against {os.getcwd()})"))
        if ev.task == "retrieval" and not (p / "qrels" / f"{ev.split}.tsv").is_file():
            raise JobSpecError(_line(job.spec.source, f"evaluations[{i}].data",
                                     f"{ev.data}: not a BEIR folder with qrels/{ev.split}.tsv "
                                     f"(relative paths resolve against {os.getcwd()})"))


# --------------------------------------------------------------------------- workspace
class _Workspace:
    """A version folder. Local: used in place. Remote (s3://, gs://, …): pipeline.index, evaluate and
    report need local paths, so they work in a local mirror under the strata cache and the files
    they write are uploaded afterwards."""

    def __init__(self, url: str, name: str, version: str):
        from .models import cache_root

        self.out = Output(url)
        self.is_local = _is_local_fs(self.out.fs)
        self.dir = Path(self.out.root) if self.is_local else cache_root() / "jobs" / safe_name(name) / version

    def fetch(self, rel: str, *, refresh: bool = False) -> Path | None:
        """A local copy of ``rel``, or None if it does not exist. Committed embedding files never change
        (a changed shard gets a new folder), so a mirrored copy is reused unless ``refresh``."""
        local = self.dir / rel
        if self.is_local:
            return local if local.exists() else None
        if not self.out.fs.exists(self.out.path(rel)):
            local.unlink(missing_ok=True)
            return None
        if refresh or not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(local.name + ".part")
            self.out.fs.get(self.out.path(rel), str(tmp))
            os.replace(tmp, local)
        return local

    def push(self, *rels: str) -> None:
        if self.is_local:
            return
        for rel in rels:
            self.out.fs.makedirs(self.out.path(*rel.split("/")[:-1]), exist_ok=True)
            self.out.fs.put(str(self.dir / rel), self.out.path(rel))

    def exists(self, rel: str) -> bool:
        return self.out.fs.exists(self.out.path(rel))


# --------------------------------------------------------------------------- indexes
def _index_files(manifest: dict) -> list[str]:
    """Committed embedding files relative to the output root, in the order indexes add them."""
    return [f"{s['output']}/{f}" for s in sorted(manifest.get("shards", []), key=lambda s: s["path"])
            for f in s["files"]]


def _index_targets(job: Job) -> list[str]:
    if job.spec.indexes is None:
        return []
    return list(job.spec.indexes.variants or job.variants)


def index_status(job: Job, manifest: dict | None) -> tuple[list[str], list[str]]:
    """(variants whose index must be (re)built, variants whose index is up to date)."""
    targets = _index_targets(job)
    if not targets:
        return [], []
    out = Output(job.version_url)
    built = out.read_json(f"indexes/{BUILT_FILE}") or {}
    files = _index_files(manifest or {})
    kind = job.spec.indexes.kind
    stale, fresh = [], []
    for name in targets:
        rec = built.get(name)
        present = all(out.fs.exists(out.path("indexes", name + suffix))
                      for suffix in (".faiss", ".ids.parquet", ".json"))
        ok = present and rec is not None and rec.get("files") == files and rec.get("kind") == kind
        (fresh if ok else stale).append(name)
    return stale, fresh


def build_indexes(job: Job, ws: _Workspace, names: list[str], manifest: dict, say) -> list[dict]:
    from .index import build_index

    files = _index_files(manifest)
    if not files:
        raise JobSpecError(f"{job.spec.source}: indexes: the output {redact(job.version_url)} has no committed "
                           "embeddings to index")
    local_files = [ws.fetch(f) for f in files]
    if any(p is None for p in local_files):
        missing = files[[p is None for p in local_files].index(True)]
        raise FileNotFoundError(f"{redact(job.version_url)}/{missing}: listed in the manifest but missing")
    built = ws.out.read_json(f"indexes/{BUILT_FILE}") or {}
    done = []
    for name in names:
        t0 = time.perf_counter()
        params = build_index(local_files, Variant.parse(name).column, ws.dir / "indexes" / f"{name}.faiss",
                             job.spec.indexes.kind)
        ws.push(*(f"indexes/{name}{s}" for s in (".faiss", ".ids.parquet", ".json")))
        built[name] = {"files": files, "kind": job.spec.indexes.kind, "built_kind": params["kind"],
                       "rows": params["rows"], "built_at": utc_now()}
        ws.out.write_json(f"indexes/{BUILT_FILE}", built)  # after the index: a crash leaves it stale, not wrong
        done.append({"variant": name, "kind": params["kind"], "rows": params["rows"],
                     "seconds": round(time.perf_counter() - t0, 3)})
        say(f"  index {name}: {params['kind']}, {params['rows']:,} vectors")
    if not ws.is_local:
        shutil.rmtree(ws.dir / "embeddings", ignore_errors=True)  # downloaded only to build from
    return done


# --------------------------------------------------------------------------- evaluations
def run_evaluations(job: Job, ws: _Workspace, progress: bool, say) -> list[dict]:
    from .evaluate import eval_retrieval, eval_sts, merge_results

    cache = ws.dir / EVAL_CACHE
    options = job.embed_options(progress)
    rows: list[dict] = []
    for ev in job.spec.evaluations:
        t0 = time.perf_counter()
        if ev.task == "sts":
            got = eval_sts(_local(ev.data), cache, **options)
        else:
            got = eval_retrieval(_local(ev.data), cache, split=ev.split, max_queries=ev.max_queries,
                                 max_docs=ev.max_docs, **options)
        rows += got
        say(f"  eval {ev.task} {ev.data}: {len(got)} rows in {time.perf_counter() - t0:.1f}s")
    ws.fetch("eval/results.json", refresh=True)  # merge with what earlier runs wrote
    merged = merge_results(ws.dir, rows)  # rows of earlier runs stay unless replaced by the same key
    ws.push("eval/results.json")
    return merged


def _best_lines(rows: list[dict], n_layers: int | None) -> list[str]:
    from .report import best_variants

    lines = []
    for label, b in best_variants(rows, n_layers).items():
        gain = "" if b["gain"] is None else f" (default {b['default']} {b['default_score']:.2f}, {b['gain']:+.2f})"
        lines.append(f"  best on {label}: {b['variant']} {b['metric']} = {b['score']:.2f}{gain}")
    return lines


# --------------------------------------------------------------------------- dry run
def _text_bytes(fs, path: str, column: str) -> int:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    if column not in names:
        return 0
    j = names.index(column)
    return sum(meta.row_group(i).column(j).total_uncompressed_size for i in range(meta.num_row_groups))


def plan_job(job: Job) -> dict:
    """What ``run_job`` would do; reads the input's footers and the existing manifest, writes nothing."""
    from .runner import inspect_shards, list_shards, plan

    spec = job.spec
    plan_d: dict[str, Any] = {"job": spec.name, "spec": spec.source, "mode": spec.mode, "model": job.model_ref,
                              "weights_digest": job.weights_digest, "n_layers": job.n_layers,
                              "variants": job.variants, "version": job.version,
                              "version_path": redact(job.version_url), "dry_run": True}
    out = Output(job.version_url)
    if job.job_url:
        latest = Output(job.job_url).read_json(LATEST)
        plan_d["latest"] = latest["version"] if latest else None
        plan_d["version_exists"] = out.fs.exists(out.path(VERSION_FILE))
    manifest = out.read_manifest()
    if spec.mode == "corpus":
        fs, shards = list_shards(_local(spec.input.location))
        inspect_shards(fs, shards, spec.input.text_column, spec.input.id_column)
        todo, keep, drop = plan(manifest, shards)
        known = {e["rel"] for e in (manifest or {}).get("shards", [])}
        unreadable = [s for s in todo if s.error]
        todo = [s for s in todo if not s.error]
        text_bytes = sum(_text_bytes(fs, s.path, spec.input.text_column) for s in todo)
        plan_d["shards"] = {
            "total": len(shards),
            "embed": [{"shard": s.rel, "rows": s.rows, "why": "changed" if s.rel in known else "new"} for s in todo],
            "skip": [e["rel"] for e in keep], "drop": [e["rel"] for e in drop],
            "unreadable": {s.rel: s.error for s in unreadable},
        }
        plan_d["rows_to_embed"] = sum(s.rows for s in todo)
        plan_d["estimated_tokens"] = text_bytes // CHARS_PER_TOKEN_ESTIMATE
    if spec.indexes is not None:
        if plan_d.get("shards", {}).get("embed") or plan_d.get("shards", {}).get("drop"):
            # every index covers every shard: any embedded or dropped shard touches all of them
            plan_d["indexes"] = {"build": _index_targets(job), "up_to_date": []}
        else:
            stale, fresh = index_status(job, manifest)
            plan_d["indexes"] = {"build": stale, "up_to_date": fresh}
    plan_d["evaluations"] = _eval_plan(job)
    plan_d["report"] = spec.wants_report
    return plan_d


def _eval_plan(job: Job) -> list[dict]:
    """Per evaluation: its texts, how many the evaluation cache lacks, and their estimated tokens."""
    from .evaldata import load_beir, load_sts
    from .evaluate import text_id

    ws = _Workspace(job.version_url, job.spec.name, job.version or "")
    cache = Output(str(ws.dir / EVAL_CACHE))
    cached: set[str] = set()
    if cache.read_manifest():
        cached = set(cache.read_table(["id"]).column("id").to_pylist())
    out = []
    for ev in job.spec.evaluations:
        if ev.task == "sts":
            d = load_sts(_local(ev.data))
            texts = d.sentence1 + d.sentence2
        else:
            d = load_beir(_local(ev.data), split=ev.split)
            if ev.max_queries or ev.max_docs:
                d = d.subset(ev.max_queries or len(d.query_ids), ev.max_docs)
            texts = d.doc_texts + d.query_texts
        unique = {text_id(t): t for t in texts}
        missing = [t for i, t in unique.items() if i not in cached]
        out.append({**ev.model_dump(), "texts": len(unique), "to_embed": len(missing),
                    "estimated_tokens": sum(len(t.encode()) for t in missing) // CHARS_PER_TOKEN_ESTIMATE})
    return out


def _print_plan(p: dict, say) -> None:
    say(f"job {p['job']} ({p['spec']}): DRY RUN, nothing is embedded or written")
    say(f"  model: {p['model']} ({p['weights_digest'] or 'digest unknown'}, {p['n_layers'] or '?'} layers)")
    say(f"  variants ({len(p['variants'])}): {_short_list(p['variants'], 12)}")
    if p["mode"] == "existing":
        say(f"  existing output: {p['version_path']} (nothing to embed)")
    else:
        if p.get("version_exists"):
            state = "existing version" + (", the current LATEST" if p.get("latest") == p["version"] else "")
        else:
            state = "NEW version" + (f"; LATEST is {p['latest']} and stays until this job succeeds"
                                     if p.get("latest") else "")
        say(f"  version: {p['version']} at {p['version_path']} ({state})")
    if "shards" in p:
        s = p["shards"]
        say(f"  input: {s['total']} shard(s): embed {len(s['embed'])}, skip {len(s['skip'])}, drop {len(s['drop'])}"
            + (f", unreadable {len(s['unreadable'])}" if s["unreadable"] else ""))
        for e in s["embed"]:
            say(f"    embed {e['shard']} ({e['rows']:,} rows, {e['why']})")
        for rel in s["drop"]:
            say(f"    drop  {rel} (no longer in the input)")
        for rel, err in s["unreadable"].items():
            say(f"    unreadable {rel}: {err}")
        say(f"  estimated tokens to embed: ~{p['estimated_tokens']:,} (an estimate: uncompressed text bytes / "
            f"{CHARS_PER_TOKEN_ESTIMATE}) in {p['rows_to_embed']:,} rows")
    if "indexes" in p:
        ix = p["indexes"]
        say(f"  indexes to (re)build: {_short_list(ix['build']) or 'none'}; up to date: "
            f"{_short_list(ix['up_to_date']) or 'none'}")
    for ev in p["evaluations"]:
        say(f"  evaluate: {ev['task']} on {ev['data']}: {ev['texts']:,} unique texts, {ev['to_embed']:,} not in "
            f"{EVAL_CACHE}/ yet (~{ev['estimated_tokens']:,} tokens, estimated)")
    if p["report"]:
        say(f"  report: {p['version_path']}/report.md")
    if p["mode"] != "existing":
        say(f"  then {LATEST} -> {p['version']}")


# --------------------------------------------------------------------------- run
def run_job(spec_path: str | os.PathLike, dry_run: bool = False, *, progress: bool = True,
            stream: TextIO | None = None) -> dict:
    """Run a job spec: embed (incremental) -> index -> evaluate -> report -> LATEST; returns a summary.

    With ``dry_run`` nothing is embedded or written: the plan is printed and returned.
    """
    stream = stream or sys.stdout

    def say(line: str) -> None:
        print(line, file=stream, flush=True)

    spec = load_spec(spec_path)
    job = resolve_job(spec)
    _preflight(job)
    if dry_run:
        p = plan_job(job)
        _print_plan(p, say)
        return p

    t0 = time.perf_counter()
    summary: dict[str, Any] = {"job": spec.name, "spec": spec.source, "mode": spec.mode, "model": job.model_ref,
                               "variants": job.variants, "version": job.version,
                               "version_path": redact(job.version_url), "embed": None,
                               "indexes": {"built": [], "up_to_date": []}, "evaluations": 0, "report": None}
    ws = _Workspace(job.version_url, spec.name, job.version)
    latest = Output(job.job_url).read_json(LATEST) if job.job_url else None
    if job.job_url:
        summary["new_version"] = not ws.exists(VERSION_FILE)
        summary["previous_latest"] = latest["version"] if latest else None
        say(f"job {spec.name}: version {job.version} at {redact(job.version_url)}"
            + (" (new)" if summary["new_version"] else ""))
        if summary["new_version"]:
            ws.out.write_json(VERSION_FILE, {"version": job.version, "key": job.version_key, "job": spec.name,
                                               "created_at": utc_now()})
    else:
        say(f"job {spec.name}: existing output {redact(job.version_url)}")

    changed = False
    if spec.mode == "corpus":
        from .runner import embed

        opts = job.embed_options(progress)
        es = embed(_local(spec.input.location), job.version_url, text_column=spec.input.text_column,
                   id_column=spec.input.id_column, **opts)
        summary["embed"] = es.as_dict()
        changed = bool(es.shards_embedded or es.shards_dropped)
        say(f"  embed: {es.line()}")

    if spec.indexes is not None:
        manifest = ws.out.read_manifest() or {}
        # every index covers every shard: after a change all are stale (the file check would say so too)
        stale, fresh = (_index_targets(job), []) if changed else index_status(job, manifest)
        summary["indexes"] = {"built": build_indexes(job, ws, stale, manifest, say) if stale else [],
                              "up_to_date": fresh}
        if fresh:
            say(f"  indexes up to date: {_short_list(fresh)}")

    if spec.evaluations:
        rows = run_evaluations(job, ws, progress, say)
        summary["evaluations"] = len(rows)
        for line in _best_lines(rows, job.n_layers):
            say(line)
        if spec.wants_report:
            from .report import write_report

            paths = write_report(rows, ws.dir, job.n_layers)
            ws.push("eval/results.json", "report.md", *(f"{Path(h).name}" for h in paths["heatmaps"]))
            summary["report"] = redact(_join(job.version_url, "report.md"))
            say(f"  report: {summary['report']}")

    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["completed_at"] = utc_now()
    ws.out.write_json(JOB_FILE, {"spec": spec.model_dump(mode="json"), "summary": summary})
    if job.job_url:  # the pointer moves only once everything above has succeeded
        Output(job.job_url).write_json(LATEST, {"version": job.version, "path": redact(job.version_url),
                                                  "job": spec.name, "spec": spec.source, "model": job.model_ref,
                                                  "weights_digest": job.weights_digest, "variants": job.variants,
                                                  "completed_at": summary["completed_at"]})
        summary["latest"] = job.version
        say(f"  {LATEST} -> {job.version}")
    say(f"job {spec.name} done in {summary['seconds']:.1f}s")
    return summary


def read_latest(job_dir: str) -> dict | None:
    """The LATEST record of a job folder ``{output}/{name}`` (None before the first complete run)."""
    return Output(_local(job_dir)).read_json(LATEST)


# --------------------------------------------------------------------------- CLI glue
def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``strata run``; wire with ``p.set_defaults(func=cmd_run)``."""
    parser.add_argument("job", metavar="JOB.yaml", help="job spec (see jobs/); relative paths inside it resolve "
                                                        "against the current directory")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (shards to embed/skip/drop, estimated tokens, variants, indexes and "
                             "evaluations to run, the version) without embedding or writing anything")
    parser.add_argument("--json", action="store_true", help="also print the summary as one JSON line at the end")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line while embedding")
    return parser


def cmd_run(args) -> int:
    summary = run_job(args.job, dry_run=args.dry_run, progress=not args.quiet)
    if args.json:
        print(json.dumps(summary, default=str))
    return 0


__all__ = ["JobSpec", "JobSpecError", "Job", "load_spec", "parse_spec", "resolve_job", "plan_job", "run_job",
           "read_latest", "version_id", "index_status", "add_run_arguments", "cmd_run", "model_depth"]

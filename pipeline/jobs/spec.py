"""Job specs: the pydantic models of ``jobs/*.yaml`` and their one-line errors.

A job spec is validated here before anything runs; an unknown key, a wrong type, an unknown
pooling or a layer the model does not have is ONE error line naming the file and the field
(``jobs/x.yaml: variants.poolings[1]: ...``). The rest of this module is that error
rendering (pydantic's error list -> one line with the allowed keys and a did-you-mean), so it
stays one idea despite its length.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeFloat, NonNegativeInt,
                      PositiveInt, PrivateAttr, ValidationError, field_validator)

from .. import models
from ..models import DEFAULT_MODEL
from ..storage import safe_name
from ..templates import parse_templates
from ..transforms import parse_transforms
from ..variants import POOLINGS, SpecError, Variant, make_variants, mix_variants, parse_layers, parse_mixes


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
def _as_list(value: Any) -> Any:
    return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) and "{text}" not in value \
        else [value] if isinstance(value, str) else value


def _checked_by(parse, *args):
    """A pydantic validator from a parser that raises SpecError: the list is kept as written."""
    def check(items: list[str]) -> list[str]:
        try:
            parse(items, *args)
        except SpecError as e:
            raise ValueError(str(e)) from None
        return items
    return check


_check_templates = _checked_by(parse_templates)
_check_transforms = _checked_by(parse_transforms)
_check_mixes = _checked_by(parse_mixes, 10**6)  # syntax only; ranges are checked once the depth is known


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
    templates: Annotated[list[str], BeforeValidator(_as_list), AfterValidator(_check_templates),
                         Field(min_length=1)] = ["plain"]
    transforms: Annotated[list[str], BeforeValidator(_as_list), AfterValidator(_check_transforms),
                          Field(min_length=1)] = ["none"]
    mixes: Annotated[list[str], BeforeValidator(_as_list), AfterValidator(_check_mixes)] = []
    mix_labels: LocalPath | None = None  # training labels of learned mixes (STS pairs or a BEIR folder)
    recipe: LocalPath | None = None  # a probe.json (strata probe): its variants' mix weights and fitted transforms
    recipe_top: PositiveInt = 1  # how many of the recipe's variants


class EmbeddingSpec(_Section):
    max_length: PositiveInt | None = None  # None: the model's own (models.default_max_length)
    dtype: Literal["float32", "float16", "int8", "binary"] = "float32"  # int8/binary: quantised (pipeline/quantize.py)
    calibration_rows: PositiveInt = 1000  # int8: ranges calibrated on the input's first rows
    normalize: bool = False
    batch_tokens: PositiveInt | None = None  # None: the encoder's default for the device
    format: Literal["parquet", "arrow"] = "parquet"
    append_eos: bool = False
    # the job's standing consent: a projected output up to this size runs without --yes (default 100GB)
    max_output_size: str | None = None

    @field_validator("max_output_size")
    @classmethod
    def _size(cls, v):
        from ..sizing import parse_size

        parse_size(v)  # one-line error for a size that does not parse
        return v


class ResourcesSpec(_Section):
    actors: PositiveInt | None = None
    gpus_per_actor: NonNegativeFloat | None = None
    ray_address: str | None = None


class IndexSpec(_Section):
    variants: Annotated[list[VariantName] | None, BeforeValidator(_all_to_none)] = None  # None = all
    kind: Literal["auto", "flat", "hnsw", "ivfpq"] = "auto"
    rescore: NonNegativeInt = 0  # quantised outputs: re-score rescore x k candidates with float queries


class StsEval(_Section):
    task: Literal["sts"]
    data: LocalPath


class RetrievalEval(_Section):
    task: Literal["retrieval"]
    data: LocalPath
    split: str = "test"
    max_queries: PositiveInt | None = None
    max_docs: PositiveInt | None = None
    query_template: str | None = None  # a template name of variants.templates (or a template string)
    doc_template: str | None = None


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
            depth = models.depth(spec.model.spec, trust_remote_code=spec.model.trust_remote_code, load=False) \
                if spec.mode != "existing" else None
            if depth is not None:
                check_variants(spec, depth)
    except _Problem as p:
        raise JobSpecError(_line(source, p.loc, p.message)) from None
    return spec


MAX_SPEC_BYTES = 1 << 20  # a job spec is a page of YAML
MAX_NODES = 100_000  # values once aliases are expanded
MAX_ALIASES = 100  # anchors are handy; thousands of aliases are an alias bomb ("billion laughs")


class _SpecLoader(yaml.SafeLoader):
    """``yaml.safe_load`` (no ``!!python`` tags) that refuses alias bombs: more than MAX_ALIASES aliases, or
    more than MAX_NODES values once they are expanded."""

    aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_ALIASES} aliases (*name): refused",
                                                  self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def compose_document(self):
        node = super().compose_document()
        sizes: dict[int, int] = {}

        def size(n) -> int:  # nodes once aliases are expanded; each shared node counted per use
            if id(n) not in sizes:
                sizes[id(n)] = 1  # a recursive alias counts once
                kids = [x for kv in n.value for x in kv] if isinstance(n, yaml.MappingNode) else (
                    n.value if isinstance(n, yaml.SequenceNode) else [])
                sizes[id(n)] = min(1 + sum(size(k) for k in kids), MAX_NODES + 1)
            return sizes[id(n)]

        if node is not None and size(node) > MAX_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_NODES:,} values once its aliases "
                                              "(*name) are expanded: refused (an alias bomb?)", node.start_mark)
        return node


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
    if len(text) > MAX_SPEC_BYTES:
        raise JobSpecError(f"{source}: job spec of {len(text):,} characters refused (at most {MAX_SPEC_BYTES:,})")
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader
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
    if spec.embedding.dtype in ("int8", "binary") and (spec.variants.mixes or spec.variants.recipe
                                                         or set(spec.variants.transforms) != {"none"}):
        raise _Problem("embedding.dtype", f"{spec.embedding.dtype}: derived variants (variants.mixes, transforms, "
                                          "recipe) are computed from float columns; use float32 or float16")
    if spec.report and not spec.evaluations:
        raise _Problem("report", "true needs at least one evaluation to report on")
    if spec.mode == "existing" and spec.indexes is None and not spec.evaluations:
        raise _Problem("indexes", "an input.embeddings job has nothing to do without indexes or evaluations")


def check_variants(spec: JobSpec, depth: int) -> tuple[Variant, ...]:
    """The spec's variant grid for a model of ``depth`` blocks; layer and index names checked."""
    templates = [t.name for t in parse_templates(spec.variants.templates)]
    try:
        variants = make_variants(spec.variants.layers, spec.variants.poolings, depth, templates)
    except SpecError as e:
        raise _Problem("variants.layers", f"{e} (model {spec.model.spec})") from None
    try:
        mixes = parse_mixes(spec.variants.mixes, depth)
        derived = mix_variants(variants, mixes)
    except SpecError as e:
        raise _Problem("variants.mixes", f"{e} (model {spec.model.spec})") from None
    if any(kind == "learned" for kind, _, _ in mixes) and not spec.variants.mix_labels:
        raise _Problem("variants.mix_labels", "a learned mix needs training labels (STS pairs or a BEIR folder)")
    transforms = parse_transforms(spec.variants.transforms)
    for i, ev in enumerate(spec.evaluations):
        for key in ("query_template", "doc_template"):
            given = getattr(ev, key, None)
            if given is not None:
                try:
                    name = parse_templates([given])[0].name
                except SpecError as e:
                    raise _Problem(f"evaluations[{i}].{key}", str(e)) from None
                if name not in templates:
                    raise _Problem(f"evaluations[{i}].{key}", f"{given!r} is not one of variants.templates "
                                                             f"({', '.join(templates)})")
    if spec.indexes and spec.indexes.variants:
        names = [v.name for v in variants]
        names += [Variant(b.layer, b.pooling, b.template, b.mix, t).name for b in (*variants, *derived)
                  for t in transforms if t != "none" or b.mix is not None and b.mix.startswith("uniform")]
        for i, name in enumerate(spec.indexes.variants):
            if name not in names:
                raise _Problem(f"indexes.variants[{i}]", f"{name} is not one of the job's variants "
                                                         f"({_short_list(names)})")
    return variants


def _short_list(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", … ({len(items)} in all)" if len(items) > n else "")



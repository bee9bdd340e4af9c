"""Job specs: the pydantic models of ``jobs/*.yaml`` and their field validators.

A job spec is validated by these models before anything runs; a field's own problem (an
unknown key, a wrong type, an unknown pooling) is a pydantic error that ``messages`` renders
as ONE line naming the file and the field. ``load`` reads the YAML, ``checks`` holds the
cross-field checks and those that need the model's depth.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeFloat, NonNegativeInt,
                      PositiveInt, PrivateAttr, field_validator)

from ..models import DEFAULT_MODEL
from ..storage import safe_name
from ..templates import parse_templates
from ..transforms import parse_transforms
from ..variants import POOLINGS, SpecError, Variant, parse_layers, parse_mixes
from .workspace import is_url


# --------------------------------------------------------------------------- field validators
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
    if is_url(value) and not value.startswith("file://"):
        raise ValueError(f"evaluation data is read from local disk; got the URL {value!r}")
    return value


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


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


def _check_storage(storage: dict[str, dict]) -> dict[str, dict]:
    for url in storage:
        if "://" not in url:
            raise ValueError(f"storage: {url!r} is not a URL prefix (e.g. s3://bucket or s3://bucket/path)")
    return storage


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


class RetentionSpec(_Section):
    """Which published versions a job keeps (``pipeline/jobs/versions.py``): the ``keep`` newest, and
    any younger than ``days``; LATEST's always."""

    keep: PositiveInt = 3
    days: NonNegativeFloat | None = None


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


class ClassificationEval(_Section):
    task: Literal["classification"]
    data: LocalPath  # a folder with train and test files
    split: str = "test"
    samples_per_label: PositiveInt | None = None  # MTEB's default: 8
    experiments: PositiveInt | None = None  # MTEB's default: 10


class ClusteringEval(_Section):
    task: Literal["clustering"]
    data: LocalPath
    protocol: Literal["original", "fast"] | None = None  # MTEB's default: original


class PairsEval(_Section):
    task: Literal["pairs"]
    data: LocalPath


class RerankingEval(_Section):
    task: Literal["reranking"]
    data: LocalPath


Evaluation = Annotated[StsEval | RetrievalEval | ClassificationEval | ClusteringEval | PairsEval | RerankingEval,
                       Field(discriminator="task")]


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
    retention: RetentionSpec = Field(default_factory=RetentionSpec)
    # fsspec storage options per URL prefix ({"s3://bucket-a": {"endpoint_url": ..., "profile": ...}}): two
    # stores in one job each get their own; secret values are never echoed, and job.json holds "***"
    storage: Annotated[dict[str, dict[str, Any]], AfterValidator(_check_storage)] = Field(default_factory=dict)

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


# the sections of a spec, by key: for naming the allowed keys of the one with an unknown key
SECTIONS: dict[str, type[BaseModel]] = {"input": InputSpec, "model": ModelSpec, "variants": VariantsSpec,
                                         "embedding": EmbeddingSpec, "resources": ResourcesSpec, "indexes": IndexSpec,
                                         "retention": RetentionSpec}
TASKS: dict[str, type[BaseModel]] = {"sts": StsEval, "retrieval": RetrievalEval, "classification": ClassificationEval,
                                      "clustering": ClusteringEval, "pairs": PairsEval, "reranking": RerankingEval}

"""The resolved request: what to embed and how, resolved once on the driver, then frozen.

``resolve(...)`` turns what a user wrote (a model spec, ``--layers 15,-1``, ``--poolings
mean_nosink``, an optional batch budget) into a ``Request`` holding only concrete values:
the model's local directory, digest, depth and width; the variants as a tuple of
``Variant``; a token budget in tokens. The same object then travels unchanged to the Ray
actors (which build their ``Encoder`` from it and resolve nothing), the writer (whose column
types come from it), the manifest, the index builder and the evaluators. The CLI and job
specs both end here, so a spec cannot mean two things in two places.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from . import models
from .templates import SLOT, TOKENS_RULE, Template, check_fits, parse_templates
from .variants import Variant, make_variants

log = logging.getLogger(__name__)

OUTPUT_DTYPES = ("float32", "float16", "int8", "binary")  # int8/binary: quantised outputs (pipeline/quantize.py)
OUTPUT_FORMATS = ("parquet", "arrow")
# Padded tokens per forward pass when none is given. CPU: 4096 was the fastest of 4096-32768 in
# two runs of `strata bench` (3-7% over 16384; BENCHMARKS.md). CUDA: larger batches keep the GPU
# busy; 16384 is not yet measured on a GPU.
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}


@dataclass(frozen=True)
class ModelInfo:
    """A model, located and inspected: everything the actors and the manifest need of it."""

    name: str  # alias, absolute path or hub id: how manifests name it
    path: str  # what from_pretrained loads (a GGUF model's converted cache directory)
    n_layers: int
    dim: int
    weights_digest: str | None = None  # sha256 of the weight files; None where not asked for
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass(frozen=True)
class EncodeSettings:
    """How texts become vectors, beyond the variants: the same for every variant of a request."""

    max_length: int = 512
    dtype: str = "float32"  # output dtype of the embeddings
    normalize: bool = False
    batch_tokens: int | None = None  # padded tokens per forward pass; None only before resolution
    max_batch_rows: int = 256
    padding_side: str = "right"  # results are the same either way; right is the default
    append_eos: bool = False  # end every sequence with EOS (models trained to read it: E5-Mistral, ...)

    def __post_init__(self):
        if self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose from {', '.join(OUTPUT_DTYPES)}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be positive, got {self.max_length}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be positive, got {self.batch_tokens}")
        if self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be positive, got {self.max_batch_rows}")
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side {self.padding_side!r}: choose 'right' or 'left'")

    def for_device(self, device_type: str) -> "EncodeSettings":
        """These settings with a concrete batch budget for a device ('cpu' or 'cuda')."""
        if self.batch_tokens is not None:
            return self
        return dataclasses.replace(self, batch_tokens=DEFAULT_BATCH_TOKENS.get(device_type, 16384))


@dataclass(frozen=True)
class Resources:
    """Where the work runs (Ray only; the in-process encoder ignores it)."""

    actors: int | None = None  # default: one per GPU, else CPUs - 1
    gpus_per_actor: float | None = None
    ray_address: str | None = None

    def __post_init__(self):
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be at least 1, got {self.actors}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:  # 0: CPU actors on a GPU machine
            raise ValueError(f"gpus_per_actor must not be negative, got {self.gpus_per_actor}")


@dataclass(frozen=True)
class Request:
    model: ModelInfo
    variants: tuple[Variant, ...]
    settings: EncodeSettings
    output_format: str = "parquet"
    resources: Resources = field(default_factory=Resources)
    templates: tuple[Template, ...] = (Template("plain", SLOT),)  # every template a variant names
    max_length_source: str = "given"  # or where the model's own limit was read (models.default_max_length)
    max_length_capped_from: int | None = None  # the given max length, where it was capped at the model's positions

    def __post_init__(self):
        if not self.variants:
            raise ValueError("a request needs at least one variant")
        named = {t.name for t in self.templates}
        missing = sorted({v.template for v in self.variants} - named)
        if missing:
            raise ValueError(f"variants name template(s) {', '.join(missing)} that the request does not define")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format {self.output_format!r}: choose {' or '.join(map(repr, OUTPUT_FORMATS))}")
        if self.settings.batch_tokens is None:
            raise ValueError("a resolved request has a concrete batch_tokens (use request.resolve)")
        if self.settings.dtype == "binary":
            from .quantize import check_dim

            check_dim("binary", self.model.dim)  # one line naming the dim, before any work

    @property
    def layers(self) -> list[int]:
        return sorted({v.layer for v in self.variants})

    def manifest_variants(self) -> list[dict]:
        """The manifest's ``variants`` entries (ARCHITECTURE.md contract)."""
        return [{"name": v.name, "column": v.column, "layer": v.layer, "pooling": v.pooling,
                 **({"template": v.template} if v.template != "plain" else {}), "dim": self.model.dim,
                 "dtype": self.settings.dtype, "normalized": self.settings.normalize} for v in self.variants]

    def uncapped(self) -> "Request":
        """This request at the max length given before the cap: only to resume an output that
        was made with it (its committed vectors and the new ones must agree)."""
        if not self.max_length_capped_from:
            return self
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, max_length=self.max_length_capped_from),
                                   max_length_capped_from=None)

    def max_length_line(self) -> str:
        """How long a text may be, and why: printed by the commands and kept in the manifest."""
        return f"max length {self.settings.max_length} tokens ({self.max_length_source})"

    def template_texts(self) -> dict[str, str]:
        return {t.name: t.text for t in self.templates}

    def signature(self, text_column: str = "text", id_column: str | None = None) -> dict:
        """What must match for stored embeddings to be reused: the manifest's ``signature`` and,
        hashed, a job's version id. Batch budget, output location and resources are not in it:
        they change how fast vectors are made, not which."""
        sig = {"model": self.model.name, "weights_digest": self.model.weights_digest,
               "variants": [v.name for v in self.variants], "max_length": self.settings.max_length,
               "dtype": self.settings.dtype, "normalize": self.settings.normalize,
               "text_column": text_column, "id_column": id_column, "format": self.output_format}
        # only where used, so that plain outputs keep the signature (and job version) they had
        if any(not t.is_plain for t in self.templates):
            sig["templates"] = self.template_texts()
        # a piece's trailing whitespace is tokenised with the text (2026-12): outputs of such a
        # template made before then were tokenised otherwise and must not be resumed into
        if any(t.text_takes_whitespace for t in self.templates):
            sig["template_tokens"] = TOKENS_RULE
        if self.settings.append_eos:
            sig["append_eos"] = True
        return sig


def signature_difference(old: dict, new: dict) -> list[str]:
    """Settings in which two signatures differ. The model's name is only a spelling: two names
    of the same weights (an alias and its path, or a path given from another directory) agree."""
    keys = set(old) | set(new)
    if old.get("weights_digest") and old.get("weights_digest") == new.get("weights_digest"):
        keys.discard("model")
    return sorted(k for k in keys if old.get(k) != new.get(k))


def device_type(device: str | None = "auto") -> str:
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device).split(":")[0]


def resolve(model: str | None = None, *, layers="-1", poolings="mean", max_length: int | None = None,
            dtype: str = "float32", normalize: bool = False, batch_tokens: int | None = None,
            max_batch_rows: int = 256, output_format: str = "parquet", resources: Resources | None = None,
            device: str | None = "auto", trust_remote_code: bool = False, allow_pickle: bool = False,
            digest: bool = True, templates=None, append_eos: bool = False, padding_side: str = "right") -> Request:
    """Resolve a model spec and variant specs into a Request (see the module doc).

    Loads the model's config only (and its tokenizer where a template must be checked against
    ``max_length``; a GGUF model is converted once into the cache), never its weights.
    ``max_length`` None takes the model's own (``models.default_max_length``); the request's
    ``max_length_source`` says where the value came from.
    ``templates``: built-in names or template strings (``pipeline.templates``), default plain. ``digest`` hashes the weight files (needed for manifests and job versions, not
    for in-process encoding). ``device`` picks the default batch budget: with no GPU here and
    GPU workers in a cluster, pass ``device='cuda'`` or a budget.
    """
    from transformers import AutoConfig

    src = models.resolve(model)
    where = str(models.materialize(src))
    source = "given"
    if max_length is None:
        max_length, source = models.default_max_length(where)
    settings = EncodeSettings(max_length=max_length, dtype=dtype, normalize=normalize, batch_tokens=batch_tokens,
                              max_batch_rows=max_batch_rows, append_eos=append_eos, padding_side=padding_side)
    templates = parse_templates(templates)
    resources = resources or Resources()
    if resources.gpus_per_actor == 0:
        device = "cpu"
    models.check_weight_format(src, where, allow_pickle)  # here, not deep inside an actor
    models.check_weights_readable(src, where, allow_pickle)
    try:
        cfg = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise models.ModelError(f"cannot read the config of model {src.name!r} at {where}: {e}") from None
    models.check_weight_shapes(src, where, cfg)
    info = ModelInfo(name=src.name, path=where, n_layers=int(cfg.num_hidden_layers), dim=int(cfg.hidden_size),
                     weights_digest=models.weights_digest(src) if digest else None,
                     trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    variants = make_variants(layers, poolings, info.n_layers, [t.name for t in templates])
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if isinstance(limit, int) and 0 < limit < max_length:  # positions past the model's table: never meaningful
        log.warning("max length %d is beyond model %s's position limit (config max_position_embeddings %d): "
                    "capped at %d", max_length, src.name, limit, limit)
        capped_from, max_length = max_length, limit
        settings = dataclasses.replace(settings, max_length=limit)
    else:
        capped_from = None
    if any(not t.is_plain for t in templates) or append_eos:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        for t in templates:  # a template that leaves no room for the text: refused before any work
            check_fits(t, tokenizer, max_length, append_eos)
    return Request(model=info, variants=variants, settings=settings.for_device(device_type(device)),
                   output_format=output_format, resources=resources, templates=templates,
                   max_length_source=source, max_length_capped_from=capped_from)

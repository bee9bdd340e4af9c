"""The single-process engine: one truncated forward pass per batch, every variant pooled from it.

``Encoder.encode(texts)`` returns one ``(n, dim)`` array per variant, in input order, plus
stats. The forward pass stops after the deepest requested block (hooks capture the requested
blocks' outputs, then a sentinel exception ends the pass), so deeper blocks, the final norm
(unless the last layer is requested) and any LM head never run.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Sequence

import numpy as np
import torch

from . import models
from .batching import padding_efficiency, plan_batches
from .pooling import pool
from .request import EncodeSettings, Request, resolve
from .templates import Template, Tokenized, parse_template, tokenize_plain
from .templates import tokenize as tokenize_template
from .variants import Variant

OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}
def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], np.ndarray]:
    """Token ids per text under the plain template, truncated at ``max_length``, and whether each
    text was truncated (``templates.tokenize_plain``)."""
    return tokenize_plain(tokenizer, texts, max_length)


def check_texts(texts: Sequence, note: str = "") -> None:
    """Every text a str with something besides white space; the first that is not is named (``note``
    follows the type error)."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, not str{note}")
        if not t.strip():
            raise ValueError(f"text {i} is empty or whitespace-only")


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS token, else 0."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pad)


class _StopForward(Exception):
    pass


@dataclass
class EncodeStats:
    rows: int = 0
    tokens: int = 0  # real tokens fed to the model
    padded_tokens: int = 0
    truncated: int = 0
    batches: int = 0
    seconds: float = 0.0

    @property
    def padding_efficiency(self) -> float:
        return padding_efficiency(self.tokens, self.padded_tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def add(self, other: "EncodeStats") -> None:
        for f in ("rows", "tokens", "padded_tokens", "truncated", "batches", "seconds"):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def as_dict(self) -> dict:
        d = {f: getattr(self, f) for f in ("rows", "tokens", "padded_tokens", "truncated", "batches", "seconds")}
        d["padding_efficiency"] = self.padding_efficiency
        d["tokens_per_second"] = self.tokens_per_second
        return d


@dataclass
class EncodeResult(Mapping):
    """Every variant's (n, dim) array, in input order; a read-only mapping {Variant: array}."""

    embeddings: dict[Variant, np.ndarray]
    stats: EncodeStats = field(default_factory=EncodeStats)

    def __getitem__(self, variant: Variant | str) -> np.ndarray:
        return self.embeddings[Variant.parse(variant)]

    def __iter__(self):
        return iter(self.embeddings)

    def __len__(self) -> int:
        return len(self.embeddings)


def find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of transformer blocks (the ModuleList with num_hidden_layers entries)."""
    n = model.config.num_hidden_layers
    for path in ("layers", "encoder.layer", "h", "decoder.layers", "transformer.h", "model.layers", "blocks"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) == n:
            return obj
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise models.ModelError(f"Strata cannot truncate {type(model).__name__}: no list of its {n} transformer blocks "
                            "was found, so a layer's output cannot be captured safely")


# Relative error allowed between a captured layer and the full model's hidden_states[i] in the
# load-time check: both passes run the same operations, so only the last layer (read from the
# model's output either way) and low-precision kernels may differ at all.
TRUNCATION_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}


@torch.inference_mode()
def check_truncation(encoder: "Encoder") -> None:
    """Refuse a model whose captured layers are not its ``hidden_states[i]``.

    Runs two short rows (one padded) through the full model with ``output_hidden_states`` and
    through Strata's hooks, and compares every layer 0..N on the real tokens. Families differ in
    where they scale embeddings, apply final norms or keep their blocks; this check finds out
    per model instead of trusting a list.
    """
    model, n = encoder.model, encoder.n_layers
    name = type(model).__name__
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 8:
        raise models.ModelError(f"Strata cannot check truncation of {name}: config has no usable vocab_size")
    ids = torch.tensor([[3, 5, 7, 4, 6, 2], [4, 7, 3, 0, 0, 0]], dtype=torch.long) % vocab
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]], dtype=torch.long)
    ids, mask = ids.to(encoder.device), mask.to(encoder.device)
    position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)
    try:
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                     output_hidden_states=True).hidden_states
        got = encoder.hidden_states(ids, mask, range(n + 1))
    except Exception as e:  # an architecture whose forward Strata cannot drive
        raise models.ModelError(f"Strata cannot run {name} layer by layer: {type(e).__name__}: {e}") from None
    if full is None or len(full) != n + 1:
        raise models.ModelError(f"Strata cannot truncate {name}: it does not report {n + 1} hidden states")
    tol = TRUNCATION_TOLERANCE.get(next(model.parameters()).dtype, 2e-2)
    real = mask.bool()
    for layer in range(n + 1):
        a, b = got.get(layer), full[layer]
        if a is None or a.shape != b.shape:
            raise models.ModelError(
                f"Strata cannot truncate {name} safely: its layer {layer} cannot be captured with the shape of "
                f"hidden_states[{layer}]; this architecture is not supported")
        a, b = a[real].double(), b[real].double()
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        if err > tol:
            raise models.ModelError(
                f"Strata cannot truncate {name} safely: its captured layer {layer} differs from the full model's "
                f"hidden_states[{layer}] (relative error {err:.1e}); this architecture is not supported")


def capture(model, blocks: Sequence[torch.nn.Module], n_layers: int, input_ids: torch.Tensor,
            attention_mask: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """{layer: hidden state} for ``layers``, each equal to the full model's ``hidden_states[i]``.

    Hooks capture block outputs (layer 0: the first block's input) and a sentinel exception ends
    the pass after the deepest one, so deeper blocks never run; layer ``n_layers`` is the model's
    output, after its final norm. Position ids count each row's own tokens, so a left-padded row
    sees the same positions as the same row unpadded.
    """
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    wanted = set(layers)
    deepest = max(wanted)
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def grab(layer: int, tensor: torch.Tensor):
        captured[layer] = tensor
        if layer == deepest:
            raise _StopForward

    if 0 in wanted:
        def pre_hook(module, args, kwargs):
            grab(0, args[0] if args else kwargs["hidden_states"])
        handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
    for layer in wanted - {0, n_layers}:
        def hook(module, args, output, layer=layer):
            grab(layer, output[0] if isinstance(output, (tuple, list)) else output)
        handles.append(blocks[layer - 1].register_forward_hook(hook))
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        captured[n_layers] = out.last_hidden_state  # after the final norm, as HF reports it
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


def pick_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Encoder:
    """Model + variants + batching, in one process (no Ray).

    ``Encoder.load(model, layers=..., poolings=...)`` resolves a request and loads it;
    ``Encoder.from_request(request)`` is what the Ray actors use (nothing resolved again);
    ``Encoder(model, tokenizer, variants)`` wraps a model already in memory.
    ``encode(texts)`` returns a mapping {Variant: (n, dim) array}, the evaluators' encoder shape.
    """

    def __init__(self, model, tokenizer, variants: Sequence[Variant], settings: EncodeSettings | None = None, *,
                 templates: Sequence[Template] = (), request: Request | None = None,
                 device: str | torch.device | None = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.request = request
        self.device = pick_device(device) if not isinstance(device, torch.device) else device
        self.settings = (settings or EncodeSettings()).for_device(self.device.type)
        self.model.to(self.device)
        self.model.eval()
        self.n_layers: int = model.config.num_hidden_layers
        self.dim: int = model.config.hidden_size
        self.variants: tuple[Variant, ...] = tuple(variants)
        if not self.variants:
            raise ValueError("an Encoder needs at least one variant")
        bad = [v.name for v in self.variants if not 0 <= v.layer <= self.n_layers]
        if bad:
            raise ValueError(f"variant(s) {', '.join(bad)} out of range: the model has layers 0..{self.n_layers}")
        derived = [v.name for v in self.variants if not v.is_raw]
        if derived:
            raise ValueError(f"variant(s) {', '.join(derived)} are computed from embedded variants (mixes, "
                             "transforms): an Encoder embeds raw variants only")
        known = {t.name: t for t in [*(request.templates if request else ()), *templates]}
        self.templates: dict[str, Template] = {}
        for name in dict.fromkeys(v.template for v in self.variants):
            self.templates[name] = known.get(name) or parse_template(name)  # built-ins by name
        self.layers: list[int] = sorted({v.layer for v in self.variants})
        # per template: {layer: [poolings]}; one forward pass per template gives all of them
        self.groups: dict[str, dict[int, list[str]]] = {
            t: {layer: [v.pooling for v in self.variants if v.template == t and v.layer == layer]
                for layer in sorted({v.layer for v in self.variants if v.template == t})}
            for t in self.templates}
        self.blocks = find_blocks(model)
        check_truncation(self)
        self.pad_id = pad_id(tokenizer)
        self.pad_multiple = 8 if self.device.type == "cuda" else 1

    @property
    def model_name(self) -> str:
        return self.request.model.name if self.request else "custom"

    @classmethod
    def load(cls, model: str | None = None, *, layers="-1", poolings="mean", device: str | None = "auto",
             model_dtype: str | None = "auto", trust_remote_code: bool = False, allow_pickle: bool = False,
             threads: int | None = None, **settings) -> "Encoder":
        """Load a model by spec (alias, directory, .gguf, hub id) with the variants of a layer and
        pooling spec. ``settings`` holds the EncodeSettings fields (normalize, dtype, max_length, ...)."""
        request = resolve(model, layers=layers, poolings=poolings, device=device, trust_remote_code=trust_remote_code,
                          allow_pickle=allow_pickle, digest=False, **settings)
        return cls.from_request(request, device=device, model_dtype=model_dtype, threads=threads)

    @classmethod
    def from_request(cls, request: Request, *, device: str | None = "auto", model_dtype: str | None = "auto",
                     threads: int | None = None) -> "Encoder":
        """Load the request's model and embed exactly its variants with its settings.

        ``model_dtype='auto'`` runs bf16 on CUDA and float32 on CPU.
        """
        dev = pick_device(device)
        if threads:
            torch.set_num_threads(threads)
        if model_dtype == "auto":
            torch_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, model_dtype) if model_dtype else None
        m, tok = models.load_dir(request.model.path, name=request.model.name, torch_dtype=torch_dtype,
                                 trust_remote_code=request.model.trust_remote_code,
                                 allow_pickle=request.model.allow_pickle)
        return cls(m, tok, request.variants, request.settings, request=request, device=dev)

    @property
    def poolings_by_layer(self) -> dict[int, list[str]]:
        """{layer: poolings} of the plain template (the grid without templates)."""
        return self.groups.get("plain", {})

    @functools.cached_property
    def weights_digest(self) -> str | None:
        """sha256 of the weight files, hashed on first use only (Ray actors never need it)."""
        if self.request is None:
            return None
        if self.request.model.weights_digest:
            return self.request.model.weights_digest
        return models.weights_digest(models.resolve(self.request.model.name))

    # ---------------------------------------------------------------- tokenising
    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids per text (truncated at max_length, plain template) and a bool array: was it truncated."""
        return tokenize(self.tokenizer, texts, self.settings.max_length)

    def tokenize_templates(self, texts: Sequence[str]) -> dict[str, Tokenized]:
        """Per template: token ids, the text's span and truncation (see ``pipeline.templates``)."""
        return {name: tokenize_template(self.tokenizer, texts, self.settings.max_length, t, self.settings.append_eos)
                for name, t in self.templates.items()}

    # ---------------------------------------------------------------- forward
    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      layers: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """Hidden states of the requested layers, equal to the full model's ``hidden_states[i]``
        (``capture``)."""
        return capture(self.model, self.blocks, self.n_layers, input_ids, attention_mask,
                       self.layers if layers is None else layers)

    def _embed_batch(self, ids: list[list[int]], spans: np.ndarray, padded_len: int, template: str
                     ) -> dict[Variant, torch.Tensor]:
        n = len(ids)
        input_ids = torch.full((n, padded_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, padded_len), dtype=torch.long)
        span = torch.zeros((n, padded_len), dtype=torch.long)
        left = self.settings.padding_side == "left"
        for i, row in enumerate(ids):
            offset = padded_len - len(row) if left else 0
            input_ids[i, offset:offset + len(row)] = torch.as_tensor(row, dtype=torch.long)
            mask[i, offset:offset + len(row)] = 1
            span[i, offset + int(spans[i, 0]):offset + int(spans[i, 1])] = 1
        if self.device.type == "cuda":
            input_ids, mask, span = (t.pin_memory().to(self.device, non_blocking=True) for t in (input_ids, mask, span))
        groups = self.groups[template]
        hidden = self.hidden_states(input_ids, mask, list(groups))
        return self.pool_hidden(hidden, mask, None if self.templates[template].is_plain else span, template)

    def pool_hidden(self, hidden: dict[int, torch.Tensor], mask: torch.Tensor, span: torch.Tensor | None = None,
                    template: str = "plain") -> dict[Variant, torch.Tensor]:
        """One template's variants from its captured hidden states: {Variant: (B, D) float32}."""
        out: dict[Variant, torch.Tensor] = {}
        for layer, poolings in self.groups[template].items():
            for pooling, vec in pool(hidden[layer], mask, poolings, span).items():
                if self.settings.normalize:
                    vec = torch.nn.functional.normalize(vec, dim=-1)
                out[Variant(layer, pooling, template)] = vec
        return out

    def encode_ids(self, ids: Sequence[Sequence[int]]) -> EncodeResult:
        """Embed pre-tokenised rows (plain template only; the whole row is the text); input order."""
        if set(self.templates) != {"plain"}:
            raise ValueError("encode_ids embeds the plain template only; use encode_tokenized for templates")
        spans = np.array([[0, len(x)] for x in ids], dtype=np.int64).reshape(-1, 2)
        return self.encode_tokenized({"plain": Tokenized([list(x) for x in ids], spans, np.zeros(len(ids), bool))})

    def encode_tokenized(self, tokens: dict[str, Tokenized]) -> EncodeResult:
        """Embed rows tokenised per template (one forward pass per template); arrays in input order."""
        t0 = time.perf_counter()
        n = len(next(iter(tokens.values())).ids) if tokens else 0
        np_dtype = OUTPUT_DTYPES[self.settings.dtype]
        result = {v: np.empty((n, self.dim), dtype=np_dtype) for v in self.variants}
        stats = EncodeStats(rows=n)
        for template in self.templates:
            tok = tokens[template]
            lengths = [len(x) for x in tok.ids]
            empty = np.flatnonzero(tok.spans[:, 1] <= tok.spans[:, 0]) if len(tok.spans) else []
            if len(empty):
                raise ValueError(f"row {int(empty[0])} has no tokens; every row needs at least one")
            for batch in plan_batches(lengths, batch_tokens=self.settings.batch_tokens,
                                      max_rows=self.settings.max_batch_rows, pad_multiple=self.pad_multiple):
                vecs = self._embed_batch([tok.ids[i] for i in batch.indices], tok.spans[batch.indices],
                                         batch.padded_len, template)
                # one device-to-host copy per batch for all variants (not one synchronising copy each)
                host = torch.stack(list(vecs.values())).to("cpu").numpy()
                for variant, v in zip(vecs, host):
                    result[variant][batch.indices] = v.astype(np_dtype, copy=False)
                stats.batches += 1
                stats.padded_tokens += batch.padded_tokens
            stats.tokens += int(sum(lengths))
            stats.truncated += int(tok.truncated.sum())
        stats.seconds = time.perf_counter() - t0
        return EncodeResult({v: result[v] for v in self.variants}, stats)

    def encode(self, texts: Sequence[str]) -> EncodeResult:
        """Embed texts; every variant as an (n, dim) array in input order ({Variant: array})."""
        check_texts(texts)
        t0 = time.perf_counter()
        res = self.encode_tokenized(self.tokenize_templates(texts))
        res.stats.seconds = time.perf_counter() - t0
        return res

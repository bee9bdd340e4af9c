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
from .variants import Variant

OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}
# A text longer than this many characters per token of max_length is cut before tokenising,
# so a multi-megabyte document costs bounded memory; it is counted as truncated.
CHARS_PER_TOKEN_GUARD = 64


def clean_text(text: str) -> str:
    """Replace invalid surrogates (which tokenizers refuse) instead of failing the batch."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], np.ndarray]:
    """Token ids per text, truncated at ``max_length``, and whether each text was truncated.

    Texts longer than ``max_length * CHARS_PER_TOKEN_GUARD`` characters are cut first (and
    counted as truncated), so a giant document costs bounded memory.
    """
    limit = max_length * CHARS_PER_TOKEN_GUARD
    cut = np.array([len(t) > limit for t in texts], dtype=bool)
    clipped = [clean_text(t[:limit]) for t in texts]
    enc = tokenizer(clipped, truncation=True, max_length=max_length, return_overflowing_tokens=True,
                    return_attention_mask=False)
    mapping = enc.get("overflow_to_sample_mapping")
    if mapping is None:  # slow tokenizers: no overflow information
        return [list(x) for x in enc["input_ids"]], cut
    ids: list[list[int] | None] = [None] * len(texts)
    truncated = cut.copy()
    for chunk, row in zip(enc["input_ids"], mapping):
        if ids[row] is None:
            ids[row] = list(chunk)
        else:
            truncated[row] = True  # a second chunk: the text did not fit
    return ids, truncated


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
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


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
                 request: Request | None = None, device: str | torch.device | None = "auto"):
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
        self.layers: list[int] = sorted({v.layer for v in self.variants})
        self.poolings_by_layer: dict[int, list[str]] = {
            layer: [v.pooling for v in self.variants if v.layer == layer] for layer in self.layers
        }
        self.blocks = find_blocks(model)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
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
        """Token ids per text (truncated at max_length) and a bool array: was it truncated."""
        return tokenize(self.tokenizer, texts, self.settings.max_length)

    # ---------------------------------------------------------------- forward
    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
        """Hidden states of the requested layers, equal to the full model's ``hidden_states[i]``.

        Position ids count each row's own tokens, so a left-padded row sees the same positions
        as the same row unpadded.
        """
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
        wanted = set(self.layers)
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
            handles.append(self.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for layer in wanted - {0, self.n_layers}:
            def hook(module, args, output, layer=layer):
                grab(layer, output[0] if isinstance(output, (tuple, list)) else output)
            handles.append(self.blocks[layer - 1].register_forward_hook(hook))
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False)
            captured[self.n_layers] = out.last_hidden_state  # after the final norm, as HF reports it
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured

    def _embed_batch(self, ids: list[list[int]], padded_len: int) -> dict[Variant, torch.Tensor]:
        n = len(ids)
        input_ids = torch.full((n, padded_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, padded_len), dtype=torch.long)
        left = self.settings.padding_side == "left"
        for i, row in enumerate(ids):
            span = slice(padded_len - len(row), padded_len) if left else slice(0, len(row))
            input_ids[i, span] = torch.as_tensor(row, dtype=torch.long)
            mask[i, span] = 1
        if self.device.type == "cuda":
            input_ids, mask = input_ids.pin_memory().to(self.device, non_blocking=True), mask.pin_memory().to(self.device, non_blocking=True)
        return self.pool_hidden(self.hidden_states(input_ids, mask), mask)

    def pool_hidden(self, hidden: dict[int, torch.Tensor], mask: torch.Tensor) -> dict[Variant, torch.Tensor]:
        """Every requested variant from the captured hidden states: {Variant: (B, D) float32}."""
        out: dict[Variant, torch.Tensor] = {}
        for layer, poolings in self.poolings_by_layer.items():
            for pooling, vec in pool(hidden[layer], mask, poolings).items():
                if self.settings.normalize:
                    vec = torch.nn.functional.normalize(vec, dim=-1)
                out[Variant(layer, pooling)] = vec
        return {v: out[v] for v in self.variants}

    def encode_ids(self, ids: Sequence[Sequence[int]]) -> EncodeResult:
        """Embed pre-tokenised rows; returns arrays in input order."""
        t0 = time.perf_counter()
        n = len(ids)
        np_dtype = OUTPUT_DTYPES[self.settings.dtype]
        result = {v: np.empty((n, self.dim), dtype=np_dtype) for v in self.variants}
        stats = EncodeStats(rows=n)
        lengths = [len(x) for x in ids]
        if any(length == 0 for length in lengths):
            raise ValueError(f"row {lengths.index(0)} has no tokens; every row needs at least one")
        for batch in plan_batches(lengths, batch_tokens=self.settings.batch_tokens,
                                  max_rows=self.settings.max_batch_rows, pad_multiple=self.pad_multiple):
            vecs = self._embed_batch([ids[i] for i in batch.indices], batch.padded_len)
            # one device-to-host copy per batch for all variants (not one synchronising copy each)
            host = torch.stack(list(vecs.values())).to("cpu").numpy()
            for variant, v in zip(vecs, host):
                result[variant][batch.indices] = v.astype(np_dtype, copy=False)
            stats.batches += 1
            stats.padded_tokens += batch.padded_tokens
        stats.tokens = int(sum(lengths))
        stats.seconds = time.perf_counter() - t0
        return EncodeResult(result, stats)

    def encode(self, texts: Sequence[str]) -> EncodeResult:
        """Embed texts; every variant as an (n, dim) array in input order ({Variant: array})."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is {type(t).__name__}, not str")
            if not t.strip():
                raise ValueError(f"text {i} is empty or whitespace-only")
        t0 = time.perf_counter()
        ids, truncated = self.tokenize(texts)
        res = self.encode_ids(ids)
        res.stats.truncated = int(truncated.sum())
        res.stats.seconds = time.perf_counter() - t0
        return res

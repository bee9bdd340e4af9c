"""Naive reference: the full model with output_hidden_states, one row at a time, per-row loops."""

from types import SimpleNamespace

import numpy as np
import torch


def tiny_llama(n_layers: int = 4, seed: int = 0, vocab_size: int = 97):
    """A tiny randomly initialised LLaMA (no files), for shape and equivalence tests."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    model = LlamaModel(cfg).eval()
    return model


def fake_tokenizer(pad_token_id=None, eos_token_id=1):
    return SimpleNamespace(pad_token_id=pad_token_id, eos_token_id=eos_token_id)


def naive_pool(h: np.ndarray, pooling: str) -> np.ndarray:
    """h: (n, D) hidden states of ONE unpadded sequence."""
    n = h.shape[0]
    if pooling == "last":
        return h[-1]
    if pooling == "first":
        return h[0]
    if pooling == "mean":
        return h.mean(axis=0)
    if pooling == "max":
        return h.max(axis=0)
    if pooling == "wmean":
        w = np.arange(1, n + 1, dtype=np.float64)
        return (w[:, None] * h).sum(0) / w.sum()
    if pooling == "mean_nosink":
        return h[0] if n == 1 else h[1:].mean(axis=0)
    if pooling == "wmean_nosink":
        if n == 1:
            return h[0]
        w = np.arange(1, n + 1, dtype=np.float64)
        w[0] = 0.0
        return (w[:, None] * h).sum(0) / w.sum()
    raise ValueError(pooling)


@torch.inference_mode()
def naive_hidden_states(model, ids: list[int]) -> list[np.ndarray]:
    """Every hidden state of the untruncated model for ONE unpadded sequence, as float64."""
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return [h[0].double().numpy() for h in out.hidden_states]


def naive_embed(model, ids: list[int], layer: int, pooling: str) -> np.ndarray:
    return naive_pool(naive_hidden_states(model, ids)[layer], pooling)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.linalg.norm(b), 1e-12))


def save_tiny_model_dir(path, n_layers: int = 4, seed: int = 0):
    """A tiny random LLaMA saved with SmolLM2's real tokenizer: a real model directory, fast."""
    from transformers import AutoTokenizer

    from pipeline import models

    tok_dir = models.materialize(models.resolve("smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = tiny_llama(n_layers=n_layers, seed=seed, vocab_size=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


_REQUEST_KEYS = {"model", "layers", "poolings", "max_length", "dtype", "normalize", "batch_tokens", "output_format",
                 "trust_remote_code", "allow_pickle", "templates", "append_eos"}
_RESOURCE_KEYS = {"actors", "gpus_per_actor", "ray_address"}


def embed(input, output, **kw):
    """``pipeline.runner.embed`` called the way the CLI calls it: the options resolved into one request."""
    from pipeline.request import Resources, resolve
    from pipeline.runner import embed as run_embed

    request_kw = {k: kw.pop(k) for k in list(kw) if k in _REQUEST_KEYS}
    resources = Resources(**{k: kw.pop(k) for k in list(kw) if k in _RESOURCE_KEYS})
    return run_embed(resolve(resources=resources, **request_kw), input, output, **kw)

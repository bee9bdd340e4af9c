"""Pooling: pure, vectorised functions from one layer's hidden states to sentence vectors.

Positions count each sequence's own tokens (p = 1..n), found from the attention mask, so
right and left padding give the same result. Every weighted pooling (mean, wmean and their
sink-free forms) is one batched matrix product of a (B, P, T) weight tensor with the
(B, T, D) hidden states; ``last``/``first`` are gathers and ``max`` a masked reduction.
"""

from __future__ import annotations

import torch

from .variants import POOLINGS

WEIGHTED = ("mean", "wmean", "mean_nosink", "wmean_nosink")


def token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-based position of each real token within its own sequence; 0 at padding."""
    mask = attention_mask.to(torch.long)
    return torch.cumsum(mask, dim=1) * mask


def pooling_weights(attention_mask: torch.Tensor, poolings: list[str]) -> torch.Tensor:
    """(B, P, T) float32 weights, each row summing to 1, for the weighted poolings."""
    pos = token_positions(attention_mask).to(torch.float32)
    real = (pos > 0).to(torch.float32)
    n = real.sum(dim=1, keepdim=True)
    single = n <= 1  # a one-token text falls back to that token for the sink-free forms
    rows = []
    for name in poolings:
        if name == "mean":
            w = real
        elif name == "wmean":
            w = pos
        elif name == "mean_nosink":
            w = torch.where(single, real, real * (pos >= 2))
        elif name == "wmean_nosink":
            w = torch.where(single, pos, pos * (pos >= 2))
        else:
            raise ValueError(f"{name!r} is not a weighted pooling")
        rows.append(w / w.sum(dim=1, keepdim=True).clamp_min(1e-12))
    return torch.stack(rows, dim=1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, poolings: list[str]) -> dict[str, torch.Tensor]:
    """Pool one layer's hidden states (B, T, D) into {pooling: (B, D) float32}."""
    unknown = [p for p in poolings if p not in POOLINGS]
    if unknown:
        raise ValueError(f"unknown pooling(s) {unknown}: choose from {', '.join(POOLINGS)}")
    out: dict[str, torch.Tensor] = {}
    h32 = hidden.float()
    weighted = [p for p in poolings if p in WEIGHTED]
    if weighted:
        w = pooling_weights(attention_mask, weighted).to(h32.device)
        pooled = torch.bmm(w, h32)  # (B, P, D)
        for i, name in enumerate(weighted):
            out[name] = pooled[:, i]
    if "last" in poolings or "first" in poolings:
        pos = token_positions(attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if "last" in poolings:
            out["last"] = h32[rows, pos.argmax(dim=1)]
        if "first" in poolings:
            out["first"] = h32[rows, (pos == 1).to(torch.int8).argmax(dim=1)]
    if "max" in poolings:
        pad = attention_mask.to(torch.bool).logical_not().unsqueeze(-1)
        out["max"] = h32.masked_fill(pad, float("-inf")).amax(dim=1)
    return {p: out[p] for p in poolings}

"""Pooling: pure, vectorised functions from one layer's hidden states to sentence vectors.

Positions count each sequence's own tokens (p = 1..n), found from the attention mask, so
right and left padding give the same result. Every weighted pooling (mean, wmean and their
sink-free forms) is one batched matrix product of a (B, P, T) weight tensor with the
(B, T, D) hidden states; ``last``/``first`` are gathers and ``max`` a masked reduction.

With a prompt template, ``span`` marks the text's own tokens (the last copy of the text, for
echo): every pooling but ``last`` pools the span only, with positions counted within it;
``last`` stays the last token of the whole sequence. The sink-free forms drop the span's
first token only when it is the sequence's first token (the attention sink). Without a span
(the ``plain`` template) the span is the whole sequence: the results are unchanged.
"""

from __future__ import annotations

import torch

from .variants import POOLINGS

WEIGHTED = ("mean", "wmean", "mean_nosink", "wmean_nosink")


def token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-based position of each real token within its own sequence; 0 at padding."""
    mask = attention_mask.to(torch.long)
    return torch.cumsum(mask, dim=1) * mask


def pooling_weights(attention_mask: torch.Tensor, poolings: list[str], span: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """(B, P, T) float32 weights, each row summing to 1, for the weighted poolings."""
    span = attention_mask if span is None else span
    pos = token_positions(span).to(torch.float32)
    real = (pos > 0).to(torch.float32)
    n = real.sum(dim=1, keepdim=True)
    # the sink is the sequence's first token: dropped only where the span starts the sequence
    sink = ((token_positions(attention_mask) == 1) & (pos == 1)).to(torch.float32)
    single = n <= 1  # a one-token span falls back to that token for the sink-free forms
    rows = []
    for name in poolings:
        if name == "mean":
            w = real
        elif name == "wmean":
            w = pos
        elif name == "mean_nosink":
            w = torch.where(single, real, real * (1 - sink))
        elif name == "wmean_nosink":
            w = torch.where(single, pos, pos * (1 - sink))
        else:
            raise ValueError(f"{name!r} is not a weighted pooling")
        rows.append(w / w.sum(dim=1, keepdim=True).clamp_min(1e-12))
    return torch.stack(rows, dim=1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, poolings: list[str], span: torch.Tensor | None = None
         ) -> dict[str, torch.Tensor]:
    """Pool one layer's hidden states (B, T, D) into {pooling: (B, D) float32} (``span``: see module doc)."""
    unknown = [p for p in poolings if p not in POOLINGS]
    if unknown:
        raise ValueError(f"unknown pooling(s) {unknown}: choose from {', '.join(POOLINGS)}")
    out: dict[str, torch.Tensor] = {}
    h32 = hidden.float()
    weighted = [p for p in poolings if p in WEIGHTED]
    if weighted:
        w = pooling_weights(attention_mask, weighted, span).to(h32.device)
        pooled = torch.bmm(w, h32)  # (B, P, D)
        for i, name in enumerate(weighted):
            out[name] = pooled[:, i]
    if "last" in poolings or "first" in poolings:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if "last" in poolings:
            out["last"] = h32[rows, token_positions(attention_mask).argmax(dim=1)]
        if "first" in poolings:
            pos = token_positions(attention_mask if span is None else span)
            out["first"] = h32[rows, (pos == 1).to(torch.int8).argmax(dim=1)]
    if "max" in poolings:
        pad = (attention_mask if span is None else span).to(torch.bool).logical_not().unsqueeze(-1)
        out["max"] = h32.masked_fill(pad, float("-inf")).amax(dim=1)
    return {p: out[p] for p in poolings}

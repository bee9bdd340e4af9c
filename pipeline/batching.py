"""Token-budget batching: sort by length, then split into batches that cost the fewest padded tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# What one more forward pass costs, in padded tokens, as a share of the token budget. Small passes run
# the matmuls less efficiently and every pass pays fixed per-call work, so an extra batch is worth it
# only where it saves more padding than this. 1/64 was chosen by measurement on the CPU (BENCHMARKS.md,
# "Batches cut for the fewest padded tokens"): at the 4,096-token CPU budget, 64 tokens.
BATCH_COST_SHARE = 1 / 64


@dataclass(frozen=True)
class Batch:
    """Row indices (into the caller's list) of one batch, longest first, and its padded length."""

    indices: np.ndarray
    padded_len: int

    @property
    def padded_tokens(self) -> int:
        return int(len(self.indices) * self.padded_len)


def plan_batches(lengths: Sequence[int], *, batch_tokens: int, max_rows: int, pad_multiple: int = 1,
                 batch_cost: float | None = None) -> list[Batch]:
    """Split length-sorted rows into batches with rows x padded length <= batch_tokens and <= max_rows rows.

    Rows are sorted by descending length (stable, so equal lengths keep input order) and cut into
    runs of consecutive rows; of all such cuts this returns one with the least padded tokens plus
    ``batch_cost`` per batch (default ``BATCH_COST_SHARE`` x ``batch_tokens``), by dynamic
    programming over the cut points. A greedy fill would pad ten-token sentences to the length of
    the abstract before them; a cut per distinct length would run many tiny passes. A single row
    longer than the budget still gets a batch of its own. The caller restores input order with the
    returned indices.
    """
    if batch_tokens < 1 or max_rows < 1:
        raise ValueError("batch_tokens and max_rows must be positive")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    n = len(order)
    padded = np.maximum(1, -(-lengths[order] // pad_multiple) * pad_multiple)
    cost_per_batch = batch_tokens * BATCH_COST_SHARE if batch_cost is None else float(batch_cost)
    # a batch starting at sorted row i holds at most this many rows (at least 1)
    cap = np.maximum(1, np.minimum(max_rows, batch_tokens // padded))
    # best[j]: least cost of rows [0, j); a batch [i, j) costs (j - i) * padded[i] + cost_per_batch.
    # Forward relaxation: when row i is reached best[i] is final (every batch ends after it starts).
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    start_of = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        size = np.arange(1, min(int(cap[i]), n - i) + 1)
        cand = best[i] + size * float(padded[i]) + cost_per_batch
        ends = i + size
        better = cand < best[ends]
        best[ends[better]] = cand[better]
        start_of[ends[better]] = i
    batches: list[Batch] = []
    j = n
    while j > 0:
        i = int(start_of[j])
        batches.append(Batch(order[i:j], int(padded[i])))
        j = i
    return batches[::-1]


def padding_efficiency(real_tokens: int, padded_tokens: int) -> float:
    return real_tokens / padded_tokens if padded_tokens else 1.0

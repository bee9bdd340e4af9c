"""Token-budget batching: sort by length, pack under a padded-token budget and a row cap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Batch:
    """Row indices (into the caller's list) of one batch, longest first, and its padded length."""

    indices: np.ndarray
    padded_len: int

    @property
    def padded_tokens(self) -> int:
        return int(len(self.indices) * self.padded_len)


def plan_batches(lengths: Sequence[int], *, batch_tokens: int, max_rows: int, pad_multiple: int = 1,
                 min_fill: float = 0.8) -> list[Batch]:
    """Greedy packing of length-sorted rows so that rows x padded length <= batch_tokens.

    A single row longer than the budget still gets a batch of its own. Rows are sorted by
    descending length (stable, so equal lengths keep input order); the caller restores input
    order with the returned indices. A batch also ends before the first row shorter than
    ``min_fill`` x its longest row: on a small or mixed input (a 490-token abstract and
    ten-token sentences) the budget alone would pad every row to the longest one.
    """
    if batch_tokens < 1 or max_rows < 1:
        raise ValueError("batch_tokens and max_rows must be positive")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[Batch] = []
    start = 0
    n = len(order)
    while start < n:
        longest = int(lengths[order[start]])
        padded = max(1, -(-longest // pad_multiple) * pad_multiple)
        rows = max(1, min(max_rows, batch_tokens // padded, n - start))
        short = np.flatnonzero(lengths[order[start:start + rows]] < min_fill * longest)
        if len(short):
            rows = max(1, int(short[0]))  # that row and shorter ones start the next batch
        batches.append(Batch(order[start : start + rows], padded))
        start += rows
    return batches


def padding_efficiency(real_tokens: int, padded_tokens: int) -> float:
    return real_tokens / padded_tokens if padded_tokens else 1.0

"""Vectors already computed for the sample's texts, read as an encoder (what ``learn_mix`` takes)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..variants import Variant


class SampleVectors:
    """An encoder over vectors already computed for ``texts``."""

    def __init__(self, texts: Sequence[str], vectors: dict[Variant, np.ndarray]):
        self.row = {t: i for i, t in enumerate(texts)}
        self.vectors = vectors

    def encode(self, texts: Sequence[str]) -> "_Rows":
        return _Rows(self.vectors, np.array([self.row[t] for t in texts], dtype=np.int64))


class _Rows(Mapping):
    """{variant: its vectors of some rows}, sliced only when a variant is read (a mix reads its layers)."""

    def __init__(self, vectors: dict[Variant, np.ndarray], idx: np.ndarray):
        self.vectors, self.idx = vectors, idx

    def __getitem__(self, v: Variant) -> np.ndarray:
        return self.vectors[v][self.idx]

    def __iter__(self):
        return iter(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)

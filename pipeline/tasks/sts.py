"""STS: Spearman of the cosine of sentence pairs against gold scores. The evaluator is
``evaluate.evaluate_sts``; ``Items`` are the pairs as the probe's labelled items (``pipeline/probe``)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .. import stats
from ..evaldata import StsData
from ..evaldata import load_sts as load
from ..evaluate import unique_texts
from ..metrics import spearman
from ..norms import l2_normalize

__all__ = ["Items", "PROBE_DATA", "load", "load_labels"]
PROBE_DATA = StsData


def load_labels(path, split=None) -> StsData:
    return load(path)


def _components(rows1: np.ndarray, rows2: np.ndarray, n_texts: int) -> np.ndarray:
    """Connected components of pairs that share a text (union-find); one id per pair.

    The ids are the components' union-find roots: ``fold_ids`` deals groups in the seeded order
    of their sorted ids, so other ids (scipy's ``connected_components`` numbers them otherwise)
    would give other folds."""
    parent = np.arange(n_texts)

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(rows1, rows2):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    return np.array([find(a) for a in rows1])


class Items:
    """STS pairs as the probe's labelled items."""

    kind, metric = "sts", "cosine_spearman"
    learned_mix, unsupervised = True, False

    def __init__(self, data: StsData):
        self.data = data
        self.texts, (self.rows1, self.rows2) = unique_texts(data.sentence1, data.sentence2)
        self.gold = np.asarray(self.targets(data), dtype=np.float64)
        self.n = len(data)
        self.groups = _components(self.rows1, self.rows2, len(self.texts))

    @staticmethod
    def targets(data) -> np.ndarray:
        """Each pair's gold value (STS: its similarity score)."""
        return data.scores

    def per_item(self, m: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Cosine of each pair in ``idx``."""
        a, b = l2_normalize(m[self.rows1[idx]]), l2_normalize(m[self.rows2[idx]])
        return np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))

    def score(self, per_item: np.ndarray, idx: np.ndarray | None = None) -> float:
        gold = self.gold if idx is None else self.gold[idx]
        sims = per_item if idx is None else per_item[idx]
        return spearman(gold, sims)  # NaN for constant similarities (the last token of a template at layer 0)

    def bootstrap(self, counts: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return stats.StsBootstrap(self.gold, counts)

    def labels(self, idx: np.ndarray) -> StsData:
        d = self.data
        return StsData(d.name, [d.sentence1[i] for i in idx], [d.sentence2[i] for i in idx], self.gold[idx],
                       split=d.split)

    def fit_rows(self, idx: np.ndarray) -> np.ndarray:
        """Texts a transform may be fitted on when scoring other items: these pairs' sentences."""
        return np.unique(np.r_[self.rows1[idx], self.rows2[idx]])

    @property
    def fit_label(self) -> str:
        return f"{self.data.name}/{self.data.split} sentences of the training folds (no labels)"

"""Task adapters: STS pairs and retrieval queries as the probe's labelled items.

Each task has ``texts`` (every unique text to embed), ``n`` items, ``groups`` (items sharing a
text, kept in one fold), per-item scores of a matrix of vectors, the task's score over items,
its bootstrap, the labels of some items (for learned mixes) and the texts a transform may be
fitted on when other items are scored.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .. import stats
from ..evaldata import BeirData, StsData
from ..evaluate import unique_texts
from ..metrics import per_query_scores, search_run, spearman
from ..norms import l2_normalize


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


class StsTask:
    kind, metric = "sts", "cosine_spearman"

    def __init__(self, data: StsData):
        self.data = data
        self.texts, (self.rows1, self.rows2) = unique_texts(data.sentence1, data.sentence2)
        self.gold = np.asarray(data.scores, dtype=np.float64)
        self.n = len(data)
        self.groups = _components(self.rows1, self.rows2, len(self.texts))

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


class RetrievalTask:
    kind, metric = "retrieval", "ndcg_at_10"

    def __init__(self, data: BeirData):
        self.data = data
        self.texts, (self.doc_rows, query_rows) = unique_texts(data.doc_texts, data.query_texts)
        row_of = dict(zip(data.query_ids, query_rows))
        self.query_ids = sorted(data.qrels)  # items, in per_query_scores' order
        self.query_rows = np.array([row_of[q] for q in self.query_ids])
        self.n = len(self.query_ids)
        self.groups = self.query_rows  # queries with the same text stay in one fold

    def per_item(self, m: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """nDCG@10 (x100) of each query in ``idx`` (sorted) by exact search over every document."""
        idx = np.sort(idx)
        ids = [self.query_ids[i] for i in idx]
        run = search_run(m[self.query_rows[idx]], m[self.doc_rows], ids, self.data.doc_ids)
        return per_query_scores(run, {q: self.data.qrels[q] for q in ids})["ndcg_at_10"]

    def score(self, per_item: np.ndarray, idx: np.ndarray | None = None) -> float:
        return float(np.mean(per_item if idx is None else per_item[idx]))

    def bootstrap(self, counts: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return lambda per_item: stats.mean_bootstrap(per_item, counts)

    def labels(self, idx: np.ndarray) -> BeirData:
        d = self.data
        ids = [self.query_ids[i] for i in idx]
        qtext = dict(zip(d.query_ids, d.query_texts))
        return BeirData(d.name, d.doc_ids, d.doc_texts, ids, [qtext[q] for q in ids],
                        {q: d.qrels[q] for q in ids}, split=d.split)

    def fit_rows(self, idx: np.ndarray) -> np.ndarray:
        return np.unique(self.doc_rows)  # the corpus: unlabelled, the same for every fold

    @property
    def fit_label(self) -> str:
        return f"{self.data.name} corpus documents ({len(self.data.doc_ids)}, no labels)"


def make_task(data: StsData | BeirData):
    return StsTask(data) if isinstance(data, StsData) else RetrievalTask(data)

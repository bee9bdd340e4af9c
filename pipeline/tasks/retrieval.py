"""Retrieval: nDCG@10 of exact (or index-backed) cosine search over a BEIR corpus. The evaluator is
``evaluate.evaluate_retrieval``; ``Items`` are the judged queries as the probe's labelled items."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .. import stats
from ..evaldata import BeirData
from ..evaluate import load_retrieval as load
from ..evaluate import unique_texts
from ..metrics import per_query_scores, search_run

__all__ = ["Items", "PROBE_DATA", "load", "load_labels"]
PROBE_DATA = BeirData


def load_labels(path, split=None) -> BeirData:
    from ..evaldata import load_beir

    return load_beir(path, split=split or "test")


class Items:
    """Judged queries as the probe's labelled items."""

    kind, metric = "retrieval", "ndcg_at_10"
    learned_mix, unsupervised = True, False

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
        """The sample's documents except those judged for the queries NOT in ``idx`` (the scored fold):
        the corpus sample was drawn as every judged document plus distractors, so the scored fold's judged
        documents would tell a transform where that fold's answers lie."""
        scored = set(np.setdiff1d(np.arange(self.n), idx).tolist())
        hidden = {d for i in scored for d, rel in self.data.qrels[self.query_ids[i]].items() if rel > 0}
        keep = [r for d, r in zip(self.data.doc_ids, self.doc_rows) if d not in hidden]
        return np.unique(np.asarray(keep, dtype=np.int64))

    @property
    def fit_label(self) -> str:
        return (f"{self.data.name} corpus documents of the sample, less those judged for the scored fold's queries "
                "(no labels)")

"""Reranking: order each query's candidates (its positives among its negatives). MTEB's protocol exactly.

MTEB (``AbsTaskReranking`` with its ``RerankingEvaluator``, mteb 1.12): records
``{"query", "positive": [...], "negative": [...]}``; a record without a positive or without a negative
is skipped (MTEB drops it silently; here ``left_out`` counts it). Candidates are scored by the cosine of
their raw vectors with the query's; per query, ``map`` is scikit-learn's ``average_precision_score`` of
relevance against the cosine (the main score) and ``mrr_at_10`` the reciprocal rank of the first positive
among the ten best (0 if none); both are means over queries, x100. Nothing is fitted on the labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..evaldata import EvalDataError
from .records import data_name, read_records, require


@dataclass
class RerankingData:
    name: str
    queries: list[str]
    positives: list[list[str]]
    negatives: list[list[str]]
    split: str = "test"
    left_out: str | None = None

    def __len__(self) -> int:
        return len(self.queries)


def _texts(value, where: str, field: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise EvalDataError(f"{where}: {field} must be a list of strings")
    return [t for t in value if t.strip()]


def load(path: str | Path, *, name: str | None = None, split: str | None = None) -> RerankingData:
    from ..evaldata import _infer_split

    path = Path(path)
    records = read_records(path)
    require(records, path, ("query", "positive", "negative"))
    q, pos, neg, lost = [], [], [], 0
    for r in records:
        query = r.fields["query"]
        if query is not None and not isinstance(query, str):
            raise EvalDataError(f"{r.where}: query must be a string")
        p, n = _texts(r.fields["positive"], r.where, "positive"), _texts(r.fields["negative"], r.where, "negative")
        if not (query or "").strip() or not p or not n:
            lost += 1
            continue
        q.append(query), pos.append(p), neg.append(n)
    if not q:
        raise EvalDataError(f"{path}: no record has a query, a positive and a negative: nothing to rerank")
    return RerankingData(name or data_name(path), q, pos, neg, split or _infer_split(path.stem),
                         f"{lost} record(s) without a query, a positive or a negative skipped" if lost else None)


def query_scores(q: np.ndarray, candidates: np.ndarray, n_pos: int) -> tuple[float, float]:
    """(average precision, reciprocal rank at 10) of one query's candidates, positives first."""
    from sklearn.metrics import average_precision_score

    from ..norms import l2_normalize

    sims = l2_normalize(candidates.astype(np.float64)) @ l2_normalize(q.astype(np.float64)[None])[0]
    relevant = np.arange(len(sims)) < n_pos
    top = np.argsort(-sims, kind="stable")[:10]
    hits = np.flatnonzero(relevant[top])
    return float(average_precision_score(relevant, sims)), (1.0 / (hits[0] + 1) if len(hits) else 0.0)


class Prepared:
    def __init__(self, data: RerankingData):
        from ..evaluate import unique_texts

        self.data = data
        flat = [t for p, n in zip(data.positives, data.negatives) for t in (*p, *n)]
        self.texts, (self.query_rows, cand_rows) = unique_texts(data.queries, flat)
        self.cand_rows, start = [], 0
        for p, n in zip(data.positives, data.negatives):
            self.cand_rows.append(cand_rows[start:start + len(p) + len(n)])
            start += len(p) + len(n)
        self.fit_rows = np.unique(cand_rows)  # the candidates (no labels), as retrieval fits on its corpus
        self.fit_label = f"{data.name}/{data.split} candidate texts (no labels)"

    def score(self, m: np.ndarray) -> dict[str, float]:
        ap, rr = zip(*(query_scores(m[q], m[c], len(p)) for q, c, p in
                       zip(self.query_rows, self.cand_rows, self.data.positives)))
        return {"map": 100.0 * float(np.mean(ap)), "mrr_at_10": 100.0 * float(np.mean(rr))}

    def describe(self) -> str:
        n = sum(len(p) + len(q) for p, q in zip(self.data.positives, self.data.negatives))
        return f"{len(self.data):,} queries, {n:,} candidates"

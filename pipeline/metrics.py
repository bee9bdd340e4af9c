"""Evaluation metrics, computed the way MTEB computes them so scores compare with published ones.

STS: cosine similarity per pair, then Spearman (the main score) and Pearson against the gold
scores, x100 (MTEB's ``STSEvaluator``).

Retrieval: exact cosine search (top 100), then nDCG@10, Recall@100 and MRR@10 x100 from
``pytrec_eval`` (trec_eval's definitions, which BEIR and MTEB use):

- nDCG uses gain = graded relevance and discount log2(rank + 1); the ideal DCG ranks *all*
  judged relevant documents, retrieved or not.
- trec_eval re-sorts every run by score, descending, and breaks ties by document id in
  *descending* string order ("d9" before "d10" before "d1"): the order in the run is ignored.
- MRR@10 is ``recip_rank`` over the run cut to its first 10 documents in that same order.
  MTEB computes MRR with its own Python loop whose ties fall in the order of its search
  results instead; the two differ only when scores tie around a relevant document.
- A document counts as relevant when its grade is >= 1; a query without any retrieved
  relevant document scores 0, and the mean runs over every query in the qrels.
- No query-id == doc-id hits are removed unless asked: MTEB's default
  (``ignore_identical_ids=False``) that SciFact keeps; only tasks such as ArguAna or Quora,
  whose queries are also corpus documents, switch it on.
"""

from __future__ import annotations

import numpy as np
import pytrec_eval
from scipy import stats

from .norms import l2_normalize

STS_METRICS = ("cosine_spearman", "cosine_pearson")
RETRIEVAL_METRICS = ("ndcg_at_10", "recall_at_100", "mrr_at_10")
# Bounds the (queries x docs) similarity block held at once during exact search.
_SIM_BLOCK_ELEMENTS = 1 << 24


def _as_2d(name: str, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (rows, dim) array, got shape {x.shape}")
    return x


def spearman(gold, sims) -> float:
    """Spearman (x100) of ``sims`` against ``gold``; NaN when either is constant (undefined)."""
    gold, sims = np.asarray(gold), np.asarray(sims)
    if np.ptp(sims) == 0 or np.ptp(gold) == 0:
        return float("nan")
    return 100.0 * float(stats.spearmanr(gold, sims).statistic)


def sts_scores(emb1, emb2, gold) -> dict[str, float]:
    """Spearman and Pearson (x100) of per-pair cosine similarity against the gold scores."""
    a, b = _as_2d("emb1", emb1), _as_2d("emb2", emb2)
    gold = np.asarray(gold, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"emb1 {a.shape} and emb2 {b.shape} must have the same shape")
    if len(gold) != len(a):
        raise ValueError(f"{len(gold)} gold scores for {len(a)} pairs")
    if len(gold) < 2:
        raise ValueError("a correlation needs at least 2 pairs")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cos = np.einsum("ij,ij->i", a, b) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-24)
    # Pairs of identical vectors (a variant that gives many texts the same vector, e.g. the last token's
    # input embedding) are exact ties: rounding below what float32 inputs can resolve keeps their ranks
    # from being decided by the last bits of the arithmetic (a 6.6-point swing in Spearman, float16 vs
    # float32, on one such variant before).
    cos = np.round(cos, 9)
    return {
        "cosine_spearman": spearman(gold, cos),
        "cosine_pearson": 100.0 * float(stats.pearsonr(gold, cos).statistic),
    }


def exact_search(query_emb, doc_emb, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k: (scores, doc row indices), each (n_queries, k), best first.

    Queries are processed in blocks so memory stays bounded by ``_SIM_BLOCK_ELEMENTS``
    similarities, whatever the number of queries.
    """
    q, d = l2_normalize(_as_2d("query_emb", query_emb)), l2_normalize(_as_2d("doc_emb", doc_emb))
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != doc dim {d.shape[1]}")
    if len(d) == 0 or k < 1:
        raise ValueError(f"nothing to search: {len(d)} documents, k={k}")
    k = min(k, len(d))
    block = max(1, _SIM_BLOCK_ELEMENTS // max(1, len(d)))
    top_s = np.empty((len(q), k), dtype=np.float32)
    top_i = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), block):
        sims = q[start:start + block] @ d.T
        if k < len(d):
            part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(len(d)), sims.shape)
        part_s = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_s, axis=1, kind="stable")
        top_i[start:start + block] = np.take_along_axis(part, order, axis=1)
        top_s[start:start + block] = np.take_along_axis(part_s, order, axis=1)
    return top_s, top_i


def trec_order(doc_scores: dict[str, float]) -> list[tuple[str, float]]:
    """A run's documents in trec_eval's order: score descending, ties by doc id descending."""
    return sorted(doc_scores.items(), key=lambda item: (item[1], item[0]), reverse=True)


def per_query_scores(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]],
                     *, ignore_identical_ids: bool = False) -> dict[str, np.ndarray]:
    """nDCG@10, Recall@100 and MRR@10 (x100) of every query in ``qrels``, in sorted query-id order
    (``sorted(qrels)``); a query absent from ``run`` scores 0. The means are the reported scores."""
    if not qrels:
        raise ValueError("qrels is empty: nothing to evaluate")
    qrels = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    run = {str(q): {str(d): float(s) for d, s in docs.items() if not (ignore_identical_ids and str(d) == str(q))}
           for q, docs in run.items() if str(q) in qrels}
    main = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    top10 = {q: dict(trec_order(docs)[:10]) for q, docs in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    order = sorted(qrels)
    empty = {"ndcg_cut_10": 0.0, "recall_100": 0.0, "recip_rank": 0.0}
    return {
        "ndcg_at_10": 100.0 * np.array([main.get(q, empty)["ndcg_cut_10"] for q in order]),
        "recall_at_100": 100.0 * np.array([main.get(q, empty)["recall_100"] for q in order]),
        "mrr_at_10": 100.0 * np.array([rr.get(q, empty)["recip_rank"] for q in order]),
    }


def retrieval_scores_from_run(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]],
                              *, ignore_identical_ids: bool = False) -> dict[str, float]:
    """nDCG@10, Recall@100 and MRR@10 (x100), averaged over every query in ``qrels``.

    ``run`` maps query id -> {doc id: score}; queries absent from it score 0 and queries
    absent from ``qrels`` are ignored.
    """
    per_query = per_query_scores(run, qrels, ignore_identical_ids=ignore_identical_ids)
    return {metric: float(v.sum() / len(v)) for metric, v in per_query.items()}


def search_run(query_emb, doc_emb, query_ids, doc_ids, k_max: int = 100, *,
               ignore_identical_ids: bool = False) -> dict[str, dict[str, float]]:
    """Exact cosine search of every query over every document: query id -> {doc id: score}."""
    query_ids, doc_ids = [str(q) for q in query_ids], [str(d) for d in doc_ids]
    if len(query_ids) != len(query_emb) or len(doc_ids) != len(doc_emb):
        raise ValueError(f"ids and embeddings differ in length: {len(query_ids)} query ids for "
                         f"{len(query_emb)} queries, {len(doc_ids)} doc ids for {len(doc_emb)} docs")
    # One extra hit per query keeps k_max results after a self-hit is dropped.
    scores, idx = exact_search(query_emb, doc_emb, k_max + int(ignore_identical_ids))
    run = {}
    for q, row_s, row_i in zip(query_ids, scores, idx):
        hits = [(doc_ids[i], float(s)) for i, s in zip(row_i, row_s)
                if not (ignore_identical_ids and doc_ids[i] == q)]
        run[q] = dict(hits[:k_max])
    return run


def retrieval_scores(query_emb, doc_emb, query_ids, doc_ids, qrels: dict[str, dict[str, int]],
                     k_max: int = 100, *, ignore_identical_ids: bool = False) -> dict[str, float]:
    """Exact cosine search of every query over every document, scored against ``qrels``."""
    run = search_run(query_emb, doc_emb, query_ids, doc_ids, k_max, ignore_identical_ids=ignore_identical_ids)
    return retrieval_scores_from_run(run, qrels)

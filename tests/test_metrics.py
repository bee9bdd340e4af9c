import math

import numpy as np
import pytest

from pipeline import metrics
from pipeline.metrics import exact_search, retrieval_scores, retrieval_scores_from_run, sts_scores, trec_order


def dcg(gains):
    """trec_eval's DCG: gain = graded relevance, discount log2(rank + 1), rank from 1."""
    return sum(g / math.log2(rank + 1) for rank, g in enumerate(gains, 1))


def unit_rows_with_cosines(cosines, norms):
    """2-D vectors at the given cosine to (1, 0), with arbitrary lengths."""
    c = np.asarray(cosines)
    return np.stack([c, np.sqrt(1 - c ** 2)], axis=1) * np.asarray(norms)[:, None]


# ------------------------------------------------------------------ STS


def test_sts_spearman_and_pearson_match_hand_computation():
    gold = np.array([1.0, 2.0, 3.0, 4.0])
    cos = np.array([0.1, 0.3, 0.2, 0.9])  # ranks 1, 3, 2, 4: sum d^2 = 2
    emb1 = unit_rows_with_cosines(cos, norms=[1.0, 3.0, 0.5, 7.0])  # lengths must not matter
    emb2 = np.tile([[2.0, 0.0]], (4, 1))
    got = sts_scores(emb1, emb2, gold)
    assert got["cosine_spearman"] == pytest.approx(100 * (1 - 6 * 2 / (4 * (16 - 1))))  # 80.0
    gc, cc = gold - gold.mean(), cos - cos.mean()
    pearson = (gc * cc).sum() / math.sqrt((gc ** 2).sum() * (cc ** 2).sum())
    assert got["cosine_pearson"] == pytest.approx(100 * pearson, abs=1e-4)


def test_sts_accepts_float16_and_rejects_mismatched_shapes():
    rng = np.random.default_rng(0)
    a, b, gold = rng.normal(size=(20, 8)), rng.normal(size=(20, 8)), rng.uniform(0, 5, 20)
    full = sts_scores(a, b, gold)
    half = sts_scores(a.astype(np.float16), b.astype(np.float16), gold)
    assert half["cosine_spearman"] == pytest.approx(full["cosine_spearman"], abs=1.0)
    with pytest.raises(ValueError, match="same shape"):
        sts_scores(a, b[:, :4], gold)
    with pytest.raises(ValueError, match="gold scores"):
        sts_scores(a, b, gold[:5])


# ------------------------------------------------------------------ retrieval from a run


def test_graded_relevance_ndcg_uses_all_judged_docs_in_the_ideal_ranking():
    qrels = {"q": {"d1": 2, "d2": 1, "d3": 1}}  # d3 is never retrieved
    run = {"q": {"d2": 0.9, "x": 0.8, "d1": 0.7, "y": 0.1}}
    got = retrieval_scores_from_run(run, qrels)
    expected = dcg([1, 0, 2, 0]) / dcg([2, 1, 1])  # = 2 / 3.1309
    assert got["ndcg_at_10"] == pytest.approx(100 * expected)
    assert got["recall_at_100"] == pytest.approx(100 * 2 / 3)
    assert got["mrr_at_10"] == pytest.approx(100.0)


def test_relevant_doc_below_rank_10_scores_zero_mrr_and_ndcg_but_counts_for_recall():
    qrels = {"q": {"rel": 1}}
    run = {"q": {**{f"n{i:02d}": 1.0 - i / 100 for i in range(10)}, "rel": 0.5}}  # rel at rank 11
    got = retrieval_scores_from_run(run, qrels)
    assert got == pytest.approx({"ndcg_at_10": 0.0, "recall_at_100": 100.0, "mrr_at_10": 0.0})


def test_score_ties_break_by_doc_id_descending_like_trec_eval():
    # "b" > "a" and "d9" > "d10" as strings, so each relevant doc lands at rank 2 whatever the run order.
    for run in ({"q": {"a": 0.5, "b": 0.5}}, {"q": {"b": 0.5, "a": 0.5}}):
        got = retrieval_scores_from_run(run, {"q": {"a": 1}})
        assert got["mrr_at_10"] == pytest.approx(50.0)
        assert got["ndcg_at_10"] == pytest.approx(100 * dcg([0, 1]) / dcg([1]))
    got = retrieval_scores_from_run({"q": {"d10": 1.0, "d9": 1.0}}, {"q": {"d10": 1}})
    assert got["mrr_at_10"] == pytest.approx(50.0)
    assert [d for d, _ in trec_order({"d1": 1.0, "d10": 1.0, "d9": 1.0, "z": 0.5})] == ["d9", "d10", "d1", "z"]


def test_mrr_cutoff_follows_tie_order_not_run_order():
    # Eleven tied docs: the relevant "a00" is listed first but trec_eval ranks it 11th.
    run = {"q": {f"a{i:02d}": 0.7 for i in range(11)}}
    got = retrieval_scores_from_run(run, {"q": {"a00": 1}})
    assert got["mrr_at_10"] == 0.0
    assert got["recall_at_100"] == 100.0


def test_mean_runs_over_all_judged_queries_and_ignores_unjudged_ones():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 1}}
    run = {"q1": {"a": 0.9, "z": 0.1}, "q2": {"z": 0.9, "y": 0.8},  # q2 finds nothing, q3 is absent
           "unjudged": {"a": 1.0}}
    got = retrieval_scores_from_run(run, qrels)
    assert got == pytest.approx({"ndcg_at_10": 100 / 3, "recall_at_100": 100 / 3, "mrr_at_10": 100 / 3})


def test_identical_ids_are_kept_by_default_and_dropped_on_request():
    qrels, run = {"q": {"d": 1}}, {"q": {"q": 0.9, "d": 0.8}}
    assert retrieval_scores_from_run(run, qrels)["mrr_at_10"] == pytest.approx(50.0)
    assert retrieval_scores_from_run(run, qrels, ignore_identical_ids=True)["mrr_at_10"] == pytest.approx(100.0)


def test_empty_qrels_is_an_error():
    with pytest.raises(ValueError, match="qrels is empty"):
        retrieval_scores_from_run({"q": {"d": 1.0}}, {})


# ------------------------------------------------------------------ retrieval from embeddings


def test_exact_search_blocks_match_a_full_sort(monkeypatch):
    rng = np.random.default_rng(1)
    q, d = rng.normal(size=(37, 16)), rng.normal(size=(300, 16))
    sims = metrics.l2_normalize(q) @ metrics.l2_normalize(d).T
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    monkeypatch.setattr(metrics, "_SIM_BLOCK_ELEMENTS", 1000)  # 3 queries per block
    scores, idx = exact_search(q * 5.0, d, 10)
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, axis=1), atol=1e-6)
    assert exact_search(q, d[:4], 10)[1].shape == (37, 4)  # k above the corpus size is capped


def test_retrieval_scores_from_embeddings_uses_cosine_not_dot_product():
    # d_long has the larger dot product with the query but the smaller cosine.
    query = np.array([[1.0, 0.0]])
    docs = np.array([[10.0, 10.0], [1.0, 0.1]])
    got = retrieval_scores(query, docs, ["q"], ["d_long", "d_close"], {"q": {"d_close": 1}})
    assert got["mrr_at_10"] == pytest.approx(100.0)


def test_retrieval_scores_checks_id_counts():
    with pytest.raises(ValueError, match="differ in length"):
        retrieval_scores(np.ones((2, 3)), np.ones((4, 3)), ["q"], ["a", "b", "c", "d"], {"q": {"a": 1}})


def test_pairs_of_identical_vectors_are_exact_ties_whatever_the_storage_dtype():
    """A variant that gives many texts one vector: its pairs tie exactly, so float16 storage (or
    the arithmetic's last bits) cannot reorder them."""
    from scipy import stats

    from pipeline.metrics import sts_scores

    rng = np.random.default_rng(0)
    pool = rng.standard_normal((5, 64)).astype(np.float32)  # five distinct vectors, reused
    i, j = rng.integers(0, 5, 400), rng.integers(0, 5, 400)
    a, b, gold = pool[i], pool[j], rng.random(400) * 5
    s32 = sts_scores(a, b, gold)["cosine_spearman"]
    s16 = sts_scores(a.astype(np.float16).astype(np.float32), b.astype(np.float16).astype(np.float32), gold)
    assert s16["cosine_spearman"] == pytest.approx(s32, abs=1e-9)
    # the plainly written reference: cosine of the 5x5 distinct pairs, ties given the same rank
    cos = (pool / np.linalg.norm(pool, axis=1, keepdims=True)) @ (pool / np.linalg.norm(pool, axis=1, keepdims=True)).T
    assert s32 == pytest.approx(100 * stats.spearmanr(gold, np.round(cos[i, j], 6)).statistic, abs=1e-9)


def test_spearman_is_scipys_x100_and_undefined_for_constant_input():
    from scipy import stats as st

    from pipeline.metrics import spearman

    rng = np.random.default_rng(0)
    gold, sims = rng.uniform(0, 5, 50), rng.normal(size=50)
    assert spearman(gold, sims) == pytest.approx(100 * st.spearmanr(gold, sims).statistic)
    assert np.isnan(spearman(gold, np.ones(50))) and np.isnan(spearman(np.ones(50), sims))

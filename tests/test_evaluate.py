"""Evaluators on both engines, anchored on MTEB's published all-MiniLM-L6-v2 scores."""

import json

import numpy as np
import pytest
from conftest import data_file

from pipeline import Encoder, Variant, resolve
from pipeline.cli import main
from pipeline.evaldata import BeirData, StsData
from pipeline.evaluate import RayEncoder, eval_retrieval, eval_sts, evaluate_retrieval, evaluate_sts
from pipeline.index import load_index
from pipeline.runner import read_embeddings

MINILM = dict(layers="-1", poolings="mean", max_length=256)


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("anchor")


@pytest.fixture(scope="module")
def minilm_ray(minilm_dir):
    return RayEncoder(resolve("all-minilm-l6-v2", **MINILM), minilm_dir, progress=False)


def _pairs(n=40, seed=0) -> StsData:
    rng = np.random.default_rng(seed)
    words = "cat dog bird fish tree house river stone cloud light".split()
    s1 = [" ".join(rng.choice(words, 6)) for _ in range(n)]
    s2 = [" ".join(rng.choice(words, 5)) for _ in range(n)]
    s2[3] = s1[0]  # a sentence on both sides: embedded once, used twice
    return StsData("pairs", s1, s2, np.arange(n, dtype=float) % 6)


def _score(rows, metric):
    (row,) = [r for r in rows if r["metric"] == metric]
    return row["score"]


def test_local_and_ray_engines_give_the_same_scores(ray_local, model_dir, tmp_path):
    """The in-process Encoder and the cached Ray pipeline are two encoders of one evaluator."""
    request = resolve(model_dir, layers="all", poolings="mean,last,wmean_nosink")
    local = Encoder.from_request(request)
    ray_enc = RayEncoder(request, tmp_path / "cache", progress=False)
    data = _pairs()
    docs = [f"document {i} about " + " ".join(["river", "stone", "cloud"][: 1 + i % 3]) for i in range(30)]
    beir = BeirData("tiny-beir", [f"d{i}" for i in range(30)], docs, ["q1", "q2", "q3"],
                    ["about river", "about stone cloud", "document 7"],
                    {"q1": {"d0": 1, "d3": 1}, "q2": {"d2": 1}, "q3": {"d7": 2}})
    for evaluate, d in ((evaluate_sts, data), (evaluate_retrieval, beir)):
        a, b = evaluate(local, d), evaluate(ray_enc, d)
        assert len(a) == len(b) == len(request.variants) * (2 if evaluate is evaluate_sts else 3)
        key = lambda r: (r["metric"], r["layer"], r["pooling"])  # noqa: E731
        for ra, rb in zip(sorted(a, key=key), sorted(b, key=key)):
            assert key(ra) == key(rb) and ra["score"] == pytest.approx(rb["score"], abs=1e-3), key(ra)
    # the Ray cache embedded each unique text once, and a second pass embeds nothing
    unique = len(set(data.sentence1) | set(data.sentence2) | set(beir.doc_texts) | set(beir.query_texts))
    assert read_embeddings(str(tmp_path / "cache")).num_rows == unique
    assert ray_enc.stage(data.sentence1)[1] == 0 and len(list((tmp_path / "cache" / "inputs").iterdir())) == 2


@pytest.mark.slow
def test_stsb_anchor_and_cached_reevaluation(ray_local, minilm_dir, minilm_ray):
    rows = eval_sts(data_file("stsb", "sts-test.csv"), minilm_dir, minilm_ray)
    assert abs(_score(rows, "cosine_spearman") - 82.03) <= 0.5
    committed = json.loads((minilm_dir / "manifest.json").read_text())["shards"]
    again = eval_sts(data_file("stsb", "sts-test.csv"), minilm_dir, minilm_ray)
    assert json.loads((minilm_dir / "manifest.json").read_text())["shards"] == committed  # nothing re-embedded
    assert again == rows


@pytest.mark.slow
def test_scifact_anchor(ray_local, minilm_dir, minilm_ray):
    rows = eval_retrieval(data_file("scifact"), minilm_dir, minilm_ray)
    assert abs(_score(rows, "ndcg_at_10") - 64.51) <= 0.5
    assert {r["metric"] for r in rows} == {"ndcg_at_10", "recall_at_100", "mrr_at_10"}
    results = json.loads((minilm_dir / "eval" / "results.json").read_text())
    assert {r["dataset"] for r in results} == {"stsb", "scifact"}
    assert all(set(r) == {"task", "dataset", "split", "metric", "layer", "pooling", "template", "mix", "transform",
                          "score"} for r in results)
    assert all((r["template"], r["mix"], r["transform"]) == ("plain", None, "none") for r in results)


def test_cli_eval_index_report_round_trip(ray_local, model_dir, tmp_path, capsys):
    model = model_dir
    pairs = tmp_path / "pairs.jsonl"
    rng = np.random.default_rng(0)
    words = "cat dog bird fish tree house river stone cloud light".split()
    with pairs.open("w") as f:
        for i in range(40):
            a = " ".join(rng.choice(words, 6))
            f.write(json.dumps({"sentence1": a, "sentence2": " ".join(rng.choice(words, 5)), "score": float(i % 6)}) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "sts", str(pairs), "--output", str(out), "--model", model, "--layers", "all",
                 "--poolings", "mean,last", "--engine", "ray", "-q"]) == 0
    rows = json.loads((out / "eval" / "results.json").read_text())
    assert {(r["layer"], r["pooling"]) for r in rows} == {(L, p) for L in range(5) for p in ("mean", "last")}
    assert main(["report", str(out)]) == 0
    # the report names the best variant of the results, and the gain over the model's L4.last
    spearman = {(r["layer"], r["pooling"]): r["score"] for r in rows if r["metric"] == "cosine_spearman"}
    (layer, pooling) = max(spearman, key=lambda k: (spearman[k], -k[0]))
    report = (out / "report.md").read_text()
    assert f"Best: **`L{layer}.{pooling}`**, cosine_spearman = {spearman[(layer, pooling)]:.2f}" in report
    assert f"default `L4.last` = {spearman[(4, 'last')]:.2f}" in report
    assert (out / "heatmap_pairs.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["index", str(out), "--variants", "L2.mean", "--kind", "flat"]) == 0
    table = read_embeddings(str(out))
    ids = table.column("id").to_pylist()
    x = np.stack(table.column("emb_2_mean").to_numpy(zero_copy_only=False)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores, got = load_index(out / "indexes" / "L2.mean.faiss").search(x[:5], 3)
    want = np.argsort(-(x[:5] @ x.T), axis=1)[:, :3]
    assert got == [[ids[j] for j in row] for row in want]
    np.testing.assert_allclose(scores, np.take_along_axis(x[:5] @ x.T, want, axis=1), atol=1e-5)
    capsys.readouterr()


def test_derived_variants_score_like_an_independent_reference(model_dir, tmp_path):
    """Transforms fitted on the evaluated texts (no labels) and mixes, scored beside the raw grid;
    the whitened score equals numpy + scipy written plainly; learned weights come from train only."""
    from scipy.stats import spearmanr

    from pipeline.derive import Derivations
    from pipeline.report import write_report
    from pipeline.variants import parse_mixes

    request = resolve(model_dir, layers="1:4", poolings="mean,last")
    enc = Encoder.from_request(request)
    test, train = _pairs(40, seed=0), _pairs(60, seed=7)
    train.name, train.split = "pairs-train", "train"
    d = Derivations(mixes=parse_mixes("1:4,learned:1:4", 4), transforms=("none", "center", "whiten8"),
                    mix_labels=train)
    rows = eval_sts(test, tmp_path, enc, d)
    spearman = {(r["layer"], r["pooling"], r["mix"], r["transform"]): r for r in rows
                if r["metric"] == "cosine_spearman"}
    assert len(spearman) == (8 + 2 + 2) * 3  # (raw + uniform + learned) x (none, center, whiten8)
    # independent reference for L2.mean|whiten8: numpy eigh on the test sentences' vectors
    texts = list(dict.fromkeys(test.sentence1 + test.sentence2))
    x = enc.encode(texts)[Variant(2, "mean")].astype(np.float64)
    mu = x.mean(0)
    vals, vecs = np.linalg.eigh(np.cov(x - mu, rowvar=False, bias=True))
    w = vecs[:, ::-1][:, :8] / np.sqrt(vals[::-1][:8])
    at = {t: i for i, t in enumerate(texts)}
    a = (x[[at[t] for t in test.sentence1]] - mu) @ w
    b = (x[[at[t] for t in test.sentence2]] - mu) @ w
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    row = spearman[(2, "mean", None, "whiten8")]
    assert row["score"] == pytest.approx(100 * spearmanr(cos, test.scores).statistic, abs=1e-3)
    assert "transform fitted on pairs/test sentences" in row["fitted_on"] and "no labels" in row["fitted_on"]
    learned = spearman[(4, "mean", "learned:1-4", "none")]
    assert "mix weights fitted on pairs-train/train (60 labelled pairs)" in learned["fitted_on"]
    mix_file = json.loads((tmp_path / "mixes" / "pairs.W1-4.mean.json").read_text())
    assert len(mix_file["weights"]) == 4 and abs(sum(mix_file["weights"]) - 1) < 1e-6
    assert (tmp_path / "transforms" / "pairs" / "L2.mean_whiten8.json").is_file()
    report = (tmp_path / "report.md").exists() or write_report(rows, tmp_path, 4)
    md = (tmp_path / "report.md").read_text()
    assert "| best learned mix | `W1-4." in md and "| best uniform mix | `M1-4." in md and report
    assert "![weights of W1-4.mean]" in md

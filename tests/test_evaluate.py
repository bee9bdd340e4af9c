"""Evaluation through the pipeline, anchored on MTEB's published all-MiniLM-L6-v2 scores."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.evaluate import eval_retrieval, eval_sts
from pipeline.index import load_index
from pipeline.runner import read_embeddings

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MINILM = dict(model="all-minilm-l6-v2", layers="-1", poolings="mean", max_length=256, progress=False)




@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("anchor")


def _score(rows, metric):
    (row,) = [r for r in rows if r["metric"] == metric]
    return row["score"]


@pytest.mark.slow
def test_stsb_anchor_and_cached_reevaluation(ray_local, minilm_dir):
    rows = eval_sts(DATA / "stsb" / "sts-test.csv", minilm_dir, **MINILM)
    assert abs(_score(rows, "cosine_spearman") - 82.03) <= 0.5
    again = eval_sts(DATA / "stsb" / "sts-test.csv", minilm_dir, **MINILM)
    assert json.loads((minilm_dir / "manifest.json").read_text())["last_run"]["shards_embedded"] == 0
    assert again == rows


@pytest.mark.slow
def test_scifact_anchor(ray_local, minilm_dir):
    rows = eval_retrieval(DATA / "scifact", minilm_dir, **MINILM)
    assert abs(_score(rows, "ndcg_at_10") - 64.51) <= 0.5
    assert {r["metric"] for r in rows} == {"ndcg_at_10", "recall_at_100", "mrr_at_10"}
    results = json.loads((minilm_dir / "eval" / "results.json").read_text())
    assert {r["dataset"] for r in results} == {"stsb", "scifact"}
    assert all(set(r) == {"task", "dataset", "split", "metric", "layer", "pooling", "score"} for r in results)


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
                 "--poolings", "mean,last", "-q"]) == 0
    rows = json.loads((out / "eval" / "results.json").read_text())
    assert {(r["layer"], r["pooling"]) for r in rows} == {(L, p) for L in range(5) for p in ("mean", "last")}
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text().count("L") > 0 and (out / "heatmap_pairs.png").read_bytes()[:4] == b"\x89PNG"

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


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["embed", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    assert main(["encode", "--layers", "99", "x"]) == 2
    assert "out of range" in capsys.readouterr().err

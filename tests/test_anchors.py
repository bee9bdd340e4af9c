"""MTEB's published all-MiniLM-L6-v2 scores, reproduced: STS-B and SciFact through the Ray engine's cached
evaluator, Banking77 and MasakhaNEWS through the CLI with default flags.

One file, so pytest-xdist hands it to a worker first (``make test`` keeps the collection order): the
SciFact anchor embeds 5,183 abstracts and is the suite's longest test; started last, it would run alone
at the end while the other worker idles."""

import json

import pytest
from conftest import data_file

from pipeline import resolve
from pipeline.cli import main
from pipeline.evaluate import RayEncoder, eval_retrieval, eval_sts

MINILM = dict(layers="-1", poolings="mean", max_length=256)
MINILM_CLI = ["--model", "all-minilm-l6-v2", "--normalize", "-q"]


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("anchor")


@pytest.fixture(scope="module")
def minilm_ray(minilm_dir):
    return RayEncoder(resolve("all-minilm-l6-v2", **MINILM), minilm_dir, progress=False)


def _score(rows, metric):
    (row,) = [r for r in rows if r["metric"] == metric]
    return row["score"]


def _rows(out):
    return json.loads((out / "eval" / "results.json").read_text())


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


def test_banking77_anchor_through_the_cli(tmp_path):
    """MTEB's Banking77Classification, all-MiniLM-L6-v2: 80.04 accuracy (mteb 1.12.75)."""
    out = tmp_path / "out"
    assert main(["eval", "classification", str(data_file("banking77")), "--output", str(out), *MINILM_CLI]) == 0
    rows = _rows(out)
    assert _score(rows, "accuracy") == pytest.approx(80.04, abs=0.5)
    assert {r["metric"] for r in rows} == {"accuracy", "f1", "f1_weighted"}
    assert {r["protocol"] for r in rows} == {"logreg, 8 per label x 10"}


def test_masakhanews_anchor_through_the_cli(tmp_path):
    """MTEB's MasakhaNEWSClusteringS2S (eng), all-MiniLM-L6-v2: 41.09 V-measure over 5 sets (mteb 1.12.75)."""
    out = tmp_path / "out"
    assert main(["eval", "clustering", str(data_file("masakhanews-clustering")), "--output", str(out), *MINILM_CLI]) == 0
    rows = _rows(out)
    assert _score(rows, "v_measure") == pytest.approx(41.09, abs=1.0)
    assert {r["protocol"] for r in rows} == {"original"}
    # the fast protocol is its own group of rows, beside the original one
    assert main(["eval", "clustering", str(data_file("masakhanews-clustering")), "--output", str(out),
                 "--protocol", "fast", *MINILM_CLI]) == 0
    assert {r["protocol"] for r in _rows(out)} == {"original", "fast"}

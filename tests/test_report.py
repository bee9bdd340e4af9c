import json
import struct

import pytest

from pipeline.report import ResultsError, best_variants, families, load_results, validate_rows, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_rows():
    """Two datasets over layers 0, 2, 4 x three poolings; known best cells."""
    rows = []
    for layer in (0, 2, 4):
        for j, pooling in enumerate(("last", "mean", "mean_nosink")):
            sts = 40 + 5 * layer + 3 * j  # best: L4.mean_nosink = 66
            ret = 30 + 10 * (layer == 2) + 2 * j  # best: L2.mean_nosink = 44
            rows += [
                {"task": "sts", "dataset": "stsb", "split": "test", "metric": "cosine_spearman",
                 "layer": layer, "pooling": pooling, "score": sts},
                {"task": "sts", "dataset": "stsb", "split": "test", "metric": "cosine_pearson",
                 "layer": layer, "pooling": pooling, "score": sts - 1},
                {"task": "retrieval", "dataset": "scifact", "split": "test", "metric": "ndcg_at_10",
                 "layer": layer, "pooling": pooling, "score": ret},
                {"task": "retrieval", "dataset": "scifact", "split": "test", "metric": "recall_at_100",
                 "layer": layer, "pooling": pooling, "score": 99.0 - layer},  # must not decide the best
            ]
    return rows


def test_best_variant_and_gain_over_last_layer_last_token():
    best = best_variants(synthetic_rows())
    assert best["stsb"]["variant"] == "L4.mean_nosink" and best["stsb"]["score"] == 66
    assert best["stsb"]["default"] == "L4.last" and best["stsb"]["gain"] == pytest.approx(66 - 60)
    assert best["scifact"]["variant"] == "L2.mean_nosink" and best["scifact"]["metric"] == "ndcg_at_10"
    assert best["scifact"]["gain"] == pytest.approx(44 - 30)


def test_declared_depth_without_that_layer_gives_no_gain():
    best = best_variants(synthetic_rows(), n_layers=30)
    assert best["stsb"]["default"] == "L30.last" and best["stsb"]["gain"] is None


def test_ties_go_to_the_shallower_layer():
    rows = [{"task": "sts", "dataset": "d", "split": "test", "metric": "cosine_spearman", "layer": layer,
             "pooling": "mean", "score": 50.0} for layer in (7, 3, 5)]
    assert best_variants(rows)["d"]["variant"] == "L3.mean"


def test_report_states_best_variant_and_gain(tmp_path):
    paths = write_report(synthetic_rows(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert paths["report"] == tmp_path / "report.md"
    assert "Best: **`L4.mean_nosink`**, cosine_spearman = 66.00" in md
    assert "default `L4.last` = 60.00, gain **+6.00**" in md
    assert "Best: **`L2.mean_nosink`**, ndcg_at_10 = 44.00" in md and "gain **+14.00**" in md
    assert "### recall_at_100" in md and "### cosine_pearson" in md  # other metrics tabled too
    assert "| 4 | 60.00 | 63.00 | **66.00** |" in md  # layer row of the main table, best in bold


def test_results_json_round_trips_sorted(tmp_path):
    rows = synthetic_rows()
    write_report(list(reversed(rows)), tmp_path)
    loaded = load_results(tmp_path / "eval" / "results.json")
    key = lambda r: (r["dataset"], r["metric"], r["layer"], r["pooling"])  # noqa: E731
    # rows written without the variant fields of templates, mixes and transforms read as raw plain cells
    plain = {"template": "plain", "mix": None, "transform": "none"}
    assert sorted(loaded, key=key) == sorted(({**r, **plain, "score": float(r["score"])} for r in rows), key=key)
    assert (tmp_path / "eval" / "results.json").read_text() == json.dumps(loaded, indent=1) + "\n"
    write_report(rows, tmp_path / "again")
    assert (tmp_path / "again" / "eval" / "results.json").read_bytes() == \
        (tmp_path / "eval" / "results.json").read_bytes()  # input order does not matter


def test_heatmaps_are_valid_pngs_per_dataset(tmp_path):
    paths = write_report(synthetic_rows(), tmp_path)
    assert sorted(p.name for p in paths["heatmaps"]) == ["heatmap_scifact.png", "heatmap_stsb.png"]
    for png in paths["heatmaps"]:
        head = png.read_bytes()[:24]
        assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
        width, height = struct.unpack(">II", head[16:24])
        assert 200 <= width <= 3000 and 200 <= height <= 3000
        assert png.name in (tmp_path / "report.md").read_text()


def test_bad_rows_name_the_problem(tmp_path):
    row = synthetic_rows()[0]
    with pytest.raises(ResultsError, match="lacks score"):
        best_variants([{k: v for k, v in row.items() if k != "score"}])
    with pytest.raises(ResultsError, match=r"repeats stsb/test cosine_spearman L0\.last"):
        best_variants([row, dict(row)])
    (tmp_path / "r.json").write_text('{"not": "a list"}')
    with pytest.raises(ResultsError, match="expected a list"):
        load_results(tmp_path / "r.json")


def test_families_table_picks_each_familys_best_and_its_gains(tmp_path):
    base = {"task": "sts", "dataset": "d", "split": "test", "metric": "cosine_spearman"}
    rows = [
        {**base, "layer": 4, "pooling": "last", "score": 20.0},  # the default L4.last
        {**base, "layer": 2, "pooling": "mean", "score": 50.0},  # best raw cell
        {**base, "layer": 3, "pooling": "mean", "score": 45.0},
        {**base, "layer": 2, "pooling": "mean", "transform": "whiten8", "score": 61.0,
         "fitted_on": "transform fitted on d/test sentences (40 texts, no labels)"},
        {**base, "layer": 4, "pooling": "mean", "mix": "uniform:1-4", "score": 55.0},
        {**base, "layer": 4, "pooling": "mean", "mix": "learned:1-4", "score": 58.0,
         "fitted_on": "mix weights fitted on d-train/train (60 labelled pairs)"},
        {**base, "layer": 3, "pooling": "last", "template": "prompteol", "score": 52.0},
    ]
    fams = {f["family"]: f for f in families(validate_rows(rows), "cosine_spearman", 20.0)}
    assert [(k, f["variant"], f["gain_default"], f["gain_raw"]) for k, f in fams.items()] == [
        ("best raw cell", "L2.mean", 30.0, 0.0),
        ("best with post-processing", "L2.mean|whiten8", 41.0, 11.0),
        ("best uniform mix", "M1-4.mean", 35.0, 5.0),
        ("best learned mix", "W1-4.mean", 38.0, 8.0),
        ("best with template prompteol", "prompteol/L3.last", 32.0, 2.0)]
    assert fams["best learned mix"]["fitted_on"].startswith("mix weights fitted on d-train/train")
    best = best_variants(rows, n_layers=4)["d"]
    assert best["variant"] == "L2.mean|whiten8" and best["gain"] == 41.0 and best["default"] == "L4.last"
    write_report(rows, tmp_path, n_layers=4)
    md = (tmp_path / "report.md").read_text()
    assert "| best with post-processing | `L2.mean\\|whiten8` | 61.00 | +41.00 | +11.00 | transform fitted on" in md
    assert (tmp_path / "heatmap_d_prompteol.png").is_file() and (tmp_path / "heatmap_d.png").is_file()

"""`strata demo` end to end on a small data folder and the tiny model: the report, the heatmaps and
the printed bests agree with the results, and the default is the model's own last layer."""

import json

from pipeline.demo import run_demo
from pipeline.report import best_variants


def _data(root):
    (root / "stsb").mkdir(parents=True)
    words = "red green blue small large round square soft hard warm".split()
    lines = []
    for i in range(24):
        a = " ".join(words[(i + k) % 10] for k in range(5))
        b = " ".join(words[(2 * i + k) % 10] for k in range(4))
        lines.append(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{i % 6}.000\t{a}\t{b}")
    (root / "stsb" / "sts-test.csv").write_text("\n".join(lines) + "\n")
    beir = root / "scifact"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{i}", "title": f"doc {i}", "text": " ".join(words[i % 10:] + words[:i % 3])}) + "\n"
        for i in range(30)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": words[i]}) + "\n" for i in range(5)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(5)))


def test_demo_reports_the_bests_it_prints(ray_local, model_dir, tmp_path, capsys):
    _data(tmp_path / "data")
    out = tmp_path / "demo"
    assert run_demo(out, quick=True, data=tmp_path / "data", model=model_dir) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "eval" / "results.json").read_text())
    assert {r["dataset"] for r in rows} == {"stsb", "scifact-subset"}
    assert {r["layer"] for r in rows} == set(range(5))  # layers=all of a 4-block model
    for dataset, best in best_variants(rows, n_layers=4).items():
        assert best["default"] == "L4.last"  # the model's depth, not SmolLM2's 30
        assert f"{dataset}: best {best['variant']} {best['metric']} = {best['score']:.2f} (L4.last: " in printed
        assert (out / f"heatmap_{dataset}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"Best: **`{best['variant']}`**" in (out / "report.md").read_text()


def test_vendored_demo_data_is_the_demo_subset_of_the_full_sets():
    """The demo runs from the package's own copy (with its licences); it is exactly what it read from
    the full sets (next test, where they are at hand)."""
    from pipeline.demo import DEMO_DATA
    from pipeline.evaldata import load_beir, load_sts

    vendored = load_beir(DEMO_DATA / "scifact", split="test")
    assert (len(vendored.query_ids), len(vendored.doc_ids)) == (60, 400)
    assert len(load_sts(DEMO_DATA / "stsb" / "sts-test.csv")) == 1379
    for licence in ("stsb/LICENSE.txt", "scifact/NOTICE.md", "README.md"):
        assert (DEMO_DATA / licence).stat().st_size > 500


def test_vendored_demo_data_equals_the_subset_of_the_full_sets():
    from conftest import data_file

    from pipeline.demo import DEMO_DATA, SCIFACT_SUBSET
    from pipeline.evaldata import load_beir

    vendored = load_beir(DEMO_DATA / "scifact", split="test")
    n, docs = SCIFACT_SUBSET["max_queries"], SCIFACT_SUBSET["max_docs"]
    full = load_beir(data_file("scifact"), split="test").subset(n, docs)
    again = vendored.subset(n, docs)
    assert (again.query_ids, again.doc_ids, again.doc_texts, again.qrels) == \
        (full.query_ids, full.doc_ids, full.doc_texts, full.qrels)
    assert data_file("stsb", "sts-test.csv").read_bytes() == (DEMO_DATA / "stsb" / "sts-test.csv").read_bytes()

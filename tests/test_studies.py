"""Every study in studies/ runs end to end on tiny data, and its figures have the expected shape.

The studies are plain scripts (``python studies/NAME.py``) outside the installed package. Each is
loaded here by its path and its ``main(argv)`` run top to bottom, on the tiny random LLaMA
(``model_dir``) and a few rows of the vendored demo data (STS-B test, the SciFact subset), so no
../shared is needed; the two Ray studies share one local Ray. One child process runs every script
as a user does (``--help``, from another folder). What is checked is shape (rows, columns, sizes,
the files written), never the figures themselves. Studies use the public API only (checked too).
"""

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.demo import DEMO_DATA

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "studies"
NAMES = ["activations", "checksums", "classification_cost", "families", "float16", "index_memory", "index_recall", "index_update",
         "nightly", "probe_curve", "quantize", "scale_check", "tasks_grid"]


def load_study(name: str):
    """studies/NAME.py as a module (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(f"studies_{name}", STUDIES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(module)  # its classes reach Ray workers by value, as from __main__
    return module


def table_rows(md: str, head: str) -> list[list[str]]:
    """The body rows of the first Markdown table whose header starts with ``head``, as cells."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """torch on one thread while the studies run in this process: two OpenMP threads on a busy 2-core
    machine spin against each other (a tiny model's step is all barriers)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """stsb/ (train, dev, test: slices of the demo's STS-B test, 40/30/30 pairs, and train repeats one test
    pair), probe-sts.csv (150 other pairs) and scifact/ (the demo subset's first 80 documents with every judged
    one, 130 in all; its 60 judged queries split into train and test qrels of 30 each, and train judges one
    more query, ``again``, asked in test too). The repeats are what the real sets have (STS-B repeats pairs
    across splits, SciFact asks two claims in train and test): a study must leave them out of its fits."""
    root = tmp_path_factory.mktemp("data")
    sts = (DEMO_DATA / "stsb" / "sts-test.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "stsb").mkdir()
    for name, part in (("train", sts[:40] + sts[70:71]), ("dev", sts[40:70]), ("test", sts[70:100])):
        (root / "stsb" / f"sts-{name}.csv").write_text("".join(part), encoding="utf-8")
    (root / "probe-sts.csv").write_text("".join(sts[100:250]), encoding="utf-8")  # 150 pairs: a 100-item draw
    src, dst = DEMO_DATA / "scifact", root / "scifact"
    (dst / "qrels").mkdir(parents=True)
    head, *qrels = (src / "qrels" / "test.tsv").read_text().splitlines()
    queries = list(dict.fromkeys(line.split("\t")[0] for line in qrels))
    judged = {line.split("\t")[1] for line in qrels}
    train_q = set(queries[: len(queries) // 2])
    asked_twice = next(line for line in qrels if line.split("\t")[0] not in train_q)  # a test query, in train too
    for split, keep in (("train", train_q), ("test", set(queries) - train_q)):
        body = [line for line in qrels if line.split("\t")[0] in keep]
        body += ["\t".join(["again", *asked_twice.split("\t")[1:]])] if split == "train" else []
        (dst / "qrels" / f"{split}.tsv").write_text("\n".join([head, *body]) + "\n")
    docs = [line for i, line in enumerate((src / "corpus.jsonl").read_text().splitlines())
            if i < 80 or json.loads(line)["_id"] in judged]
    (dst / "corpus.jsonl").write_text("\n".join(docs) + "\n")
    text = {q["_id"]: q["text"] for q in map(json.loads, (src / "queries.jsonl").read_text().splitlines())}
    again = json.dumps({"_id": "again", "text": text[asked_twice.split("\t")[0]], "metadata": {}})
    (dst / "queries.jsonl").write_text((src / "queries.jsonl").read_text().rstrip("\n") + "\n" + again + "\n")
    return root


def test_every_study_is_here_and_runs_as_a_script_from_another_folder(tmp_path):
    assert sorted(p.stem for p in STUDIES.glob("*.py")) == NAMES
    code = ("import runpy, sys\n"
            f"for name in {NAMES!r}:\n"
            f"    path = {str(STUDIES)!r} + '/' + name + '.py'\n"
            "    sys.argv = [path, '--help']\n"
            "    try:\n"
            "        runpy.run_path(path, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code in (0, None), (name, e.code)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in NAMES:
        assert f"usage: python studies/{name}.py" in proc.stdout, name


def test_studies_import_no_private_names():
    for name in NAMES:
        tree = ast.parse((STUDIES / f"{name}.py").read_text())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not node.module.startswith(("studies", ".")) and node.level == 0, (name, node.module)
                assert not any(a.name.startswith("_") for a in node.names), (name, node.module)
                modules |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                modules |= {a.asname or a.name.split(".")[0] for a in node.names}
        private = [f"{n.value.id}.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                   and isinstance(n.value, ast.Name) and n.value.id in modules and n.attr.startswith("_")
                   and not n.attr.startswith("__")]
        assert not private, (name, private)


def test_families(model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    assert load_study("families").main(["--model", model_dir, "--data", str(tiny_data), "--out", str(out),
                                         "--train-pairs", "30", "--transforms", "none,center",
                                         "--sts-max-length", "32", "--scifact-max-length", "48"]) == 0
    result = json.loads((out / "families.json").read_text())
    md = (out / "families.md").read_text()
    want = {"best raw cell", "best with post-processing", "best uniform mix", "best learned mix"}
    for key, select, templates in (("stsb", "dev", {"echo", "prompteol"}),
                                   ("scifact", "train-select", {"echo~plain", "prompteol~plain"})):
        head, *fams = result[key]["families"]
        assert head["default"] == "L4.last" and head["default_test"] is not None
        labels = {f["family"] for f in fams}
        assert want | {f"best with template {t}" for t in templates} <= labels, labels
        section = next(part for part in md.split("### ") if f"| family | chosen on {select} |" in part)
        assert len(table_rows(section, "| family |")) == len(fams)
        assert all(f["test_score"] is not None and f["select_score"] is not None for f in fams)
    learned = next(f for f in result["scifact"]["families"][1:] if f["family"] == "best learned mix")
    assert "scifact/train-fit" in learned["fitted_on"]
    q = result["scifact"]["queries"]
    assert (q["fit"] + q["select"], q["left_out"], q["test"]) == (30, 1, 30)  # the query asked in both: in neither
    assert result["stsb"]["train_pairs"] == {"sampled": 30, "pool": 40, "train": 41}  # the repeated test pair: out
    assert {r["split"] for r in result["scifact"]["select"]} == {"train-select"}
    assert {r["split"] for r in result["scifact"]["test"]} == {"test"}


def test_probe_curve(model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    assert load_study("probe_curve").main(["--model", model_dir, "--labels", str(tiny_data / "probe-sts.csv"),
                                            "--templates", "plain", "--max-length", "32", "--draws", "3",
                                            "--held-out-min", "50", "--out", str(out)]) == 0
    (curve,) = out.glob("curve-*.json")
    result = json.loads(curve.read_text())
    assert result["items"] == 150 and result["variants"] == 5 * 5 + 2 * 5  # 5 layers x 5 poolings, 2 uniform mixes
    # every size that leaves 100 items out, each scored on what it left out
    assert [(r["items"], r["held_out"], r["draws"]) for r in result["curve"]] == [(100, 50, 3)]
    assert all(0 <= r["same_winner"] <= 1 and r["regret_median"] >= 0 for r in result["curve"])
    assert len(table_rows(curve.with_suffix(".md").read_text(), "| items |")) == 1


def test_float16(model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    assert load_study("float16").main(["--model", model_dir, "--stsb", str(tiny_data / "stsb" / "sts-test.csv"),
                                        "--scifact", str(tiny_data / "scifact"), "--max-length", "32",
                                        "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    for key in ("stsb", "scifact"):
        r = result[key]
        assert r["variants"] == 5 * 5 and r["undefined"] < 5 and 0 <= r["median_change"] <= r["largest_change"] < 1, r
        assert r["best_float32"].startswith("L") and r["best_float16"].startswith("L")
    assert result["stsb"]["pairs"] == 30 and result["scifact"]["queries"] == 30


def test_quantize(model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    assert load_study("quantize").main(["--model", model_dir, "--layers", "2", "--pooling", "mean",
                                         "--data", str(tiny_data), "--repeats", "1", "--max-length", "32",
                                         "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    (v,) = json.loads((out / "quantize.json").read_text())["variants"]
    assert [r["dtype"] for r in v["rows"]] == ["float32", "float16", "int8", "binary", "binary + rescore x4"]
    assert v["rows"][0]["recall_at_10_vs_float32"] == 1.0 and v["dim"] == 32
    assert [r["bytes_stored"] for r in v["rows"]] == [128, 64, 32, 4, 4]
    assert len(table_rows((out / "quantize.md").read_text(), "| output |")) == 5


def test_activations(model_dir, tmp_path):
    out = tmp_path / "out"
    assert load_study("activations").main(["--model", model_dir, "--texts", "6", "--out", str(out)]) == 0
    rows = json.loads((out / "activations.json").read_text())[model_dir]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["first_over_other"] > 0 and -1 <= r["cos_mean"] <= 1 for r in rows)
    assert len(table_rows((out / "activations.md").read_text(), "| layer |")) == 5


def test_scale_check_prints_every_checked_row(capsys):
    study = load_study("scale_check")
    assert study.main(["--print"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(printed) == len(study.tables(json.loads(study.MEASURED.read_text())))
    assert study.main([]) == 0  # docs/scale.md agrees (tests/test_scale_doc.py checks it in detail)


def test_index_memory(ray_local, faiss_one_thread, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the study sets it for its Ray tasks; restored after
    out = tmp_path / "out"
    assert load_study("index_memory").main(["--rows", "400", "--part-rows", "200", "--dim", "16", "--nlist", "4",
                                             "--m", "4", "--train-rows", "400", "--chunk-rows", "100",
                                             "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads((out / "index_memory.json").read_text())
    assert [(r["corpus"], r["rows"], r["parts"], r["encode_tasks"]) for r in result["rows"]] == [
        ("1x", 400, 2, 2), ("4x", 1600, 8, 8)]
    assert all(r["encode_mb_max"] > 0 and r["merge_mb"] > 0 for r in result["rows"])
    assert len(table_rows((out / "index_memory.md").read_text(), "| corpus |")) == 2


def test_index_recall(ray_local, faiss_one_thread, model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    assert load_study("index_recall").main(["--model", model_dir, "--layers", "2", "--pooling", "mean",
                                             "--max-length", "48", "--data", str(tiny_data), "--parts", "2",
                                             "--nprobe", "1,2", "--rerank", "1,4", "--repeats", "1",
                                             "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads((out / "index_recall.json").read_text())
    assert (result["documents"], result["queries"], result["parts"], result["dim"]) == (130, 30, 2, 32)
    grid = [(n, r) for n in (1, 2) for r in (1, 4)]
    ivf = [r for r in result["rows"] if r["index"] == "ivfpq"]
    assert [(r["index"], r["engine"]) for r in result["rows"][:2]] == [("flat", "local"), ("hnsw", "local")]
    assert [(r["engine"], r.get("defaults", False)) for r in ivf] == [
        ("local", True), *[("local", False)] * 4, ("ray (2 parts)", True), *[("ray (2 parts)", False)] * 4]
    assert [(r["nprobe"], r["rerank"]) for r in ivf if not r.get("defaults")] == grid * 2
    assert all(0 <= r["recall"] <= 1 and r["ms_per_query"] > 0 and 0 <= r["ndcg_at_10"] <= 100
               for r in result["rows"])
    assert result["rows"][0]["recall"] == 1.0
    # one set of rules, one training sample and seed, the same re-ranking: the engines answer alike
    by = {(r["engine"], r["nprobe"], r["rerank"], r.get("defaults", False)): (r["recall"], r["ndcg_at_10"])
          for r in ivf}
    assert all(by[("local", *key)] == by[("ray (2 parts)", *key)] for key in
               [(n, r, False) for n, r in grid] + [(ivf[0]["nprobe"], ivf[0]["rerank"], True)]), by
    assert len(table_rows((out / "index_recall.md").read_text(), "| index |")) == 12

    syn = tmp_path / "syn"
    assert load_study("index_recall").main(["--synthetic", "3000", "--dim", "16", "--queries", "40", "--no-ray",
                                             "--nprobe", "1,4", "--rerank", "1,2", "--repeats", "1",
                                             "--work", str(tmp_path / "work2"), "--out", str(syn)]) == 0
    r = json.loads((syn / "index_recall.json").read_text())
    assert (r["documents"], r["queries"], r["dim"], r["model"]) == (3000, 40, 16, "synthetic")
    assert [(x["engine"], x["nprobe"], x["rerank"]) for x in r["rows"]][2:] == [("local", n, k) for n in (1, 4)
                                                                               for k in (1, 2)]
    assert all(x["ndcg_at_10"] is None for x in r["rows"])  # no judgements: recall against exact only


def test_checksums(tmp_path):
    out = tmp_path / "out"
    assert load_study("checksums").main(["--parts", "2", "--rows", "50", "--dim", "8", "--repeats", "2",
                                         "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert set(r["seconds"]) == {"write_with_crc", "write_without_crc", "read", "crc"} and r["parts"] == 2
    assert len(table_rows((out / "checksums.md").read_text(), "| parts x rows x dim |")) == 1


def test_index_update(ray_local, faiss_one_thread, model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    assert load_study("index_update").main(["--model", model_dir, "--data", str(tiny_data / "scifact"),
                                             "--shards", "2", "--share", "0.1", "--out", str(out)]) == 0
    r = json.loads((out / "index_update.json").read_text())
    assert (r["docs"], r["deleted_then_added"]) == (130, 13)
    # deleting copies the shards' other rows; the texts added back left the output with their shards: embedded
    assert [s["rows_embedded"] for s in r["steps"]] == [130, 0, 13]
    flat = r["kinds"]["flat"]
    assert flat["updates"] == [{"deleted": 13, "added": 0, "changed_since_training": 13},
                               {"deleted": 0, "added": 13, "changed_since_training": 26}]
    assert flat["fresh build"]["identical_top10"] == 1.0  # exact: the update is the fresh build
    assert set(r["kinds"]) == {"flat", "ivfpq"} and len(table_rows((out / "index_update.md").read_text(), "| kind |")) == 2


@pytest.mark.alone
def test_nightly(model_dir, tmp_path):
    out = tmp_path / "out"
    assert load_study("nightly").main(["--shards", "2", "--rows", "40", "--model", model_dir, "--layers", "1,4",
                                       "--kind", "flat", "--kills", "--out", str(out)]) == 0
    r = json.loads((out / "nightly.json").read_text())
    cases = {c["case"]: c for c in r["cases"]}
    assert list(cases) == ["initial", "unchanged", "new shard", "1% edited", "1% edited, killed", "re-export",
                           "5% deleted"]
    assert cases["initial"]["rows_embedded"] == 80 and cases["unchanged"]["rows_embedded"] == 0
    assert cases["re-export"]["rows_embedded"] == 0 and cases["re-export"]["rows_reused"] == 120
    assert all(c["reader_after"]["whole"] and c["mb_read"] >= 0 for c in r["cases"])
    assert [k["latest_unchanged"] for k in cases["1% edited, killed"]["kills"]] == [True] * 3
    assert len(table_rows((out / "nightly.md").read_text(), "| case |")) == 7


def test_tasks_grid(model_dir, tmp_path):
    """Tiny stand-ins for Banking77, MasakhaNEWS and MRPC in their layouts; every task's row and timing."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = {"a": "cat dog bird fish".split(), "b": "river stone cloud tree".split(), "c": "red blue green gold".split()}

    def texts(n, seed):
        r = np.random.default_rng(seed)
        return [{"text": " ".join(r.choice(words[k], 4)) + f" {i}", "label": k} for i, k in
                zip(range(n), [list(words)[i % 3] for i in range(n)])]

    def write(path, records):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))

    data = tmp_path / "data"
    write(data / "banking77" / "train.jsonl", texts(90, 1))
    write(data / "banking77" / "test.jsonl", texts(30, 2))
    write(data / "masakhanews-clustering" / "test.jsonl", [{**r, "set": i // 20} for i, r in enumerate(texts(100, 3))])
    write(data / "mrpc" / "train.jsonl", [{"sentence1": a["text"], "sentence2": b["text"], "label": int(rng.random() < .6)}
                                          for a, b in zip(texts(60, 4), texts(60, 5))])
    out = tmp_path / "out"
    assert load_study("tasks_grid").main(["--model", model_dir, "--data", str(data), "--out", str(out)]) == 0
    report = json.loads((out / "tasks_grid.json").read_text())
    (m,) = report["models"]
    assert [(r["task"], r["data"]) for r in m["results"]] == [
        ("classification", "Banking77"), ("clustering", "MasakhaNEWS"), ("clustering", "Banking77 by intent"),
        ("pairs", "MRPC")]
    for r in m["results"]:
        assert r["default"] == "L4.last" and r["score_s"] >= 0 and r["embed_s"] >= 0
    assert (out / "tasks" / Path(model_dir).name / "report.md").is_file()
    assert "| classification | Banking77 | accuracy |" in (out / "tasks_grid.md").read_text()


def test_classification_cost(model_dir, tmp_path):
    """A tiny classification folder: every variant's seconds split into optimiser, loss and the rest."""
    words = "cat dog bird fish river stone cloud tree".split()
    data = tmp_path / "bank"
    data.mkdir()
    for split, n in (("train", 40), ("test", 12)):
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({"text": f"{split} {words[i % 8]} {words[(3 * i) % 8]} {i}", "label": i % 4}) + "\n" for i in range(n)))
    out = tmp_path / "out"
    assert load_study("classification_cost").main(["--model", model_dir, "--layers", "1,4", "--poolings", "mean",
                                                   "--data", str(data), "--out", str(out)]) == 0
    report = json.loads((out / "classification_cost.json").read_text())
    assert sorted(report["variants"]) == ["L1.mean", "L4.mean"] and 32 + 12 <= report["texts"] <= 40 + 12
    for r in report["variants"].values():
        assert min(r["lbfgs"], r["loss"], r["rest"]) >= 0
        assert r["lbfgs"] + r["loss"] + r["rest"] == pytest.approx(r["seconds"])
    assert len(table_rows((out / "classification_cost.md").read_text(), "| variant |")) == 2

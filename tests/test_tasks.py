"""Task types (pipeline/tasks/): MTEB's protocols (their published anchors: test_anchors.py) against
plainly written references; both engines; every bad input a one-line error naming the file and line."""

import json
import os
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import data_file

from pipeline import Encoder, resolve
from pipeline.cli import main
from pipeline.evaluate import RayEncoder, evaluate_prepared
from pipeline.tasks import REGISTRY, check, infer
from pipeline.tasks import classification, clustering, pairs, reranking
from pipeline.variants import Variant


def _rows(out):
    return json.loads((out / "eval" / "results.json").read_text())


# --------------------------------------------------------------------------- plainly written references


def test_classification_samples_are_mtebs_undersampling():
    """MTEB 1.12's loop: the global generator reseeded with 42 by each evaluator, one index array shuffled
    again each experiment, the first 8 rows of each label kept."""
    labels = np.random.default_rng(1).integers(0, 7, size=300)
    np.random.seed(42)
    idxs, want = None, []
    for _ in range(10):
        if idxs is None:
            idxs = np.arange(len(labels))
        np.random.shuffle(idxs)
        count, take = defaultdict(int), []
        for i in idxs:
            if count[labels[i]] < 8:
                take.append(i)
                count[labels[i]] += 1
        want.append(take)
        np.random.seed(42)  # the evaluator's constructor
    got = classification.experiment_samples(labels, 8, 10, 42)
    assert [g.tolist() for g in got] == want


def test_pair_scores_equal_sentence_transformers_evaluator():
    from sentence_transformers.sentence_transformer.evaluation import BinaryClassificationEvaluator as B
    from sklearn.metrics import average_precision_score
    from sklearn.metrics.pairwise import paired_cosine_distances, paired_manhattan_distances

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(120, 8)), rng.normal(size=(120, 8))
    b[:60] += a[:60]  # the first half similar
    b[10] = a[10]  # ties of similarity too
    b[11] = a[11]
    labels = (np.arange(120) < 60).astype(int)
    labels[::7] = 1 - labels[::7]
    got = pairs.scores(a, b, labels)
    cos = 1 - paired_cosine_distances(a, b)
    man = paired_manhattan_distances(a, b)
    for fn, sims, high in (("cosine", cos, True), ("manhattan", man, False)):
        acc, _ = B.find_best_acc_and_threshold(sims, labels, high)
        f1, precision, recall, _ = B.find_best_f1_and_threshold(sims, labels, high)
        ap = average_precision_score(labels, sims * (1 if high else -1))
        for name, value in (("accuracy", acc), ("f1", f1), ("precision", precision), ("recall", recall), ("ap", ap)):
            assert got[f"{fn}_{name}"] == pytest.approx(100 * value, abs=1e-9), (fn, name)
    assert got["max_ap"] == max(got[f"{fn}_ap"] for fn in pairs.FUNCTIONS)


def test_clustering_fast_subsets_are_mtebs():
    """``random.Random(42)``: ``sample`` down to 16,384 documents, then ten ``choices`` of 2,048."""
    rng = random.Random(42)
    n = 20_000
    kept = rng.sample(range(n), k=16_384)
    subsets = [rng.choices(range(16_384), k=2_048) for _ in range(10)]
    rows, got = clustering.fast_rows(n)
    assert rows.tolist() == sorted(kept)
    assert [g.tolist() for g in got] == subsets
    rows, got = clustering.fast_rows(500)  # fewer documents than a subset: subsets of all of them
    assert rows.tolist() == list(range(500)) and {len(g) for g in got} == {500}


def test_reranking_equals_trec_eval_map(tmp_path):
    """A reranking set made from SciFact's qrels; MAP equals trec_eval's over each query's candidates."""
    import pytrec_eval

    root = data_file("scifact")
    docs = {}
    for line in (root / "corpus.jsonl").open():
        d = json.loads(line)
        docs[d["_id"]] = f"{d['title']} {d['text']}".strip()
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in (root / "queries.jsonl").open()}
    qrels = defaultdict(dict)
    for line in list((root / "qrels" / "test.tsv").open())[1:40]:
        q, d, _ = line.split("\t")
        qrels[q][d] = 1
    ids = sorted(docs)
    path = tmp_path / "scifact-rerank.jsonl"
    with path.open("w") as f:
        for k, (q, rel) in enumerate(sorted(qrels.items())):
            negatives = [ids[(k * 37 + j * 101) % len(ids)] for j in range(6)]
            f.write(json.dumps({"query": queries[q], "positive": [docs[d] for d in rel],
                                "negative": [docs[d] for d in negatives if d not in rel]}) + "\n")
    data = reranking.load(path)
    prepared = reranking.Prepared(data)
    m = np.random.default_rng(0).normal(size=(len(prepared.texts), 16))
    got = prepared.score(m)
    run, judged = {}, {}
    for i, (qr, cand, pos) in enumerate(zip(prepared.query_rows, prepared.cand_rows, data.positives)):
        x = m[cand] / np.linalg.norm(m[cand], axis=1, keepdims=True)
        sims = x @ (m[qr] / np.linalg.norm(m[qr]))
        run[f"q{i}"] = {f"c{j}": float(s) for j, s in enumerate(sims)}
        judged[f"q{i}"] = {f"c{j}": int(j < len(pos)) for j in range(len(cand))}
    trec = pytrec_eval.RelevanceEvaluator(judged, {"map"}).evaluate(run)
    assert got["map"] == pytest.approx(100 * np.mean([v["map"] for v in trec.values()]), abs=1e-6)


# --------------------------------------------------------------------------- both engines


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


WORDS = {"animal": "cat dog bird fish horse".split(), "place": "river stone cloud tree house".split()}


def _texts(seed, n):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = list(WORDS)[i % 2]
        out.append({"text": " ".join(rng.choice(WORDS[label], 4)) + f" {i}", "label": label})
    return out


def test_every_task_type_scores_the_same_on_both_engines(ray_local, model_dir, tmp_path):
    request = resolve(model_dir, layers="1,-1", poolings="mean,last")
    local, ray_enc = Encoder.from_request(request), RayEncoder(request, tmp_path / "cache", progress=False)
    _write(tmp_path / "cls" / "train.jsonl", _texts(0, 60))
    _write(tmp_path / "cls" / "test.jsonl", _texts(1, 30))
    clusters = [{**r, "set": i // 20} for i, r in enumerate(_texts(2, 40))]
    first, second = _texts(3, 40), _texts(4, 41)
    pair_rows = [{"sentence1": a["text"], "sentence2": b["text"], "label": int(a["label"] == b["label"])}
                 for a, b in zip(first, (second[i + (i % 3 == 0)] for i in range(40)))]
    rerank = [{"query": f"about {w}", "positive": [f"{w} {w} one", f"{w} two"], "negative": ["river stone", "cat"]}
              for w in ("dog", "tree", "fish")]
    cases = [
        ("classification", classification.Prepared(classification.load(tmp_path / "cls"), samples_per_label=4,
                                                   experiments=3)),
        ("clustering", clustering.Prepared(clustering.load(_write(tmp_path / "clu.jsonl", clusters)))),
        ("pairs", pairs.Prepared(pairs.load(_write(tmp_path / "pairs.jsonl", pair_rows)))),
        ("reranking", reranking.Prepared(reranking.load(_write(tmp_path / "rr.jsonl", rerank)))),
    ]
    for task, prepared in cases:
        a, b = evaluate_prepared(task, local, prepared), evaluate_prepared(task, ray_enc, prepared)
        key = lambda r: (r["metric"], r["layer"], r["pooling"])  # noqa: E731
        assert len(a) == len(b) > 0 and {r["metric"] for r in a} >= {REGISTRY[task].metric}
        for ra, rb in zip(sorted(a, key=key), sorted(b, key=key)):
            assert key(ra) == key(rb) and ra["score"] == pytest.approx(rb["score"], abs=1e-3), (task, key(ra))


# --------------------------------------------------------------------------- bad input


def _fails(capsys, argv, *needles):
    code = main(["eval", *argv, "--output", str(argv[-1]) + ".out", "-q"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("strata eval:")]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not (Path(str(argv[-1]) + ".out") / "eval").exists()  # nothing written
    return lines[0]


def test_bad_task_data_is_one_line_naming_file_and_line(tmp_path, capsys):
    one = tmp_path / "one"
    _write(one / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    _write(one / "test.jsonl", [{"text": "c", "label": "x"}])
    _fails(capsys, ["classification", str(one)], "train.jsonl", "one class")

    absent = tmp_path / "absent"
    _write(absent / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    _write(absent / "test.jsonl", [{"text": "c", "label": "x"}, {"text": "d", "label": "z"}])
    _fails(capsys, ["classification", str(absent)], "test.jsonl", "'z'", "absent from train.jsonl")

    few = _write(tmp_path / "few.jsonl", [{"text": t, "label": t} for t in "abc"])
    _fails(capsys, ["clustering", str(few)], "few.jsonl", "3 text(s) for 3 labels")

    mixed = _write(tmp_path / "mixed.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "two"}])
    _fails(capsys, ["clustering", str(mixed)], "mixed.jsonl:2", "one kind of label")

    bad_pair = _write(tmp_path / "bad_pair.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 1},
                                                    {"sentence1": "a", "sentence2": "c", "label": 2}])
    _fails(capsys, ["pairs", str(bad_pair)], "bad_pair.jsonl:2", "must be 0 or 1")

    pairs_file = _write(tmp_path / "p.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 1}])
    _fails(capsys, ["sts", str(pairs_file)], "p.jsonl", "holds pairs data", "not sts")

    odd = _write(tmp_path / "odd.jsonl", [{"title": "a", "body": "b"}])
    with pytest.raises(ValueError, match=r"odd.jsonl: cannot tell the task from its fields \(body, title\)"):
        infer(odd)
    check("clustering", one)  # a labelled folder can be clustered by its labels: no refusal


def test_empty_texts_are_left_out_and_counted(tmp_path):
    data = clustering.load(_write(tmp_path / "c.jsonl", [{"text": "a b", "label": 1}, {"text": " ", "label": 1},
                                                         {"text": None, "label": 2}, {"text": "c", "label": 2},
                                                         {"text": "d", "label": 1}]))
    assert len(data) == 3 and data.left_out == "2 record(s) with an empty text left out"
    p = pairs.load(_csv(tmp_path / "p.csv"))
    assert len(p) == 2 and p.left_out == "1 pair(s) with an empty sentence left out"


def _csv(path):
    path.write_text('sentence1,sentence2,label\n"a, quoted",b,1\n"",c,0\nd,e,0\n')
    return path


def test_csv_fields_keep_their_quoted_commas(tmp_path):
    p = pairs.load(_csv(tmp_path / "p.csv"))
    assert p.sentence1 == ["a, quoted", "d"] and p.labels.tolist() == [1, 0]


def test_task_options_belong_to_their_task(tmp_path, capsys):
    f = _write(tmp_path / "p.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 1}])
    assert main(["eval", "pairs", str(f), "--output", str(tmp_path / "o"), "--protocol", "fast"]) != 0
    assert "--protocol applies to clustering, not pairs" in capsys.readouterr().err
    assert main(["eval", "pairs", str(f), "--output", str(tmp_path / "o"), "--split", "dev"]) != 0
    assert "--split applies to retrieval and classification" in capsys.readouterr().err


def test_a_job_evaluates_every_task_type(ray_local, model_dir, tmp_path, monkeypatch):
    """``evaluations`` in a job spec: each task type with its protocol options; the dry run counts its texts;
    a bad file fails before any embedding, naming the evaluation."""
    from pipeline.jobs import JobSpecError, run_job

    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "cls" / "train.jsonl", _texts(0, 40))
    _write(tmp_path / "cls" / "test.jsonl", _texts(1, 20))
    _write(tmp_path / "clu.jsonl", _texts(2, 30))
    _write(tmp_path / "pairs.jsonl", [{"sentence1": a["text"], "sentence2": b["text"], "label": i % 2}
                                      for i, (a, b) in enumerate(zip(_texts(3, 20), _texts(4, 20)))])
    spec = (f"name: tasks\ninput: null\noutput: out\nmodel: {model_dir}\nvariants: {{layers: '1,-1', poolings: [mean]}}\n"
            "evaluations:\n  - {task: classification, data: cls, samples_per_label: 3, experiments: 2}\n"
            "  - {task: clustering, data: clu.jsonl, protocol: fast}\n  - {task: pairs, data: pairs.jsonl}\n")
    Path("job.yaml").write_text(spec)
    plan = run_job("job.yaml", dry_run=True, stream=open(os.devnull, "w"))
    assert [e["task"] for e in plan["evaluations"]] == ["classification", "clustering", "pairs"]
    run_job("job.yaml", progress=False, stream=open(os.devnull, "w"))
    rows = json.loads(next(Path("out/tasks").glob("*/eval/results.json")).read_text())
    assert {(r["task"], r.get("protocol")) for r in rows} == {
        ("classification", "logreg, 3 per label x 2"), ("clustering", "fast"), ("pairs", None)}
    # the three evaluations' texts were embedded in one run of the pipeline (one model load): the cache
    # holds one shard, with exactly the texts the evaluations score
    from pipeline.evaluate import text_id
    from pipeline.runner import read_embeddings
    from pipeline.tasks import prepare

    cache = next(Path("out/tasks").glob("*/eval-cache"))
    assert len(json.loads((cache / "manifest.json").read_text())["shards"]) == 1
    scored = [*prepare("classification", "cls", samples_per_label=3, experiments=2).texts,
              *prepare("clustering", "clu.jsonl", protocol="fast").texts, *prepare("pairs", "pairs.jsonl").texts]
    cached = read_embeddings(str(cache), ["id"]).column("id").to_pylist()
    assert sorted(cached) == sorted({text_id(t) for t in scored})
    assert {(r["layer"], r["pooling"]) for r in rows} == {(1, "mean"), (4, "mean")}
    Path("pairs.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": 3}\n')
    with pytest.raises(JobSpecError, match=r"evaluations\[2\]\.data.*pairs.jsonl:1: label 3 must be 0 or 1"):
        run_job("job.yaml", stream=open(os.devnull, "w"))


# --------------------------------------------------------------------------- the probe on every task type


def test_group_resampling_moves_dependent_items_together():
    from pipeline import stats

    groups = np.array([5, 5, 1, 9, 9, 9, 2])
    counts = stats.group_counts(groups, 200, seed=0)
    assert counts.shape == (200, 7)
    assert (counts[:, 0] == counts[:, 1]).all() and (counts[:, 3] == counts[:, 4]).all() == (counts[:, 4] == counts[:, 5]).all()
    # one item per group: the plain bootstrap
    np.testing.assert_array_equal(stats.group_counts(np.arange(7), 50, seed=3), stats.resample_counts(7, 50, seed=3))


def test_classification_items_are_scored_by_classifiers_that_never_saw_their_fold():
    """Item i's output equals a plainly written logistic regression fitted on every item outside i's fold."""
    from sklearn.linear_model import LogisticRegression

    from pipeline.probe import fold_ids

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    data = classification.LabelledTexts("t", [f"text {i}" for i in range(60)], y, [0, 1, 2])
    items = classification.Items(data)
    m = rng.normal(size=(60, 5)) + y[:, None]  # rows in text order (texts are unique)
    fold = fold_ids(items.groups, 5)
    items.use_folds(fold)
    got = items.per_item(m, np.arange(60))
    for k in range(5):
        test, train = fold == k, fold != k
        clf = LogisticRegression(random_state=42, max_iter=100).fit(m[train], y[train])
        np.testing.assert_array_equal(got[test], 100.0 * (clf.predict(m[test]) == y[test]))


def test_clustering_and_pair_bootstraps_equal_the_explicit_resample():
    """The probe's resampled V-measure and AP equal scikit-learn's on the resampled multiset."""
    from sklearn.metrics import average_precision_score, v_measure_score

    from pipeline import stats

    rng = np.random.default_rng(1)
    n = 40
    data = clustering.ClusteringData("c", [f"t{i}" for i in range(n)], rng.integers(0, 3, n), np.zeros(n, int))
    items = clustering.Items(data)
    assign = rng.integers(0, 3, n).astype(float)
    counts = stats.resample_counts(n, 20, seed=2)
    for row, got in zip(counts, items.bootstrap(counts)(assign)):
        rep = np.repeat(np.arange(n), row.astype(int))
        assert got == pytest.approx(100 * v_measure_score(data.labels[rep], assign[rep]), abs=1e-9)
    p = pairs.PairsData("p", [f"a{i}" for i in range(n)], [f"b{i}" for i in range(n)], rng.integers(0, 2, n))
    sims = np.round(rng.normal(size=n), 1)
    for row, got in zip(counts, pairs.Items(p).bootstrap(counts)(sims)):
        rep = np.repeat(np.arange(n), row.astype(int))
        assert got == pytest.approx(100 * average_precision_score(p.labels[rep], sims[rep]), abs=1e-9)


def test_retrieval_transforms_never_see_the_scored_folds_judged_documents():
    from pipeline.evaldata import BeirData
    from pipeline.tasks import retrieval

    data = BeirData("b", [f"d{i}" for i in range(8)], [f"doc {i}" for i in range(8)], ["q0", "q1", "q2"],
                    ["query 0", "query 1", "query 2"], {"q0": {"d0": 1}, "q1": {"d1": 1, "d2": 1}, "q2": {"d3": 1}})
    items = retrieval.Items(data)
    train = np.array([0, 2])  # q1 is scored: d1 and d2 are hidden from the fit
    fitted = {items.texts[r] for r in items.fit_rows(train)}
    assert fitted == {f"doc {i}" for i in (0, 3, 4, 5, 6, 7)}
    assert {items.texts[r] for r in items.fit_rows(np.arange(3))} == {f"doc {i}" for i in range(8)}


@pytest.mark.parametrize("task", ["classification", "clustering", "pairs"])
def test_the_probe_runs_on_every_task_type_and_records_it(model_dir, tmp_path, task):
    if task == "classification":
        labels = tmp_path / "cls"
        _write(labels / "train.jsonl", _texts(0, 80))
        _write(labels / "test.jsonl", _texts(1, 20))
    elif task == "clustering":
        labels = _write(tmp_path / "clu.jsonl", [{**r, "set": i // 40} for i, r in enumerate(_texts(2, 80))])
    else:
        first, second = _texts(3, 80), _texts(4, 81)
        labels = _write(tmp_path / "pairs.jsonl", [
            {"sentence1": a["text"], "sentence2": b["text"], "label": int(a["label"] == b["label"])}
            for a, b in zip(first, (second[i + (i % 3 == 0)] for i in range(80)))])
    out = tmp_path / "probe"
    assert main(["probe", "--model", model_dir, "--labels", str(labels), "--output", str(out), "--templates",
                 "plain", "--poolings", "mean,last", "--resamples", "100", "-q"]) == 0
    result = json.loads((out / "probe.json").read_text())
    assert result["labels"]["task"] == task and result["labels"]["metric"] == {
        "classification": "accuracy", "clustering": "v_measure", "pairs": "cosine_ap"}[task]
    assert f"probed on the {task} task" in (out / "job.yaml").read_text()
    ranked = result["ranked"]
    assert not any(r["mix"] and r["mix"].startswith("learned") for r in ranked)  # no labels to fit a mix on
    fitted = [r for r in ranked if r["transform"] != "none"]
    assert fitted and all("selected_on" in r for r in fitted)
    if task == "clustering":  # nothing sees a label: fitted on every text, not cross-fitted
        assert all(r["fitted_on"].startswith("transform fitted on") for r in fitted)
    else:
        assert all("cross-fitted" in r["fitted_on"] for r in fitted)
    # the recipe scored elsewhere (classification: the test file, the probe having seen train)
    check_out = tmp_path / "check"
    assert main(["eval", task, str(labels), "--recipe", str(out / "probe.json"), "--output", str(check_out),
                 "-q"]) == 0
    rows = _rows(check_out)
    assert {Variant.from_row(r).name for r in rows} == {result["chosen"]["variant"]}
    assert ("selected_on" in rows[0]) == (task != "classification")  # the probe chose on this very data


def test_the_probe_refuses_a_task_its_data_does_not_hold(tmp_path, capsys):
    f = _write(tmp_path / "c.jsonl", _texts(0, 20))
    assert main(["probe", "--labels", str(f), "--task", "sts", "--output", str(tmp_path / "o")]) != 0
    assert "holds clustering data" in capsys.readouterr().err
    rr = _write(tmp_path / "rr.jsonl", [{"query": "q", "positive": ["a"], "negative": ["b"]}])
    assert main(["probe", "--labels", str(rr), "--output", str(tmp_path / "o")]) != 0
    assert "the probe chooses for sts, retrieval, classification, clustering, pairs" in capsys.readouterr().err


def test_templates_mixes_transforms_and_int8_apply_to_every_task_type(model_dir, tmp_path):
    """The derived variants and quantised scoring of STS, on classification: one row group each, what the
    transform saw recorded; the int8 scores in a group of their own."""
    _write(tmp_path / "cls" / "train.jsonl", _texts(0, 60))
    _write(tmp_path / "cls" / "test.jsonl", _texts(1, 30))
    out = tmp_path / "out"
    common = ["eval", "classification", str(tmp_path / "cls"), "--output", str(out), "--model", model_dir,
              "--layers", "2:4", "--poolings", "mean", "--samples-per-label", "5", "--experiments", "2", "-q"]
    assert main([*common, "--templates", "plain,prompteol", "--mixes", "2:4", "--transforms", "center"]) == 0
    rows = [r for r in _rows(out) if r["metric"] == "accuracy"]
    names = {Variant.from_row(r).name for r in rows}
    assert {"L2.mean", "prompteol/L4.mean", "M2-4.mean", "L4.mean|center", "prompteol/M2-4.mean|center"} <= names
    assert all("sampled for the classifier" in r["fitted_on"] for r in rows if r["transform"] == "center")
    assert main([*common, "--dtype", "int8"]) == 0
    int8 = [r for r in _rows(out) if r.get("quantization") == "int8" and r["metric"] == "accuracy"]
    assert {Variant.from_row(r).name for r in int8} == {"L2.mean", "L3.mean", "L4.mean"}

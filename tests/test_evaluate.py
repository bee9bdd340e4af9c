"""Evaluators on both engines (their MTEB anchors are in test_anchors.py)."""

import json

import numpy as np
import pytest

from pipeline import Encoder, Variant, resolve
from pipeline.cli import main
from pipeline.evaldata import BeirData, StsData
from pipeline.evaluate import RayEncoder, eval_sts, evaluate_retrieval, evaluate_sts
from pipeline.index import load_index
from pipeline.runner import read_embeddings

def _pairs(n=40, seed=0) -> StsData:
    rng = np.random.default_rng(seed)
    words = "cat dog bird fish tree house river stone cloud light".split()
    s1 = [" ".join(rng.choice(words, 6)) for _ in range(n)]
    s2 = [" ".join(rng.choice(words, 5)) for _ in range(n)]
    s2[3] = s1[0]  # a sentence on both sides: embedded once, used twice
    return StsData("pairs", s1, s2, np.arange(n, dtype=float) % 6)


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


def _tiny_beir(root, n_docs=160):
    """A BEIR folder of ``n_docs`` short documents and 8 queries with qrels (enough for IVF-PQ: 39 per list)."""
    words = "cat dog bird fish tree house river stone cloud light road hill".split()
    rng = np.random.default_rng(3)
    (root / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": f"{i} " + " ".join(rng.choice(words, 5))} for i in range(n_docs)]
    queries = [(f"q{j}", " ".join(rng.choice(words, 3))) for j in range(8)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{j}\td{(7 * j + r) % n_docs}\t1\n" for j in range(8) for r in range(3)))
    return root, docs, queries


def test_eval_index_engine_ray_scores_through_the_merged_on_disk_ivfpq(ray_local, model_dir, tmp_path, capsys,
                                                                        monkeypatch):
    """`eval retrieval --index ivfpq --index-engine ray`: the documents the ray engine cached are indexed by
    index.ray's distributed build (2 parts) and the queries searched through the merged, memory-mapped index.
    Reference: the same quantiser trained in-process on the same seeded sample (index.ray.train_ivfpq), every
    document added in one process, searched with nprobe = nlist; its nDCG@10 must be the Ray path's exactly
    (the merge only concatenates lists). Against exact search the agreement is recall-level (PQ is lossy)."""
    import faiss

    from pipeline.index import ray as ir
    from pipeline.evaluate import RAY_INDEX_DIR, text_id
    from pipeline.index import recall_at_k
    from pipeline.metrics import retrieval_scores, retrieval_scores_from_run
    from pipeline.storage import Output

    beir, docs, queries = _tiny_beir(tmp_path / "beir")
    out = tmp_path / "out"
    args = ["eval", "retrieval", str(beir), "--output", str(out), "--model", model_dir, "--layers", "2",
            "--poolings", "mean", "--index", "ivfpq", "--nlist", "2", "--nprobe", "2", "-q"]
    capsys.readouterr()
    # the two one-line refusals (before any data is read or model loaded)
    assert main([*args[:-7], "--index", "hnsw", "--index-engine", "ray", "-q"]) != 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "strata eval: error: --index-engine ray builds IVF-PQ indexes only: use --index ivfpq (or auto), not "
        "--index hnsw"]
    assert main([*args, "--index-engine", "ray", "--engine", "local"]) != 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "strata eval: error: --index-engine ray indexes the document embeddings the ray engine caches in --output: "
        "use --engine ray (or auto)"]

    # engine auto would be local for 168 texts: switched to ray, and said
    import pipeline.evaluate as evaluate

    monkeypatch.setattr(evaluate, "RAY_INDEX_PART_ROWS", 80)  # two parts, two encode tasks, a real merge
    assert main([*args, "--index-engine", "ray"]) == 0
    assert "--index-engine ray: evaluating with --engine ray" in capsys.readouterr().err
    rows = [r for r in json.loads((out / "eval" / "results.json").read_text())
            if r.get("quantization") == "index:ivfpq@ray"]
    assert {r["metric"] for r in rows} == {"ndcg_at_10", "recall_at_100", "mrr_at_10"}
    assert {(r["layer"], r["pooling"]) for r in rows} == {(2, "mean")}

    v = Variant(2, "mean")
    folder = out / RAY_INDEX_DIR / "beir-test" / v.name
    rec = ir.read_build_record(folder, v)
    # again: nothing re-embedded, the build's parts reused (same record), the same scores
    assert main([*args, "--index-engine", "ray"]) == 0
    assert ir.read_build_record(folder, v).shards == rec.shards
    assert [r for r in json.loads((out / "eval" / "results.json").read_text())
            if r.get("quantization") == "index:ivfpq@ray"] == rows
    assert rec.options["nlist"] == 2 and rec.options["nprobe"] == 2 and len(rec.shards) == 2
    assert json.loads((folder / "indexes" / "L2.mean.json").read_text())["engine"] == "ray"

    # the cached vectors (ids are text digests), read back plainly
    table = Output(str(out)).read_table(["id", v.column])
    at = {i: k for k, i in enumerate(table.column("id").to_pylist())}
    mat = np.stack(table.column(v.column).to_numpy(zero_copy_only=False)).astype(np.float32)
    d = mat[[at[text_id(doc["text"])] for doc in docs]]
    q = mat[[at[text_id(t)] for _, t in queries]]
    doc_ids, query_ids = [doc["_id"] for doc in docs], [qid for qid, _ in queries]
    qrels = {f"q{j}": {f"d{(7 * j + r) % len(docs)}": 1 for r in range(3)} for j in range(8)}

    manifest = json.loads((folder / "manifest.json").read_text())
    shards = ir.shards_of(folder, manifest)
    trained = ir.train_ivfpq(str(folder), [s.rel for s in shards], [s.rows for s in shards], v.column, d.shape[1],
                             d.shape[1], rec.options, 0)
    assert bytes(trained) == (ir.parts_dir(folder, v) / ir.TRAINED).read_bytes()
    ref = faiss.deserialize_index(trained)
    dn, qn = d / np.linalg.norm(d, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    ref.add(np.ascontiguousarray(dn))
    ref.nprobe = 2
    # the index's exact re-ranking, written plainly: rerank x k IVF-PQ candidates by their exact cosine
    rerank = json.loads((folder / "indexes" / "L2.mean.json").read_text())["rerank"]
    _, cand = ref.search(np.ascontiguousarray(qn), min(100 * rerank, len(d)))
    cand_scores = np.einsum("qd,qkd->qk", qn, dn[cand])
    order = np.argsort(-cand_scores, axis=1, kind="stable")[:, :100]
    ref_scores, ref_labels = np.take_along_axis(cand_scores, order, 1), np.take_along_axis(cand, order, 1)
    run = {qid: {doc_ids[i]: float(s) for i, s in zip(lab, sc) if i >= 0}
           for qid, sc, lab in zip(query_ids, ref_scores, ref_labels)}
    want = retrieval_scores_from_run(run, qrels)
    got = {r["metric"]: r["score"] for r in rows}
    for metric in got:
        assert got[metric] == pytest.approx(want[metric], abs=1e-6), metric

    # against exact cosine search: the same metric family, recall-level agreement of the top 10
    exact = retrieval_scores(q, d, query_ids, doc_ids, qrels)
    truth = [[doc_ids[i] for i in row] for row in np.argsort(-(qn @ dn.T), axis=1)[:, :10]]
    approx = [[doc_ids[i] for i in row[:10]] for row in ref_labels]
    recall = recall_at_k(approx, truth, 10)
    print(f"nDCG@10 exact {exact['ndcg_at_10']:.2f}, ivfpq@ray {got['ndcg_at_10']:.2f}; recall@10 vs exact "
          f"{recall:.3f}")
    # nprobe = nlist and rerank x 100 candidates >= 160 documents: every document is re-scored exactly, so
    # the 2-bit PQ codes (39 points per centroid) lose nothing here: the exact top 10
    assert recall == 1.0 and got["ndcg_at_10"] == pytest.approx(exact["ndcg_at_10"], abs=1e-6)
    assert all(len(r) == 100 for r in run.values())
    loaded = load_index(folder / "indexes" / "L2.mean.faiss")
    assert loaded.index.ntotal == len(docs) and sorted(loaded.ids) == sorted(doc_ids)  # the queries are not indexed


def test_eval_index_target_recall_tunes_then_scores_and_says_so(model_dir, tmp_path, capsys):
    """`eval retrieval --index ivfpq --target-recall R` (local engine): nprobe and rerank tuned on the documents'
    own vectors first; the measured recall is printed; a kind it cannot tune is one line."""
    beir, _, _ = _tiny_beir(tmp_path / "beir", n_docs=400)
    args = ["eval", "retrieval", str(beir), "--output", str(tmp_path / "out"), "--model", model_dir, "--layers", "2",
            "--poolings", "mean", "--engine", "local", "--index", "ivfpq", "--nlist", "8", "-q"]
    capsys.readouterr()
    assert main([*args, "--target-recall", "0.95"]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "measured at build" in x)
    recall = float(line.split("recall@10 ")[1].split()[0])
    assert "L2.mean: index recall@10" in line and recall >= 0.95, line
    assert main([*args[:-5], "--index", "hnsw", "--target-recall", "0.95", "-q"]) == 2
    assert "--target-recall tunes float IVF-PQ indexes: use it with --index ivfpq" in capsys.readouterr().err


def test_learned_mix_training_queries_must_not_be_evaluated():
    """BEIR labels: a judged query shared with the evaluated split (same text) is refused; another
    split, or a folder of the same name and split, with other queries is accepted."""
    from pipeline.derive import Derivations, check_held_out
    from pipeline.evaldata import BeirData
    from pipeline.variants import SpecError, parse_mixes

    def beir(split, queries, name="tiny"):
        return BeirData(name, ["d0", "d1"], ["doc zero", "doc one"], [f"q{i}" for i in range(len(queries))],
                        list(queries), {f"q{i}": {"d0": 1} for i in range(len(queries))}, split=split)

    test = beir("test", ["what is zero", "what is one"])
    mixes = parse_mixes("learned:1:4", 4)
    with pytest.raises(SpecError, match=r"\(tiny/test\) share 2 judged queries with the evaluated tiny/test"):
        check_held_out(Derivations(mixes=mixes, mix_labels=test), test)
    with pytest.raises(SpecError, match=r"\(tiny/train\) share 1 judged queries"):
        check_held_out(Derivations(mixes=mixes, mix_labels=beir("train", ["what is one", "why two"])), test)
    check_held_out(Derivations(mixes=mixes, mix_labels=beir("train", ["why two", "how three"])), test)
    check_held_out(Derivations(mixes=mixes, mix_labels=beir("test", ["why two", "how three"])), test)
    check_held_out(Derivations(mixes=parse_mixes("1:4", 4)), test)  # nothing learned: nothing to check

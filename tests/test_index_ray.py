"""Distributed IVF-PQ builds (pipeline/index/ray/) on a 3-node ray.cluster_utils.Cluster.

Small on purpose (12k x 32 clustered vectors, 4 shards, nodes of 1 CPU, tasks of 0.5 CPU):
the module-scoped cluster is started once and every test shares it.
"""

import json
import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.index import ray as ir
from pipeline.index import IndexBuildError, load_index, recall_at_k
from pipeline.variants import Variant

V = Variant(3, "mean")
COL = V.column
DIM = 32
OPTS = dict(nlist=64, m=16, task_cpus=0.5, threads=1, chunk_rows=2000)


def clustered(n, dim=DIM, clusters=60, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return (centres[rng.integers(clusters, size=n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def _write_part(path, ids, x):
    values = pa.array(x.ravel(), pa.float32())
    pq.write_table(pa.table({"id": ids, COL: pa.FixedSizeListArray.from_arrays(values, x.shape[1])}), path,
                   row_group_size=1500)


def make_output(root, x, parts=4, prefix="doc"):
    """A minimal committed output: manifest.json + one part per shard."""
    shards, ids = [], [f"{prefix}-{i}" for i in range(len(x))]
    for p, rows in enumerate(np.array_split(np.arange(len(x)), parts)):
        folder = root / "embeddings" / f"s{p}-c0"
        folder.mkdir(parents=True)
        _write_part(folder / "part-0.parquet", [ids[i] for i in rows], x[rows])
        shards.append({"path": f"in/s{p}.parquet", "output": f"embeddings/s{p}-c0", "files": ["part-0.parquet"],
                       "rows": len(rows)})
    manifest = {"signature": {"dtype": "float32"}, "shards": shards,
                "variants": [{"name": V.name, "column": COL, "layer": 3, "pooling": "mean", "dim": x.shape[1],
                              "dtype": "float32"}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return ids


@pytest.fixture(scope="module")
def cluster(own_ray):
    import ray
    from ray.cluster_utils import Cluster

    faiss.omp_set_num_threads(1)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=c.address, logging_level="WARNING")
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def data():
    return clustered(12_000), clustered(100, seed=1)


def reference(out, x, rec, v=V, labels=None):
    """The single-process build, searched as the index's JSON says: the same trained quantiser, every
    vector added in one process, then the ``rerank x k`` candidates re-ranked by their exact cosine
    (written plainly). Returns ``search(q, k) -> (scores, labels)``."""
    trained = faiss.read_index(str(ir.parts_dir(out, v) / ir.TRAINED))
    if labels is None:
        labels = np.concatenate([np.arange(r.offset, r.offset + r.rows) for r in
                                 sorted(rec.shards.values(), key=lambda r: r.fingerprint["rel"])])
    xn = np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))
    trained.add_with_ids(xn, labels)
    trained.nprobe = rec.options["nprobe"]
    by_label = np.zeros((int(labels.max()) + 1, x.shape[1]), np.float32)
    by_label[labels] = xn
    rerank = json.loads((out / "indexes" / f"{v.name}.json").read_text())["rerank"]

    def search(q, k):
        qn = np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True))
        _, cand = trained.search(qn, k * rerank)
        exact_scores = np.einsum("qd,qkd->qk", qn, by_label[cand])
        order = np.argsort(-exact_scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact_scores, order, 1), np.take_along_axis(cand, order, 1)

    return search


def exact(x, q, ids, k=10):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return [[ids[i] for i in row] for row in np.argsort(-(qn @ xn.T), axis=1)[:, :k]]


def test_distributed_equals_single_process_ids_exact_and_recall(tmp_path, cluster, data):
    x, q = data
    ids = make_output(tmp_path, x)
    built = ir.build_ivfpq_ray(tmp_path, **OPTS)[V]
    assert built["rows"] == len(x) and built["shards"] == 4 and len(built["encoded"]) == 4
    rec = ir.read_build_record(tmp_path, V)

    # the quantiser trained on a Ray worker is the one trained in-process on the same seeded sample
    shards = ir.shards_of(tmp_path, json.loads((tmp_path / "manifest.json").read_text()))
    local = ir.train_ivfpq(str(tmp_path), [s.rel for s in shards], [s.rows for s in shards], COL, DIM, DIM,
                           rec.options, 0, 2000)
    assert bytes(local) == (ir.parts_dir(tmp_path, V) / ir.TRAINED).read_bytes()

    loaded = load_index(tmp_path / "indexes" / "L3.mean.faiss")
    assert loaded.params["ondisk"] and loaded.index.ntotal == len(x)
    # ids exact: every document once, at the label its shard's range gives it
    assert sorted(i for i in loaded.ids if i is not None) == sorted(ids)
    assert list(loaded.ids) == ids  # no holes on a first build, labels in manifest order

    assert loaded.params["rerank"] > 1
    ref_scores, ref_labels = reference(tmp_path, x, rec)(q, 10)
    scores, got = loaded.search(q, 10)
    assert got == [[ids[i] for i in row] for row in ref_labels]
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)

    truth = exact(x, q, ids)
    r_default = recall_at_k(got, truth, 10)
    _, wide = load_index(tmp_path / "indexes" / "L3.mean.faiss", nprobe=32).search(q, 10)
    assert recall_at_k(wide, truth, 10) >= r_default >= 0.8
    print(f"recall@10 vs flat: nprobe {rec.options['nprobe']} {r_default:.3f}, nprobe 32 "
          f"{recall_at_k(wide, truth, 10):.3f}; seconds per encode task: {[r.seconds for r in rec.shards.values()]}")
    built_rec = json.loads((tmp_path / "indexes" / "_built.json").read_text())
    assert built_rec[V.name]["engine"] == "ray"

    import shutil  # a moved output still loads: the lists file is found next to the index

    shutil.copytree(tmp_path / "indexes", tmp_path / "moved" / "indexes", ignore=shutil.ignore_patterns("*.parts"))
    shutil.rmtree(tmp_path / "indexes")
    assert load_index(tmp_path / "moved" / "indexes" / "L3.mean.faiss").search(q, 10)[1] == got


def test_both_engines_build_the_same_index_and_answer_alike(tmp_path, cluster, data):
    """One set of IVF-PQ rules, one seeded training sample, the same exact re-ranking: the local and the
    Ray engine give the same top 10 on the same data and flags (scores to float rounding)."""
    import shutil

    from pipeline.index import build_indexes

    x, q = data
    make_output(tmp_path / "a", x)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    local = build_indexes(tmp_path / "a", kind="ivfpq", nlist=64, m=16)[V]
    ray_built = ir.build_ivfpq_ray(tmp_path / "b", **OPTS)[V]
    assert {k: local[k] for k in ("nlist", "m", "nbits", "nprobe", "rerank", "train_rows")} == \
        {k: ray_built[k] for k in ("nlist", "m", "nbits", "nprobe", "rerank", "train_rows")}
    for nprobe, rerank in ((None, None), (4, 1), (16, 8)):  # the defaults, then two settings given at search
        sa, ga = load_index(tmp_path / "a" / "indexes" / "L3.mean.faiss", nprobe=nprobe, rerank=rerank).search(q, 10)
        sb, gb = load_index(tmp_path / "b" / "indexes" / "L3.mean.faiss", nprobe=nprobe, rerank=rerank).search(q, 10)
        assert ga == gb, (nprobe, rerank)
        np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_target_recall_reaches_its_target(tmp_path, cluster, data, engine, capsys):
    """`strata index --target-recall 0.95`: the recorded nprobe and rerank reach the target on vectors the
    tuning never saw (other corpus vectors, exact neighbours by numpy), and search prints the measurement."""
    from pipeline.cli import main

    x, _ = data
    ids = make_output(tmp_path, x)
    assert main(["index", str(tmp_path), "--kind", "ivfpq", "--engine", engine, "--nlist", "64",
                 "--target-recall", "0.95"]) == 0
    printed = capsys.readouterr().out
    params = json.loads((tmp_path / "indexes" / "L3.mean.json").read_text())
    tuned = params["tuned"]
    assert tuned["reached"] and tuned["recall"] >= 0.95 and (params["nprobe"], params["rerank"]) == (
        tuned["nprobe"], tuned["rerank"]), tuned
    assert f"recall@10 {tuned['recall']:.3f} measured at build" in printed
    # checked where the tuning could not see: 300 other corpus vectors as queries, their own id left out
    rng = np.random.default_rng(7)
    pick = rng.choice(len(x), 300, replace=False)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = xn[pick] @ xn.T
    s[np.arange(len(pick)), pick] = -np.inf
    truth = [[ids[i] for i in row] for row in np.argsort(-s, axis=1)[:, :10]]
    _, got = load_index(tmp_path / "indexes" / "L3.mean.faiss").search(x[pick], 11)
    got = [[i for i in row if i != ids[p]][:10] for row, p in zip(got, pick)]
    assert recall_at_k(got, truth, 10) >= 0.93
    # a cheaper setting would have missed the target: one list fewer searched, or a shallower re-rank
    if tuned["nprobe"] > 1:
        _, fewer = load_index(tmp_path / "indexes" / "L3.mean.faiss", nprobe=tuned["nprobe"] // 2).search(x[pick], 11)
        fewer = [[i for i in row if i != ids[p]][:10] for row, p in zip(fewer, pick)]
        assert recall_at_k(fewer, truth, 10) < recall_at_k(got, truth, 10)


class Killed(RuntimeError):
    pass


def test_resume_after_a_kill_reencodes_only_unrecorded_shards(tmp_path, cluster, data):
    x, q = data
    ids = make_output(tmp_path, x)
    seen = []

    def kill_after_two(v, key, result):
        seen.append(key)
        if len(seen) == 2:
            raise Killed("simulated kill")

    with pytest.raises(Killed):
        ir.build_ivfpq_ray(tmp_path, on_shard=kill_after_two, **OPTS)
    rec = ir.read_build_record(tmp_path, V)
    assert sorted(rec.shards) == sorted(seen)
    trained_mtime = os.stat(ir.parts_dir(tmp_path, V) / ir.TRAINED).st_mtime_ns
    parts_mtime = {k: os.stat(ir.parts_dir(tmp_path, V) / r.part).st_mtime_ns for k, r in rec.shards.items()}
    assert not (tmp_path / "indexes" / "L3.mean.faiss").exists()

    built = ir.build_ivfpq_ray(tmp_path, **OPTS)[V]
    assert sorted(built["reused"]) == sorted(seen) and len(built["encoded"]) == 2
    assert not set(built["encoded"]) & set(seen)
    assert os.stat(ir.parts_dir(tmp_path, V) / ir.TRAINED).st_mtime_ns == trained_mtime  # quantiser reused
    for k, t in parts_mtime.items():
        assert os.stat(ir.parts_dir(tmp_path, V) / rec.shards[k].part).st_mtime_ns == t  # untouched

    loaded = load_index(tmp_path / "indexes" / "L3.mean.faiss")
    assert list(loaded.ids) == ids  # the killed build's label ranges were reused: no hole, nothing twice
    ref_scores, ref_labels = reference(tmp_path, x, ir.read_build_record(tmp_path, V))(q, 10)
    id_of = {lab: i for lab, i in enumerate(loaded.ids)}
    _, got = loaded.search(q, 10)
    assert got == [[id_of[i] for i in row] for row in ref_labels]


def test_a_changed_shard_invalidates_only_its_own_lists(tmp_path, cluster, data):
    x, q = data
    ids = make_output(tmp_path, x, parts=10)  # a changed shard: 1,200 rows removed, 1,200 added (20%)
    first = ir.build_ivfpq_ray(tmp_path, **OPTS)[V]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    shards = ir.shards_of(tmp_path, manifest)
    changed = shards[1]
    rows = np.array_split(np.arange(len(x)), 10)[1]
    x2 = x.copy()
    x2[rows] = x[rows[::-1]]  # the same shard, rows reordered under new ids
    new_ids = [f"new-{i}" for i in range(len(rows))]
    _write_part(tmp_path / changed.rel, new_ids, x2[rows])

    again = ir.build_ivfpq_ray(tmp_path, **OPTS)[V]
    assert again["encoded"] == [changed.key]
    assert sorted(again["reused"]) == sorted(s.key for s in shards if s.key != changed.key)
    loaded = load_index(tmp_path / "indexes" / "L3.mean.faiss")
    want = [i for j, i in enumerate(ids) if j not in set(rows.tolist())] + new_ids
    present = [i for i in loaded.ids if i is not None]
    assert sorted(present) == sorted(want) and len(present) == len(set(present))  # none lost or duplicated
    assert len(loaded.ids) == len(x) + len(rows)  # the changed shard took a new label range
    # a new row's vector finds its new id (labels of the new range map to the new ids)
    _, got = load_index(tmp_path / "indexes" / "L3.mean.faiss", nprobe=64).search(x2[rows[:20]], 10)
    assert sum(new_ids[i] in g for i, g in enumerate(got)) >= 19
    assert first["nlist"] == again["nlist"]
    # another shard changed: 4,800 rows added or removed since training, past 20% of 12,000: trained again
    other = shards[2]
    rows2 = np.array_split(np.arange(len(x)), 10)[2]
    _write_part(tmp_path / other.rel, [f"again-{i}" for i in range(len(rows2))], x[rows2][::-1])
    third = ir.build_ivfpq_ray(tmp_path, **OPTS)[V]
    assert sorted(third["encoded"]) == sorted(s.key for s in shards) and third["reused"] == []
    assert len(load_index(tmp_path / "indexes" / "L3.mean.faiss").ids) == len(x)  # no holes after training


def test_bad_input_is_named(tmp_path, cluster, data):
    x, _ = data
    make_output(tmp_path / "a", x[:2000], parts=2)
    with pytest.raises(IndexBuildError, match=r"L9.mean not in .*; it has L3.mean"):
        ir.build_ivfpq_ray(tmp_path / "a", ["L9.mean"], **OPTS)
    with pytest.raises(IndexBuildError, match=r"too few to train nlist=64 lists.*2,496"):
        ir.build_ivfpq_ray(tmp_path / "a", **OPTS)

    bad = x[:4000].copy()
    bad[2500, 3] = np.nan
    make_output(tmp_path / "b", bad, parts=2)
    with pytest.raises(IndexBuildError, match=r"shard embeddings/s1-c0/part-0.parquet: 1 .*NaN or Inf.*doc-2500"):
        ir.build_ivfpq_ray(tmp_path / "b", nlist=16, train_rows=1000, task_cpus=0.5, chunk_rows=2000)

    make_output(tmp_path / "c", x[:3000], parts=2)
    _write_part(tmp_path / "c" / "embeddings/s1-c0/part-0.parquet", ["z"], np.ones((1, 16), np.float32))
    with pytest.raises(IndexBuildError, match=r"dim 32 in embeddings/s0-c0/part-0.parquet but 16 in "
                                              r"embeddings/s1-c0"):
        ir.build_ivfpq_ray(tmp_path / "c", **OPTS)


def test_cli_index_engines_and_search_through_the_index(tmp_path, cluster, model_dir, capsys):
    """`strata index --engine local|ray` then `strata search`: queries embedded in-process with the output's
    model and settings; flat results equal brute-force cosine; a derived variant (uniform mix) searched through
    the Ray-built on-disk IVF-PQ index answers as LoadedIndex.search on the same query vectors."""
    from pipeline.cli import main
    from pipeline.derive import vectors_for
    from pipeline.encoder import Encoder
    from pipeline.request import resolve
    from pipeline.storage import Output

    request = resolve(model_dir, layers="2:3", poolings="mean", max_length=32)
    enc = Encoder.from_request(request)
    texts = [f"document {i} about " + ["rivers", "stones", "clouds", "trees", "birds"][i % 5] * (1 + i % 3)
             for i in range(120)]
    vecs = enc.encode(texts)
    out = tmp_path / "out"
    (out / "embeddings" / "s0-c0").mkdir(parents=True)
    doc_ids = [f"d{i}" for i in range(len(texts))]
    pq.write_table(pa.table({"id": doc_ids, **{v.column: pa.FixedSizeListArray.from_arrays(
        pa.array(vecs[v].ravel(), pa.float32()), vecs[v].shape[1]) for v in request.variants}}),
        out / "embeddings" / "s0-c0" / "part-0.parquet")
    Output(str(out)).write_manifest({"signature": request.signature("text", "id"),
                                     "model": {"name": request.model.name, "n_layers": 4},
                                     "variants": request.manifest_variants(),
                                     "shards": [{"path": "a.parquet", "output": "embeddings/s0-c0",
                                                 "files": ["part-0.parquet"]}]})
    queries = ["rivers rivers", "document 7 about trees", "birds"]
    pq.write_table(pa.table({"query_id": ["q0", "q1", "q2"], "text": queries}), tmp_path / "q.parquet")

    assert main(["index", str(out), "--variants", "L3.mean", "--kind", "flat", "--engine", "local"]) == 0
    assert main(["search", str(out), "L3.mean", "--queries", str(tmp_path / "q.parquet"), "--k", "5",
                 "--out", str(tmp_path / "r.parquet")]) == 0
    got = pq.read_table(tmp_path / "r.parquet").to_pylist()
    qv = Encoder.from_request(request).encode(queries)[Variant(3, "mean")]
    want = exact(vecs[Variant(3, "mean")], qv, doc_ids, k=5)
    assert [[r["doc_id"] for r in got if r["query_id"] == q] for q in ("q0", "q1", "q2")] == want
    assert [r["rank"] for r in got[:5]] == [1, 2, 3, 4, 5]

    assert main(["index", str(out), "--mixes", "2:3", "--variants", "M2-3.mean", "--engine", "ray"]) == 0
    assert "engine ray: 1 shard(s) encoded, 0 reused" in capsys.readouterr().out
    assert main(["search", str(out), "M2-3.mean", "--queries", str(tmp_path / "q.parquet"), "--k", "4",
                 "--out", str(tmp_path / "r2.parquet")]) == 0
    got = pq.read_table(tmp_path / "r2.parquet").to_pylist()
    manifest = Output(str(out)).read_manifest()
    loaded = load_index(out / "indexes" / "M2-3.mean.faiss")
    assert loaded.params["engine"] == "ray"
    _, want = loaded.search(vectors_for(out, manifest, Variant.parse("M2-3.mean"),
                                        Encoder.from_request(request).encode(queries)), 4)
    assert [[r["doc_id"] for r in got if r["query_id"] == q] for q in ("q0", "q1", "q2")] == want

    assert main(["search", str(out), "L9.mean", "--queries", str(tmp_path / "q.parquet"), "--out",
                 str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert "L9.mean not in" in err and "it has L2.mean, L3.mean, M2-3.mean" in err
    assert main(["index", str(out), "--kind", "hnsw", "--engine", "ray"]) == 2
    assert "--engine ray builds ivfpq indexes only" in capsys.readouterr().err


def test_a_node_removed_mid_build_loses_nothing(tmp_path, cluster, data):
    """A worker node dies while shard tasks run: Ray retries its tasks elsewhere; every id is indexed once
    and the result equals the single-process build. Two variants build side by side."""
    c, nodes = cluster
    x, q = data
    ids = make_output(tmp_path, x[:8_000], parts=8)
    manifest = json.loads((tmp_path / "manifest.json").read_text())  # a second variant: the same vectors reversed
    for s in manifest["shards"]:
        part = tmp_path / s["output"] / "part-0.parquet"
        t = pq.read_table(part)
        pq.write_table(t.append_column("emb_2_mean", t.column(COL)), part)
    manifest["variants"].append(dict(manifest["variants"][0], name="L2.mean", column="emb_2_mean", layer=2))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    removed = []

    def remove_a_node(v, key, result):
        if not removed:
            removed.append(nodes[0])
            c.remove_node(nodes[0])

    try:
        built = ir.build_ivfpq_ray(tmp_path, on_shard=remove_a_node, **dict(OPTS, chunk_rows=500))
    finally:
        if removed:
            nodes[0] = c.add_node(num_cpus=1)
    assert removed and set(built) == {V, Variant(2, "mean")}
    for v, params in built.items():
        assert len(params["encoded"]) == 8
        loaded = load_index(tmp_path / "indexes" / f"{v.name}.faiss")
        assert list(loaded.ids) == ids
        rec = ir.read_build_record(tmp_path, v)
        _, labels = reference(tmp_path, x[:8_000], rec, v, labels=np.arange(8_000))(q, 10)
        assert loaded.search(q, 10)[1] == [[ids[i] for i in row] for row in labels]


def test_eval_retrieval_through_an_index(tmp_path):
    """`eval retrieval --index KIND`: scores through an in-memory index of that kind; flat equals exact."""
    from pipeline.evaldata import BeirData
    from pipeline.evaluate import evaluate_retrieval

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(30, 16))
    docs = [f"doc {i}" for i in range(600)]
    queries = [f"query {i}" for i in range(40)]
    vec = {t: centres[i % 30] + 0.2 * rng.normal(size=16) for i, t in enumerate(docs)}
    vec.update({t: centres[i % 30] + 0.2 * rng.normal(size=16) for i, t in enumerate(queries)})

    class Fake:
        def encode(self, texts):
            return {V: np.stack([vec[t] for t in texts]).astype(np.float32)}

    data = BeirData(name="toy", split="test", doc_ids=[f"d{i}" for i in range(600)], doc_texts=docs,
                    query_ids=[f"q{i}" for i in range(40)], query_texts=queries,
                    qrels={f"q{i}": {f"d{j}": 1 for j in range(i % 30, 600, 30)[:3]} for i in range(40)})
    exact_rows = {r["metric"]: r["score"] for r in evaluate_retrieval(Fake(), data)}
    flat = evaluate_retrieval(Fake(), data, index="flat")
    assert {r["metric"]: r["score"] for r in flat} == pytest.approx(exact_rows, abs=1e-6)
    assert {r["quantization"] for r in flat} == {"index:flat"}
    hnsw = {r["metric"]: r["score"] for r in evaluate_retrieval(Fake(), data, index="hnsw")}
    assert hnsw["ndcg_at_10"] == pytest.approx(exact_rows["ndcg_at_10"], abs=2.0)
    from pipeline.cli import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"sentence1": f"a {i}", "sentence2": f"b {i}", "score": i % 3}) + "\n"
                             for i in range(4)))
    assert main(["eval", "sts", str(pairs), "--output", str(tmp_path / "o"), "--index", "hnsw"]) == 2


def test_embed_plans_the_output_size_and_asks_above_the_threshold(tmp_path, model_dir, capsys, monkeypatch):
    from pipeline import sizing
    from pipeline.cli import main
    from pipeline.request import resolve

    request = resolve(model_dir, layers="2:3", poolings="mean,last", max_length=32, digest=False)
    p = sizing.projection(request, 1000)
    assert p["L2.mean"] == 1000 * request.model.dim * 4 and p["total"] == 4 * p["L2.mean"] + 1000 * sizing.ID_BYTES
    assert sizing.index_bytes("ivfpq", 10**6, 384, pq_m=96) == 104 * 10**6
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": [f"t {i}" for i in range(50)]}), tmp_path / "in" / "a.parquet")
    monkeypatch.setattr(sizing, "CONFIRM_BYTES", 1000)
    (tmp_path / "in" / "broken.parquet").write_bytes(b"not parquet")  # left to embed to report
    assert main(["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", model_dir, "--layers", "2:3"]) == 2
    err = capsys.readouterr().err
    assert "projected output: 50 rows x 2 variant(s)" in err and "pass --yes or a larger --max-output-size" in err
    assert not (tmp_path / "out").exists()


def test_run_dry_run_projects_the_size_and_run_asks_above_the_threshold(tmp_path, model_dir, monkeypatch):
    import argparse
    import io

    from pipeline import sizing
    from pipeline.jobs import add_run_arguments, cmd_run, run_job

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(30)], "text": [f"text {i}" for i in range(30)]}),
                   tmp_path / "in" / "a.parquet")
    (tmp_path / "job.yaml").write_text(f"""
name: tiny
input: {{location: in, id_column: id}}
model: {model_dir}
variants: {{layers: "1,-1", poolings: [mean]}}
embedding: {{max_length: 32, batch_tokens: 2048}}
output: out
""")
    stream = io.StringIO()
    plan = run_job(tmp_path / "job.yaml", dry_run=True, stream=stream)
    assert plan["projected_bytes"]["rows"] == 30 and plan["projected_bytes"]["total"] > 30 * 2 * 4
    assert "projected output: 30 rows x 2 variant(s)" in stream.getvalue()
    monkeypatch.setattr(sizing, "CONFIRM_BYTES", 100)
    with pytest.raises(ValueError, match="pass --yes or a larger --max-output-size"):
        cmd_run(add_run_arguments(argparse.ArgumentParser()).parse_args(["job.yaml", "-q"]))
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_the_size_limit_is_configurable_and_a_job_spec_can_consent(tmp_path, model_dir):
    from pipeline import sizing
    from pipeline.jobs import JobSpecError, load_spec
    from pipeline.request import resolve

    assert [sizing.parse_size(x) for x in ("500GB", "20 TB", "1.5tb", "750", 42)] == \
        [500 * 10**9, 20 * 10**12, 1_500_000_000_000, 750, 42]
    with pytest.raises(ValueError, match="size 'lots': write a number with a unit"):
        sizing.parse_size("lots")
    request = resolve(model_dir, layers="1,-1", poolings="mean", max_length=32, digest=False)
    total = sizing.projection(request, 1000)["total"]
    with pytest.raises(ValueError, match="above"):
        sizing.check_size(request, 1000, yes=False, limit=total - 1)
    sizing.check_size(request, 1000, yes=False, limit=f"{total}B")  # within the consented size: goes on
    sizing.check_size(request, 1000, yes=True, limit=1)  # --yes always goes on
    bad = tmp_path / "job.yaml"
    bad.write_text("name: t\ninput: {location: in}\nmodel: x\noutput: out\nembedding: {max_output_size: huge}\n")
    with pytest.raises(JobSpecError, match="max_output_size"):
        load_spec(bad, check_model=False)


def test_engine_choice():
    assert ir.choose_engine("auto", ir.RAY_MIN_ROWS) == "local"
    assert ir.choose_engine("auto", ir.RAY_MIN_ROWS + 1) == "ray"
    assert ir.choose_engine("auto", 10, "ray://head:10001") == "ray"
    assert ir.choose_engine("local", 10**9) == "local"
    with pytest.raises(IndexBuildError, match="choose from auto, local, ray"):
        ir.choose_engine("spark", 1)

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import index as idx
from pipeline.index import IndexBuildError, build_index, choose_kind, load_index, recall_at_k

COL = "emb_3_mean"


pytestmark = pytest.mark.usefixtures("faiss_one_thread")


def clustered(n, dim=32, clusters=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return (centres[rng.integers(clusters, size=n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def write_files(tmp_path, x, parts=2, dtype=pa.float32(), fmt="parquet"):
    """Split x into files with an id column and a fixed_size_list embedding column."""
    paths, ids = [], [f"doc-{i}" for i in range(len(x))]
    for p, rows in enumerate(np.array_split(np.arange(len(x)), parts)):
        values = pa.array(x[rows].ravel().astype(dtype.to_pandas_dtype()), dtype)
        table = pa.table({"id": [ids[i] for i in rows], COL: pa.FixedSizeListArray.from_arrays(values, x.shape[1])})
        path = tmp_path / f"part-{p}.{fmt}"
        if fmt == "parquet":
            pq.write_table(table, path, row_group_size=300)
        else:
            with pa.ipc.new_file(path, table.schema) as w:
                w.write_table(table, max_chunksize=250)
        paths.append(path)
    return paths, ids


def brute_force(x, q, k):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qn @ xn.T
    top = np.argsort(-sims, axis=1)[:, :k]
    return np.take_along_axis(sims, top, axis=1), top


@pytest.fixture(scope="module")
def data():
    return clustered(2000), clustered(50, seed=1)


def test_flat_equals_brute_force_cosine(tmp_path, data):
    x, q = data
    files, ids = write_files(tmp_path, x)
    params = build_index(files, COL, tmp_path / "indexes" / "L3.mean.faiss", kind="flat")
    assert (params["kind"], params["rows"], params["dim"]) == ("flat", 2000, 32)
    scores, found = load_index(tmp_path / "indexes" / "L3.mean.faiss").search(q * 3.0, 10)  # unnormalised queries
    exact_s, exact_i = brute_force(x, q, 10)
    assert found == [[ids[i] for i in row] for row in exact_i]
    np.testing.assert_allclose(scores, exact_s, atol=1e-5)


def test_sidecars_record_ids_in_index_order_and_parameters(tmp_path, data):
    x, _ = data
    files, ids = write_files(tmp_path, x, parts=3)
    out = tmp_path / "L3.mean.faiss"
    build_index(files, COL, out, kind="hnsw", ef_search=64)
    assert pq.read_table(tmp_path / "L3.mean.ids.parquet").column("id").to_pylist() == ids
    params = json.loads((tmp_path / "L3.mean.json").read_text())
    assert params["kind"] == "hnsw" and params["hnsw_M"] == 32 and params["efSearch"] == 64
    assert load_index(out).index.hnsw.efSearch == 64
    assert load_index(out, ef_search=200).index.hnsw.efSearch == 200
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("kind, threshold", [("hnsw", 0.95), ("ivfpq", 0.88)])
def test_approximate_kinds_recall_against_flat(tmp_path, data, kind, threshold):
    x, q = data
    files, _ = write_files(tmp_path, x)
    build_index(files, COL, tmp_path / "flat.faiss", kind="flat")
    params = build_index(files, COL, tmp_path / f"{kind}.faiss", kind=kind)
    _, exact = load_index(tmp_path / "flat.faiss").search(q, 10)
    scores, approx = load_index(tmp_path / f"{kind}.faiss").search(q, 10)
    assert recall_at_k(approx, exact, 10) >= threshold
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    if kind == "ivfpq":
        assert params["dim"] % params["m"] == 0 and params["rerank"] == 8
        assert isinstance(load_index(tmp_path / "ivfpq.faiss").index, faiss.IndexRefineFlat)
        _, unrefined = load_index(tmp_path / "ivfpq.faiss", rerank=1).search(q, 10)
        assert recall_at_k(unrefined, exact, 10) < recall_at_k(approx, exact, 10)  # exact re-ranking pays


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_tiny_chunks_build_the_same_index(tmp_path, data, kind):
    x, q = data
    files, _ = write_files(tmp_path, x)
    build_index(files, COL, tmp_path / "one.faiss", kind=kind)
    build_index(files, COL, tmp_path / "many.faiss", kind=kind, chunk_rows=7)
    one, many = load_index(tmp_path / "one.faiss"), load_index(tmp_path / "many.faiss")
    assert list(one.ids) == list(many.ids)
    s1, i1 = one.search(q, 10)
    s2, i2 = many.search(q, 10)
    assert i1 == i2
    np.testing.assert_allclose(s1, s2, atol=1e-6)


def test_variable_list_columns_are_accepted(tmp_path, data):
    # Ray's tensor column read back by plain pyarrow is list<float>, not fixed_size_list.
    x, q = data
    table = pa.table({"id": [str(i) for i in range(300)], COL: pa.array(x[:300].tolist(), pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "v.parquet")
    assert build_index([tmp_path / "v.parquet"], COL, tmp_path / "v.faiss")["dim"] == 32
    _, found = load_index(tmp_path / "v.faiss").search(q, 3)
    assert found == [[str(i) for i in row] for row in brute_force(x[:300], q, 3)[1]]


def test_float16_columns_and_arrow_ipc_files(tmp_path, data):
    x, q = data
    x16 = x.astype(np.float16)
    files, ids = write_files(tmp_path, x16, dtype=pa.float16(), fmt="arrow")
    build_index(files, COL, tmp_path / "h.faiss", kind="flat", chunk_rows=100)
    scores, found = load_index(tmp_path / "h.faiss").search(q, 5)
    exact_s, exact_i = brute_force(x16.astype(np.float32), q, 5)
    assert found == [[ids[i] for i in row] for row in exact_i]
    np.testing.assert_allclose(scores, exact_s, atol=1e-5)


def test_auto_kind_follows_the_size_rule(tmp_path, data, monkeypatch):
    assert [choose_kind(n) for n in (99_999, 100_000, 1_000_000, 1_000_001)] == ["flat", "hnsw", "hnsw", "ivfpq"]
    files, _ = write_files(tmp_path, data[0])
    assert build_index(files, COL, tmp_path / "a.faiss")["kind"] == "flat"
    monkeypatch.setattr(idx.params, "FLAT_MAX_ROWS", 1000)
    assert build_index(files, COL, tmp_path / "b.faiss")["kind"] == "hnsw"


def test_errors_name_the_problem(tmp_path, data):
    x, _ = data
    files, _ = write_files(tmp_path, x)
    with pytest.raises(IndexBuildError, match=r"no column 'emb_9_max' \(embedding columns: emb_3_mean\)"):
        build_index(files, "emb_9_max", tmp_path / "x.faiss")
    with pytest.raises(IndexBuildError, match="must end in .faiss"):
        build_index(files, COL, tmp_path / "x.index")
    (tmp_path / "d16").mkdir()
    other, _ = write_files(tmp_path / "d16", x[:, :16].copy(), parts=1)
    with pytest.raises(IndexBuildError, match=r"different dims across files: \[16, 32\]"):
        build_index(files + other, COL, tmp_path / "x.faiss")
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(64, np.float32)), 32)
    pq.write_table(pa.table({"id": ["ok", "gap", "ok2"], COL: pa.concat_arrays([vectors[:1], pa.nulls(1, vectors.type),
                                                                         vectors[1:]])}), tmp_path / "null.parquet")
    with pytest.raises(IndexBuildError, match=r"id 'gap' has a null emb_3_mean"):
        build_index([tmp_path / "null.parquet"], COL, tmp_path / "x.faiss")
    with pytest.raises(FileNotFoundError, match="ids.parquet"):
        (tmp_path / "lonely.faiss").write_bytes(b"")
        load_index(tmp_path / "lonely.faiss")


def test_recall_at_k_by_hand():
    exact = [["a", "b", "c"], ["x", "y", "z"]]
    approx = [["a", "c", "q"], ["z", "y", "x"]]
    assert recall_at_k(approx, exact, 3) == pytest.approx((2 / 3 + 1) / 2)
    assert recall_at_k(approx, exact, 1) == pytest.approx(0.5)


@pytest.mark.parametrize("with_ids", [True, False])
def test_an_empty_query_is_refused_naming_the_file_and_the_query(tmp_path, with_ids):
    from pipeline.search import read_queries

    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({"query_id": ["q0", "q1", "q2"], "text": ["rivers", "  ", ""]}) if with_ids else
                   pa.table({"text": ["rivers", "  ", ""]}), path)
    with pytest.raises(ValueError) as e:
        read_queries(path)
    assert str(e.value) == (f"{path}: 2 empty or whitespace-only 'text' value(s), e.g. query "
                            f"{'id ' + repr('q1') if with_ids else 'row 1'}; every query needs text")

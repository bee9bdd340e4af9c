"""Quantised outputs (pipeline/quantize.py): the numbers against plain references and
sentence-transformers, plain Arrow columns, the embed job, indexes (Hamming, int8, rescoring),
evaluation and the one-line errors."""

import json
import math
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import index as idx
from pipeline import quantize as qz
from pipeline.quantize import QuantizationError


pytestmark = pytest.mark.usefixtures("faiss_one_thread")


def vectors(n=300, dim=48, seed=0):
    rng = np.random.default_rng(seed)
    # anisotropic, with an outlier dimension, like raw hidden states
    x = rng.normal(size=(n, dim)) * rng.uniform(0.2, 3.0, size=dim)
    x[:, 3] += 20
    return x.astype(np.float32)


# --------------------------------------------------------------------------- plain references


def reference_int8(x, ranges):
    """Element by element in float64: unit rows, bucket index floor((v - min) / step) clipped to
    0..255, minus 128. Also says which values lie on a bucket edge (within 1e-3 of a step)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(x.shape, dtype=np.int64)
    edge = np.zeros(x.shape, dtype=bool)
    for i, row in enumerate(x):
        norm = math.sqrt(sum(v * v for v in row))
        for j, v in enumerate(row):
            u = v / norm
            lo, hi = float(ranges[0][j]), float(ranges[1][j])
            step = (hi - lo) / 255 if hi > lo else 1.0
            t = (u - lo) / step
            out[i, j] = min(255, max(0, math.floor(t))) - 128
            edge[i, j] = abs(t - round(t)) < 1e-3
    return out, edge


def reference_bits(x):
    """Byte b holds dimensions 8b..8b+7, dimension 8b in its high bit."""
    out = np.zeros((len(x), x.shape[1] // 8), dtype=np.int64)
    for i, row in enumerate(x):
        for j, v in enumerate(row):
            if v > 0:
                out[i, j // 8] |= 1 << (7 - j % 8)
    return out


def test_int8_equals_a_plain_reference_and_sentence_transformers():
    x = vectors()
    ranges = qz.calibrate(x[:100])
    codes = qz.quantize_int8(x, ranges)
    assert codes.dtype == np.int8 and codes.shape == x.shape
    ref, edge = reference_int8(x, ranges)
    # float32 (ours) and float64 (the reference) may put a value on a bucket edge on either side
    # (the calibration's own min and max are such values); everywhere else they agree exactly
    assert np.array_equal(codes[~edge], ref[~edge]) and np.abs(codes - ref).max() <= 1
    assert edge.mean() < 0.01
    st = pytest.importorskip("sentence_transformers.util.quantization",
                             reason="sentence-transformers not installed: codes not compared with it")
    theirs = st.quantize_embeddings(qz.unit_rows(x), precision="int8", ranges=ranges)
    assert np.array_equal(codes, theirs)  # truncation, as sentence-transformers does: the same codes


def test_int8_round_trip_within_half_a_step():
    x = vectors()
    ranges = qz.calibrate(x)  # every value inside the calibrated range
    u = qz.unit_rows(x)
    back = qz.dequantize_int8(qz.quantize_int8(x, ranges), ranges)
    step = (ranges[1] - ranges[0]) / 255
    assert (np.abs(back - u) <= step / 2 * (1 + 1e-4) + 1e-7).all()
    # the range's ends come back inside the range's first and last buckets
    assert np.allclose(qz.dequantize_int8(np.full((1, x.shape[1]), -128), ranges)[0], ranges[0] + step / 2)


def test_int8_values_outside_the_calibration_are_clipped_and_constant_dimensions_work():
    x = vectors()
    ranges = qz.calibrate(x[:20])
    codes = qz.quantize_int8(x * np.array([-1] * 10 + [1] * 38, dtype=np.float32), ranges)
    assert codes.min() >= -128 and codes.max() <= 127
    const = np.ones((5, 8), dtype=np.float32)
    r = qz.calibrate(const)
    assert np.array_equal(qz.quantize_int8(const, r), np.full((5, 8), -128))
    assert np.allclose(qz.dequantize_int8(qz.quantize_int8(const, r), r), qz.unit_rows(const), atol=1e-7)


def test_a_dimension_constant_in_the_calibration_decodes_to_its_value():
    """A dimension that is always 0 (or any one value) in the calibration sample decodes to that value,
    in and out of the calibrated range, by quantize and by FAISS's QT_8bit given the same ranges."""
    import faiss

    from pipeline.index import sq_trained

    x = vectors(40, 16)
    x[:, 3] = 0.0
    ranges = qz.calibrate(x)
    assert ranges[0, 3] == ranges[1, 3] == 0
    new = vectors(10, 16, seed=7)  # dimension 3 is not 0 here: outside the calibrated range
    for rows in (x, new):
        back = qz.dequantize_int8(qz.quantize_int8(rows, ranges), ranges)
        assert np.abs(back[:, 3]).max() < 1e-20
    keep = np.arange(16) != 3  # the other dimensions of the calibration rows: within half a step
    half = (ranges[1] - ranges[0])[keep] / 255 / 2 + 1e-6
    back_x = qz.dequantize_int8(qz.quantize_int8(x, ranges), ranges)
    assert np.all(np.abs(back_x[:, keep] - qz.unit_rows(x)[:, keep]) <= half)
    sq = faiss.IndexScalarQuantizer(16, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(sq_trained(ranges), sq.sq.trained)
    sq.is_trained = True
    for rows in (x, new):  # the index adds bucket centres (index.factory.add_vectors): FAISS codes them to the same bytes
        q = qz.quantize_int8(rows, ranges)
        codes = sq.sa_encode(qz.dequantize_int8(q, ranges))
        assert np.array_equal(codes.view(np.uint8).astype(np.int16) - 128, q)
        decoded = sq.sa_decode(codes)
        assert np.abs(decoded[:, 3]).max() < 1e-20
        assert np.allclose(decoded, qz.dequantize_int8(q, ranges), atol=1e-6)


def test_calibration_needs_two_rows():
    with pytest.raises(QuantizationError, match="at least 2 vectors, got 1"):
        qz.calibrate(vectors(1))
    with pytest.raises(QuantizationError, match=r"calibration rows 1"):
        qz.Quantized("int8", calibration_rows=1)


def test_binary_equals_a_plain_reference_and_sentence_transformers_ubinary():
    x = vectors(50, 48) - 0.1
    bits = qz.binarize(x)
    assert bits.dtype == np.uint8 and bits.shape == (50, 6)
    assert np.array_equal(bits, reference_bits(x))
    st = pytest.importorskip("sentence_transformers.util.quantization",
                             reason="sentence-transformers not installed: bit order not compared with it")
    assert np.array_equal(bits, st.quantize_embeddings(x, precision="ubinary"))
    assert np.array_equal(qz.unpack_bits(bits), (x > 0).astype(np.uint8))


def test_sign_vectors_give_cosine_one_minus_twice_hamming_over_dim():
    x, y = vectors(20, 64, seed=1), vectors(20, 64, seed=2)
    bx, by = qz.binarize(x), qz.binarize(y)
    ham = np.unpackbits(bx[:, None, :] ^ by[None, :, :], axis=2).sum(axis=2)
    assert np.allclose(qz.sign_vectors(bx) @ qz.sign_vectors(by).T, 1 - 2 * ham / 64, atol=1e-6)


def test_binary_dim_not_divisible_by_8_is_one_line_naming_the_dim():
    from pipeline.request import EncodeSettings, ModelInfo, Request
    from pipeline.variants import Variant

    with pytest.raises(QuantizationError, match="dim 100 is not divisible by 8") as e:
        qz.binarize(np.ones((2, 100)))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="dim 100 is not divisible by 8"):
        Request(model=ModelInfo(name="m", path="/m", n_layers=2, dim=100), variants=(Variant(1, "mean"),),
                settings=EncodeSettings(dtype="binary", batch_tokens=64))
    Request(model=ModelInfo(name="m", path="/m", n_layers=2, dim=100), variants=(Variant(1, "mean"),),
            settings=EncodeSettings(dtype="int8", batch_tokens=64))  # int8 has no such constraint


def test_columns_are_plain_arrow_read_back_by_pyarrow(tmp_path):
    x = vectors(10, 16)
    ranges = qz.calibrate(x)
    table = pa.table({"id": [str(i) for i in range(10)],
                      "emb_1_mean": qz.to_arrow(qz.quantize("int8", x, ranges)),
                      "emb_2_mean": qz.to_arrow(qz.quantize("binary", x))})
    pq.write_table(table, tmp_path / "part.parquet")
    back = pq.read_table(tmp_path / "part.parquet")
    assert back.schema.field("emb_1_mean").type == pa.list_(pa.int8(), 16) == qz.arrow_type("int8", 16)
    assert back.schema.field("emb_2_mean").type == pa.list_(pa.uint8(), 2) == qz.arrow_type("binary", 16)
    assert np.array_equal(np.stack(back.column("emb_2_mean").to_pylist()), qz.binarize(x))
    assert np.array_equal(qz.from_arrow(back.column("emb_1_mean")), qz.quantize_int8(x, ranges))
    assert qz.bytes_per_vector("int8", 16) == 16 and qz.bytes_per_vector("binary", 16) == 2


def test_ranges_file_is_plain_parquet(tmp_path):
    from pipeline.storage import Output

    r = {"L1.mean": qz.calibrate(vectors(10, 8)), "L2.mean": qz.calibrate(vectors(10, 8, seed=3))}
    rel = qz.write_ranges(Output(str(tmp_path)), r, {"L1.mean": "emb_1_mean", "L2.mean": "emb_2_mean"}, {"rows": 10})
    t = pq.read_table(tmp_path / rel)
    assert t.column("variant").to_pylist() == ["L1.mean", "L2.mean"]
    assert t.schema.field("min").type == pa.list_(pa.float32(), 8)
    back, calibration = qz.read_ranges(str(tmp_path))
    assert calibration == {"rows": 10} and all(np.array_equal(back[k], r[k]) for k in r)
    with pytest.raises(QuantizationError, match="lack variant"):
        qz.ranges_for(back, ["L3.mean"], 8, "there")


# --------------------------------------------------------------------------- indexes


def write_column(tmp_path, stored, name="part.parquet"):
    ids = [f"doc-{i}" for i in range(len(stored))]
    path = tmp_path / name
    pq.write_table(pa.table({"id": ids, "emb_1_mean": qz.to_arrow(stored)}), path, row_group_size=97)
    return path, ids


def test_binary_index_equals_brute_force_hamming(tmp_path):
    x, q = vectors(500, 64), vectors(12, 64, seed=9)
    x -= x.mean(axis=0)
    bits = qz.binarize(x)
    path, ids = write_column(tmp_path, bits)
    params = idx.build_index([path], "emb_1_mean", tmp_path / "i.faiss", "flat", dtype="binary", chunk_rows=64)
    assert params["metric"] == "hamming" and params["dim"] == 64 and params["dtype"] == "binary"
    loaded = idx.load_index(tmp_path / "i.faiss")
    assert isinstance(loaded.index, faiss.IndexBinaryFlat)
    scores, got = loaded.search(q - x.mean(axis=0) * 0, 20)
    ham = np.unpackbits(qz.binarize(q)[:, None, :] ^ bits[None, :, :], axis=2).sum(axis=2)
    want = np.sort(ham, axis=1)[:, :20]
    assert np.allclose(scores, 1 - 2 * want / 64)
    pos = {d: i for i, d in enumerate(ids)}
    for r in range(len(q)):  # every returned id has the Hamming distance its score says
        assert [ham[r, pos[d]] for d in got[r]] == want[r].tolist()


def test_int8_index_stores_the_codes_and_scores_the_decoded_documents(tmp_path):
    x, q = vectors(400, 32), vectors(10, 32, seed=4)
    ranges = qz.calibrate(x[:100])
    codes = qz.quantize_int8(x, ranges)
    path, ids = write_column(tmp_path, codes)
    params = idx.build_index([path], "emb_1_mean", tmp_path / "i.faiss", "flat", dtype="int8", ranges=ranges)
    assert params["dtype"] == "int8" and params["dim"] == 32
    loaded = idx.load_index(tmp_path / "i.faiss")
    stored = faiss.vector_to_array(loaded.index.codes).reshape(-1, 32)
    assert np.array_equal(stored.astype(np.int16) - 128, codes)  # 1 byte per dimension: our codes, unchanged
    scores, got = loaded.search(q, 15)
    sims = qz.unit_rows(q) @ qz.dequantize_int8(codes, ranges).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :15]
    assert np.allclose(scores, np.take_along_axis(sims, top, axis=1), atol=1e-4)
    assert [[ids[i] for i in row] for row in top] == got
    with pytest.raises(idx.IndexBuildError, match=r"ranges of shape \(2, 32\)"):
        idx.build_index([path], "emb_1_mean", tmp_path / "j.faiss", "flat", dtype="int8", ranges=None)


def flipped_docs(dim=64, seed=0):
    """Docs whose Hamming order disagrees with their float cosine order (rescoring's case).

    The query has 8 large and 56 small coordinates. A document is the query with some signs
    flipped: flipping a large one costs far more cosine than flipping several small ones, but
    counts as one bit. Float order: fewer large flips first, then fewer small flips."""
    rng = np.random.default_rng(seed)
    q = np.where(np.arange(dim) < 8, 3.0, 0.1) * rng.choice([-1, 1], size=dim)
    docs, keys = [], []
    for big in range(3):
        for small in range(0, 14, 2):
            d = q.copy()
            d[rng.choice(8, size=big, replace=False)] *= -1
            d[8 + rng.choice(dim - 8, size=small, replace=False)] *= -1
            docs.append(d)
            keys.append((big, small))
    return q[None].astype(np.float32), np.array(docs, dtype=np.float32)


def test_rescoring_recovers_the_float32_order_binary_alone_does_not():
    q, docs = flipped_docs()
    ids = [f"d{i}" for i in range(len(docs))]
    k = 10
    float_top = idx.memory_index(ids, docs).search(q, k)[1][0]
    plain = idx.memory_index(ids, qz.binarize(docs), "binary").search(q, k)[1][0]
    rescored_scores, rescored = idx.memory_index(ids, qz.binarize(docs), "binary", rescore=3).search(q, k)
    assert plain != float_top  # Hamming alone mixes them up
    assert rescored[0] == float_top
    assert (np.diff(rescored_scores[0]) <= 0).all()
    # rescore=1 (or 0) is off; a search-time value overrides the index's
    assert idx.memory_index(ids, qz.binarize(docs), "binary", rescore=3).search(q, k, rescore=0)[1][0] == plain


def test_int8_rescoring_uses_cosine_of_the_decoded_documents():
    x, q = vectors(300, 32), vectors(5, 32, seed=7)
    ranges = qz.calibrate(x)
    li = idx.memory_index([str(i) for i in range(300)], qz.quantize_int8(x, ranges), "int8", ranges, rescore=4)
    scores, got = li.search(q, 10)
    dec = qz.unit_rows(qz.dequantize_int8(qz.quantize_int8(x, ranges), ranges))
    sims = qz.unit_rows(q) @ dec.T
    want = np.sort(sims, axis=1)[:, ::-1][:, :10]
    assert np.allclose(scores, want, atol=1e-5)


@pytest.mark.parametrize("dtype", ["int8", "binary"])
def test_approximate_kinds_of_quantised_indexes_build_load_and_find_neighbours(tmp_path, dtype):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32))
    x = (centres[rng.integers(20, size=3000)] + 0.2 * rng.normal(size=(3000, 32))).astype(np.float32)
    q = x[:25] + 0.05
    ranges = qz.calibrate(x[:500]) if dtype == "int8" else None
    path, ids = write_column(tmp_path, qz.quantize(dtype, x, ranges))
    flat = idx.memory_index(ids, qz.quantize(dtype, x, ranges), dtype, ranges).search(q, 10)[1]
    for kind, built_kind in (("hnsw", "hnsw"), ("ivfpq", "ivf")):
        out = tmp_path / f"{kind}.faiss"
        params = idx.build_index([path], "emb_1_mean", out, kind, dtype=dtype, ranges=ranges, rescore=2)
        assert params["kind"] == built_kind and params["rescore"] == 2
        loaded = idx.load_index(out)
        _, got = loaded.search(q, 10)  # rescoring reconstructs documents by id (IVF: direct map)
        assert idx.recall_at_k(got, flat, 10) > 0.6, kind


def test_derived_variants_of_quantised_columns_are_refused(tmp_path):
    from pipeline.derive import Reader
    from pipeline.variants import Variant

    path, _ = write_column(tmp_path, qz.binarize(vectors(20, 16)))
    reader = Reader(Variant(1, "mean", mix=None, transform="center"), ("emb_1_mean",))
    with pytest.raises(idx.IndexBuildError, match="derived variants"):
        idx.build_index([path], reader, tmp_path / "d.faiss", "flat", dtype="binary")


# --------------------------------------------------------------------------- evaluation


class FakeEncoder:
    def __init__(self, table):
        self.table = table

    def encode(self, texts):
        from pipeline.variants import Variant

        return {Variant(1, "mean"): np.stack([self.table[t] for t in texts])}


def test_quantised_retrieval_and_sts_rows(tmp_path):
    from pipeline.evaldata import BeirData, StsData
    from pipeline.evaluate import evaluate_retrieval, evaluate_sts
    from pipeline.report import best_variants, merge_results

    rng = np.random.default_rng(0)
    docs = rng.normal(size=(60, 32)).astype(np.float32)
    queries = docs[:20] + 0.3 * rng.normal(size=(20, 32)).astype(np.float32)
    table = {f"doc {i}": v for i, v in enumerate(docs)} | {f"query {i}": v for i, v in enumerate(queries)}
    data = BeirData("toy", [f"d{i}" for i in range(60)], [f"doc {i}" for i in range(60)],
                    [f"q{i}" for i in range(20)], [f"query {i}" for i in range(20)],
                    {f"q{i}": {f"d{i}": 1} for i in range(20)})
    enc = FakeEncoder(table)
    full = evaluate_retrieval(enc, data)
    int8 = evaluate_retrieval(enc, data, quantized=qz.Quantized("int8"))
    binary = evaluate_retrieval(enc, data, quantized=qz.Quantized("binary", rescore=4))
    score = {r["metric"]: r["score"] for r in int8}
    assert {r["quantization"] for r in int8} == {"int8"} and {r["quantization"] for r in binary} == {"binary+rescore4"}
    assert abs(score["ndcg_at_10"] - next(r["score"] for r in full if r["metric"] == "ndcg_at_10")) < 5
    sts = StsData("toy-sts", [f"doc {i}" for i in range(30)], [f"query {i}" for i in range(20)] + [f"doc {i}" for i in
                                                                                                   range(30, 40)],
                  np.r_[np.ones(20), np.zeros(10)])
    sts_rows = evaluate_sts(enc, sts, quantized=qz.Quantized("binary", rescore=4))
    assert {r["quantization"] for r in sts_rows} == {"binary"}  # rescoring is a retrieval notion
    merged = merge_results(tmp_path, full + int8 + binary)
    assert len(merged) == 9  # a quantised row never replaces the float one
    assert set(best_variants(merged)) == {"toy", "toy [int8]", "toy [binary+rescore4]"}


# --------------------------------------------------------------------------- the embed job (Ray)


def write_texts(directory: Path, shards: list[list[tuple[str, str]]], first_part=0):
    """Shards of (id, text) rows."""
    directory.mkdir(parents=True, exist_ok=True)
    for k, rows in enumerate(shards):
        pq.write_table(pa.table({"id": [i for i, _ in rows], "text": [t for _, t in rows]}),
                       directory / f"part-{first_part + k}.parquet")


def texts(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    return [" ".join(rng.choice(words, size=rng.integers(3, 30))) for _ in range(n)]


def test_embed_int8_and_binary_one_row_per_input_row(ray_local, model_dir, tmp_path):
    from pipeline import Encoder
    from pipeline.runner import read_embeddings
    from reference import embed

    corpus = texts(240)
    rows = [(f"t{i}", t) for i, t in enumerate(corpus)]
    write_texts(tmp_path / "in", [rows[:100], rows[100:160], rows[160:200] + [("blank", ""), ("space", "  ")]])
    opts = dict(model=model_dir, layers="1,-1", poolings="mean,last", id_column="id", progress=False)
    out = tmp_path / "int8"
    s = embed(str(tmp_path / "in"), str(out), dtype="int8", calibration_rows=50, **opts)
    assert s.rows == 202 and s.rows_rejected == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["rows"] == 50 and manifest["calibration"]["ranges"] == qz.RANGES_FILE
    assert all(v["dtype"] == "int8" and v["quantization"]["ranges"] == qz.RANGES_FILE for v in manifest["variants"])
    table = read_embeddings(str(out))
    got = table.column("id").to_pylist()
    assert sorted(got) == sorted(f"t{i}" for i in range(200)) and len(set(got)) == 200  # exactly once
    ranges, _ = qz.read_ranges(str(out))
    enc = Encoder.load(model_dir, layers="1,-1", poolings="mean,last")
    ref = enc.encode([corpus[int(i[1:])] for i in got])
    assert set(ranges) == {v.name for v in enc.variants}
    for v in enc.variants:
        assert table.schema.field(v.column).type == pa.list_(pa.int8(), 32)
        assert np.allclose(ranges[v.name], qz.calibrate(enc.encode(corpus[:50])[v]), atol=1e-5)
        codes = qz.from_arrow(table.column(v.column))
        want = qz.quantize_int8(ref[v], ranges[v.name])
        assert np.abs(codes.astype(int) - want).max() <= 1 and np.mean(codes == want) > 0.99, v.name

    # incremental: a new shard is coded with the same ranges (no recalibration)
    before = (out / qz.RANGES_FILE).read_bytes()
    write_texts(tmp_path / "in", [rows[200:240]], first_part=3)
    s = embed(str(tmp_path / "in"), str(out), dtype="int8", calibration_rows=7, **opts)
    assert s.shards_embedded == 1 and (out / qz.RANGES_FILE).read_bytes() == before
    assert read_embeddings(str(out)).num_rows == 240

    # a new output reusing those ranges; then its indexes
    other = tmp_path / "int8-again"
    embed(str(tmp_path / "in"), str(other), dtype="int8", int8_ranges=str(out), **opts)
    again, calibration = qz.read_ranges(str(other))
    assert all(np.array_equal(again[k], ranges[k]) for k in ranges)
    assert json.loads((other / "manifest.json").read_text())["calibration"]["source"].startswith("the ranges of")
    built = idx.build_indexes(other, rescore=2)
    assert {p["dtype"] for p in built.values()} == {"int8"} and {p["rows"] for p in built.values()} == {240}
    loaded = idx.load_index(idx.index_path(other, enc.variants[0]))
    assert loaded.search(ref[enc.variants[0]][:3], 5)[1][0][0] == got[0]

    out = tmp_path / "binary"
    s = embed(str(tmp_path / "in"), str(out), dtype="binary", **opts)
    assert s.rows == 242 and s.rows_rejected == 2
    table = read_embeddings(str(out))
    got = table.column("id").to_pylist()
    assert len(got) == len(set(got)) == 240
    ref = enc.encode([corpus[int(i[1:])] for i in got])
    for v in enc.variants:
        assert table.schema.field(v.column).type == pa.list_(pa.uint8(), 4)
        bits = qz.from_arrow(table.column(v.column))
        assert np.mean(qz.unpack_bits(bits) == (ref[v] > 0)) > 0.999
    assert "calibration" not in json.loads((out / "manifest.json").read_text())
    built = idx.build_indexes(out)
    assert {p["metric"] for p in built.values()} == {"hamming"}


def test_cli_binary_dim_error_and_refusals(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaModel

    from pipeline.cli import main

    odd = tmp_path / "odd"
    cfg = LlamaConfig(vocab_size=97, hidden_size=36, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1)
    LlamaModel(cfg).save_pretrained(odd)
    write_texts(tmp_path / "in", [[("a", "a text"), ("b", "another")]])
    rc = main(["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(odd), "--dtype", "binary", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "dim 36 is not divisible by 8" in err[0]
    rc = main(["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(odd), "--dtype", "int8",
               "--transforms", "center", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "derived variants" in err[0]


def test_job_with_int8_embeds_indexes_and_scores_quantised(ray_local, model_dir, tmp_path, monkeypatch):
    from pipeline.jobs import JobSpecError, load_spec, run_job

    monkeypatch.chdir(tmp_path)
    corpus = texts(80, seed=3)
    write_texts(tmp_path / "in", [[(f"t{i}", t) for i, t in enumerate(corpus[:40])],
                                  [(f"t{i}", t) for i, t in enumerate(corpus[40:], 40)]])
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"sentence1": corpus[i], "sentence2": corpus[i + 1], "score": float(i % 5)}) + "\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(f"""
name: q
input: {{location: in, id_column: id}}
model: {model_dir}
variants: {{layers: "1", poolings: [mean]}}
embedding: {{max_length: 64, dtype: int8, calibration_rows: 30}}
resources: {{actors: 1}}
output: out
indexes: {{kind: flat, rescore: 2}}
evaluations:
  - {{task: sts, data: pairs.jsonl}}
""")
    summary = run_job(spec, progress=False, stream=open(tmp_path / "log.txt", "w"))
    version = Path(summary["version_path"])
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["signature"]["dtype"] == "int8" and manifest["calibration"]["rows"] == 30
    published = version / "published" / summary["published"]  # indexes belong to the published version
    params = json.loads((published / "indexes" / "L1.mean.json").read_text())
    assert params["dtype"] == "int8" and params["rescore"] == 2 and params["rows"] == 80
    assert (published / "quantization" / "int8_ranges.parquet").is_file()  # its ranges travel with it
    rows = json.loads((version / "eval" / "results.json").read_text())
    assert rows and {r.get("quantization") for r in rows} == {"int8"}
    spec.write_text(spec.read_text().replace("poolings: [mean]}", "poolings: [mean], transforms: [center]}"))
    with pytest.raises(JobSpecError, match="embedding.dtype: int8: derived variants"):
        load_spec(spec)


def test_index_only_job_on_an_object_store_int8_output(tmp_path, monkeypatch):
    """An int8 output on a store is indexed from the store, with its ranges (nothing mirrored)."""
    import io
    import os

    import fsspec

    from pipeline.jobs import run_job
    from pipeline.storage import Output

    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    root = f"/strata-q-{os.getpid()}/out"
    x = vectors(40, 16)
    ranges = qz.calibrate(x[:20])
    with fs.open(f"{root}/embeddings/a-1/part-0.parquet", "wb") as f:
        pq.write_table(pa.table({"id": [f"d{i}" for i in range(40)],
                                 "emb_2_mean": qz.to_arrow(qz.quantize_int8(x, ranges))}), f)
    qz.write_ranges(Output(f"memory://{root}"), {"L2.mean": ranges}, {"L2.mean": "emb_2_mean"}, {"rows": 20})
    manifest = {"signature": {"model": "some-model", "weights_digest": "sha256:0", "variants": ["L2.mean"],
                              "max_length": 64, "dtype": "int8", "normalize": False, "format": "parquet"},
                "variants": [{"name": "L2.mean", "column": "emb_2_mean", "layer": 2, "pooling": "mean", "dim": 16,
                              "dtype": "int8", "quantization": qz.manifest_entry("int8", 16)}],
                "calibration": {"rows": 20, "ranges": qz.RANGES_FILE},
                "shards": [{"path": "in/a.parquet", "rel": "a.parquet", "output": "embeddings/a-1",
                            "files": ["part-0.parquet"]}]}
    with fs.open(f"{root}/manifest.json", "wb") as f:
        f.write(json.dumps(manifest).encode())
    spec = tmp_path / "index-only.yaml"
    spec.write_text(f"name: idx\ninput: {{embeddings: 'memory://{root}'}}\nindexes: {{kind: flat, rescore: 3}}\n")
    summary = run_job(spec, progress=False, stream=io.StringIO())
    assert [i["variant"] for i in summary["indexes"]["built"]] == ["L2.mean"]
    assert fs.exists(f"{root}/indexes/L2.mean.faiss")
    for suffix in (".faiss", ".ids.parquet", ".json"):
        fs.get_file(f"{root}/indexes/L2.mean{suffix}", str(tmp_path / f"L2.mean{suffix}"))
    local = idx.load_index(tmp_path / "L2.mean.faiss")
    assert local.params["dtype"] == "int8" and local.params["rescore"] == 3
    assert [row[0] for row in local.search(x[:3], 1)[1]] == ["d0", "d1", "d2"]
    fs.rm(f"/strata-q-{os.getpid()}", recursive=True)


def test_cli_eval_scores_a_quantised_variant(model_dir, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.demo import DEMO_DATA

    base = ["eval", "retrieval", str(DEMO_DATA / "scifact"), "--output", str(tmp_path / "ev"), "--model", model_dir,
            "--layers", "1", "--engine", "local", "--max-queries", "10", "--max-docs", "120", "--max-length", "64"]
    assert main(base + ["--dtype", "binary", "--rescore", "4"]) == 0
    assert main(base + ["--dtype", "int8", "--calibration-rows", "50"]) == 0
    assert main(base) == 0
    rows = json.loads((tmp_path / "ev" / "eval" / "results.json").read_text())
    assert {r.get("quantization") for r in rows} == {None, "int8", "binary+rescore4"}
    capsys.readouterr()
    assert main(base + ["--rescore", "4"]) == 2
    assert "--rescore re-scores a quantised index" in capsys.readouterr().err

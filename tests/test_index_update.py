"""Indexes follow their output (pipeline/index/update.py): rows whose content left deleted, new rows
added, rows only renamed or moved kept, and the result searched exactly as a fresh build on the
same trained quantiser."""

import hashlib
import json
import uuid
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import quantize
from pipeline.index import build_indexes, load_index
from pipeline.index.update import DRIFT, remove_labels
from pipeline.parts import write_part
from pipeline.storage import Output

DIM = 32
V = "L1.mean"
COLUMN = "emb_1_mean"


def clustered(n, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((24, DIM)).astype(np.float32)
    return (centres[rng.integers(24, size=n)] + 0.3 * rng.standard_normal((n, DIM))).astype(np.float32)


class FakeOutput:
    """An output folder written as commits write it: parts, their rows, bytes and CRC in the manifest."""

    def __init__(self, root: Path, dtype: str = "float32"):
        self.root, self.dtype, self.shards = root, dtype, {}
        self.out = Output(str(root))
        self.ranges = None

    def put(self, rel: str, ids: list[str], x: np.ndarray) -> None:
        folder = f"embeddings/{rel}-{uuid.uuid4().hex[:6]}"
        (self.root / folder).mkdir(parents=True)
        if self.dtype == "int8":
            col = quantize.quantize("int8", x, self.ranges)
        elif self.dtype == "binary":
            col = quantize.quantize("binary", x, None)
        else:
            col = x
        typ = quantize.arrow_type(self.dtype, DIM)
        arr = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(col).reshape(-1), type=typ.value_type),
                                                typ.list_size)
        keys = [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in np.ascontiguousarray(x)]  # the "text"
        crc = write_part(self.out.fs, str(self.root / folder / "part-0.parquet"),
                         pa.table({"id": pa.array(ids, pa.string()), "key": pa.array(keys, pa.binary(16)), COLUMN: arr}))
        info = self.out.part_info(str(self.root / folder), ["part-0.parquet"])
        info["part-0.parquet"]["crc32"] = crc
        self.shards[rel] = {"path": rel, "rel": rel, "output": folder, "files": ["part-0.parquet"],
                            "rejects_files": [], "rows": len(ids), "parts": info}

    def drop(self, rel: str) -> None:
        del self.shards[rel]

    def manifest(self) -> dict:
        variant = {"name": V, "column": COLUMN, "layer": 1, "pooling": "mean", "dim": DIM, "dtype": self.dtype,
                   "normalized": False}
        m = {"signature": {"dtype": self.dtype}, "variants": [variant], "shards": list(self.shards.values())}
        self.out.write_manifest(m)
        if self.dtype == "int8":
            quantize.write_ranges(self.out, {V: self.ranges}, {V: COLUMN}, {"rows": 1})
        return m


def search(root, queries, k=10):
    idx = load_index(Path(root) / "indexes" / f"{V}.faiss")
    scores, ids = idx.search(queries, k)
    return idx, scores, ids


def same_results(a, b, atol=1e-5):
    """Equal top-k up to ties: the same scores, and the same ids wherever the score is not tied."""
    (sa, ia), (sb, ib) = a, b
    np.testing.assert_allclose(sa, sb, atol=atol)
    for row_a, row_b, s in zip(ia, ib, sa):
        for j, (x, y) in enumerate(zip(row_a, row_b)):
            tied = (j > 0 and abs(s[j] - s[j - 1]) < atol) or (j + 1 < len(s) and abs(s[j] - s[j + 1]) < atol)
            assert x == y or tied


@pytest.mark.parametrize("kind,dtype", [("flat", "float32"), ("ivfpq", "float32"), ("ivfpq", "int8"),
                                        ("flat", "int8"), ("flat", "binary"), ("ivfpq", "binary")])
def test_an_update_answers_as_a_fresh_build_on_the_same_quantiser(tmp_path, kind, dtype):
    x = clustered(6000, seed=1)
    fake = FakeOutput(tmp_path / "out", dtype)
    if dtype == "int8":
        fake.ranges = quantize.calibrate(quantize.unit_rows(x))
    for s in range(8):
        fake.put(f"s{s}", [f"d{s}-{i}" for i in range(600)], x[s * 600:(s + 1) * 600])
    build_indexes(tmp_path / "out", [V], kind, manifest=fake.manifest())
    first = json.loads((tmp_path / "out" / "indexes" / "_built.json").read_text())[V]
    # a shard dropped, 100 of its rows back under new ids in another file, a new shard: 500 rows leave, 150 come
    fake.drop("s1")
    fake.put("s1b", [f"new-{i}" for i in range(100)], x[600:700])
    fake.put("s8", [f"d8-{i}" for i in range(150)], x[4800:4950])
    m = fake.manifest()
    done = {}
    build_indexes(tmp_path / "out", [V], kind, manifest=m, on_built=lambda v, p, s: done.update(p))
    assert done["update"] == {"deleted": 500, "added": 150, "changed_since_training": 650}
    rec = json.loads((tmp_path / "out" / "indexes" / "_built.json").read_text())[V]
    assert rec["trained_rows"] == 4800 and rec["changed"] == 650 and len(first["files"]) == 8
    q = clustered(50, seed=7)
    updated, *got = search(tmp_path / "out", q)
    # the reference: the updated index's trained quantiser, emptied, given every current row in label order
    by_id = {}
    for e in fake.shards.values():
        t = pq.read_table(tmp_path / "out" / e["output"] / "part-0.parquet")
        by_id |= dict(zip(t.column("id").to_pylist(), t.column(COLUMN).to_numpy(zero_copy_only=False)))
    assert sorted(updated.ids) == sorted(by_id) and len(updated.ids) == 4800 - 500 + 150
    assert list(updated.ids[:100]) == [f"d0-{i}" for i in range(100)]  # labels of unchanged rows keep their order
    vecs = [np.stack([by_id[i] for i in updated.ids])]
    stored = np.concatenate(vecs)
    fresh = (faiss.deserialize_index_binary(faiss.serialize_index_binary(updated.index)) if dtype == "binary"
             else faiss.clone_index(updated.index))
    fresh.reset()
    if dtype == "int8":
        fresh.add(quantize.dequantize_int8(stored, fake.ranges))
    elif dtype == "binary":
        fresh.add(stored)
    else:
        fresh.add(quantize.unit_rows(stored.astype(np.float32)))
    updated.index = fresh
    same_results(got, updated.search(q, 10))
    if kind == "flat":  # no quantiser: the update is the fresh build itself
        build_indexes(tmp_path / "ref2", [V], kind, manifest=_copy(fake, tmp_path / "ref2"))
        _, *rebuilt = search(tmp_path / "ref2", q)
        same_results(got, rebuilt)


def _copy(fake: FakeOutput, root: Path) -> dict:
    import shutil

    shutil.copytree(fake.root / "embeddings", root / "embeddings")
    other = FakeOutput(root, fake.dtype)
    other.shards, other.ranges = fake.shards, fake.ranges
    return other.manifest()


def test_past_the_drift_threshold_or_for_hnsw_the_index_is_rebuilt(tmp_path):
    x = clustered(8000, seed=2)
    fake = FakeOutput(tmp_path / "out")
    for s in range(4):
        fake.put(f"s{s}", [f"d{s}-{i}" for i in range(1000)], x[s * 1000:(s + 1) * 1000])
    build_indexes(tmp_path / "out", [V], "ivfpq", manifest=fake.manifest())
    got = {}
    fake.put("s4", [f"d4-{i}" for i in range(int(DRIFT * 4000))], x[4000:4000 + int(DRIFT * 4000)])
    build_indexes(tmp_path / "out", [V], "ivfpq", manifest=fake.manifest(), on_built=lambda v, p, s: got.update(p))
    assert got["update"]["changed_since_training"] == DRIFT * 4000  # exactly at the threshold: updated
    got.clear()
    fake.put("s5", [f"d5-{i}" for i in range(10)], x[6000:6010])
    build_indexes(tmp_path / "out", [V], "ivfpq", manifest=fake.manifest(), on_built=lambda v, p, s: got.update(p))
    assert "update" not in got and got["rebuilt"].startswith("810 rows changed since its quantiser was trained on 4,000")
    rec = json.loads((tmp_path / "out" / "indexes" / "_built.json").read_text())[V]
    assert rec["trained_rows"] == 4810 and rec["changed"] == 0
    got.clear()
    build_indexes(tmp_path / "out", [V], "hnsw", manifest=fake.manifest(), on_built=lambda v, p, s: got.update(p))
    assert got["rebuilt"] == "it was built as ivfpq, hnsw is asked"
    got.clear()
    fake.drop("s5")
    build_indexes(tmp_path / "out", [V], "hnsw", manifest=fake.manifest(), on_built=lambda v, p, s: got.update(p))
    assert got["rebuilt"] == "an HNSW graph cannot delete rows" and got["rows"] == 4800


def test_a_re_export_under_new_names_and_ids_moves_no_vector(tmp_path):
    """Every shard rewritten under new file names, split otherwise and given new ids, one text twice:
    nothing is deleted or added; each label takes its row's new id."""
    x = clustered(3000, seed=4)
    x[2999] = x[0]  # a repeated text: matched one for one
    fake = FakeOutput(tmp_path / "out")
    for s in range(3):
        fake.put(f"s{s}", [f"d{s}-{i}" for i in range(1000)], x[s * 1000:(s + 1) * 1000])
    build_indexes(tmp_path / "out", [V], "ivfpq", manifest=fake.manifest())
    for s in range(3):
        fake.drop(f"s{s}")
    for k in range(4):
        fake.put(f"part-{k:05d}-c000", [f"new-{j}" for j in range(k * 750, (k + 1) * 750)], x[k * 750:(k + 1) * 750])
    got = {}
    build_indexes(tmp_path / "out", [V], "ivfpq", manifest=fake.manifest(), on_built=lambda v, p, s: got.update(p))
    assert got["update"] == {"deleted": 0, "added": 0, "changed_since_training": 0}
    idx = load_index(tmp_path / "out" / "indexes" / f"{V}.faiss")
    assert sorted(idx.ids) == sorted(f"new-{j}" for j in range(3000))
    _, ids = idx.search(x[:20], 1)
    assert [r[0] for r in ids[1:]] == [f"new-{j}" for j in range(1, 20)]


def test_remove_labels_renumbers_an_ivf_as_a_plain_reference():
    """remove_labels on IVF-PQ + refine: the rows that remain keep their codes and get their new positions."""
    x = quantize.unit_rows(clustered(3000, seed=3))
    base = faiss.IndexIVFPQ(faiss.IndexFlatIP(DIM), DIM, 16, 8, 6, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexRefineFlat(base)
    index.train(x)
    index.add(x)
    gone = np.sort(np.random.default_rng(0).choice(3000, 700, replace=False))
    remove_labels(index, gone)
    keep = np.setdiff1d(np.arange(3000), gone)
    empty = faiss.clone_index(base)
    empty.reset()
    want = faiss.IndexRefineFlat(empty)
    want.add(x[keep])
    assert index.ntotal == want.ntotal == len(keep)
    ivf_a, ivf_b = faiss.extract_index_ivf(index), faiss.extract_index_ivf(want)
    for i in range(16):
        a = faiss.rev_swig_ptr(ivf_a.invlists.get_ids(i), ivf_a.invlists.list_size(i)).copy()
        b = faiss.rev_swig_ptr(ivf_b.invlists.get_ids(i), ivf_b.invlists.list_size(i)).copy()
        assert sorted(a) == sorted(b)
    np.testing.assert_array_equal(faiss.downcast_index(index.refine_index).reconstruct_n(0, len(keep)), x[keep])

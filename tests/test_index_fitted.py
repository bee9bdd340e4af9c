"""A resumed index build never mixes two fits: both engines key on the fitted pieces' content.

The scenario (``strata`` commands, tiny model): embed one shard with ``--transforms whiten8``, index
(``--engine local`` and ``--engine ray``), embed a second shard (``--transforms`` refits into the
same ``transforms/{variant}.npz``), index again. Every vector in each index must then be the
CURRENT transform of its raw vector; a build that kept the first fit's quantiser or lists fails.
"""

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.derive import reader
from pipeline.index import index_path, index_status, load_index
from pipeline.index import ray as ir
from pipeline.index.fresh import staleness
from pipeline.storage import Output
from pipeline.transforms import Transform
from pipeline.variants import Variant

LOCAL = Variant(2, "mean", transform="whiten8")  # indexed by the local engine (flat)
RAY = Variant(3, "mean", transform="whiten8")  # indexed by the Ray engine (on-disk IVF-PQ)
WORDS = ["rivers", "stones", "clouds", "trees", "birds", "salt", "iron", "glass"]


def _texts(n, start, words):
    return [f"item {start + i} on " + " ".join(words[j % len(words)] for j in range(i % 5 + 1)) for i in range(n)]


def _normalised(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def _embed(model, inp, out):
    assert main(["embed", str(inp), str(out), "--layers", "2:3", "--poolings", "mean", "--id-column", "id",
                 "--transforms", "whiten8", "--model", model, "-q"]) == 0


def _index(out):
    assert main(["index", str(out), "--variants", LOCAL.name, "--kind", "flat", "--engine", "local"]) == 0
    assert main(["index", str(out), "--variants", RAY.name, "--engine", "ray", "--nlist", "1"]) == 0


@pytest.fixture(scope="module")
def refit(ray_local, model_dir, tmp_path_factory):
    """The output after embed, index, embed of a new shard (transforms refitted), index; and the first fit."""
    root = tmp_path_factory.mktemp("refit")
    inp, out = root / "in", root / "out"
    inp.mkdir()
    pq.write_table(pa.table({"id": [f"a{i}" for i in range(60)], "text": _texts(60, 0, WORDS[:4])}), inp / "a.parquet")
    _embed(model_dir, inp, out)
    _index(out)
    first = {v: Transform.load(out / "transforms" / f"{v.name.replace('|', '_')}") for v in (LOCAL, RAY)}
    first_ray_record = ir.read_build_record(out, RAY)
    # the second shard is other text: the refit moves the mean and the whitening basis
    pq.write_table(pa.table({"id": [f"b{i}" for i in range(40)], "text": _texts(40, 60, WORDS[4:])}),
                   inp / "b.parquet")
    _embed(model_dir, inp, out)
    _index(out)
    return out, first, first_ray_record


def _current(out, v):
    """The manifest, the variant's current transform, and (ids, raw vectors) per committed part in
    manifest order."""
    manifest = Output(str(out)).read_manifest()
    t = Transform.load(out / manifest["derived"][v.name]["transform"])
    raw_column = Variant(v.layer, v.pooling).column
    parts = []
    for s in sorted(manifest["shards"], key=lambda s: s["path"]):
        for f in s["files"]:
            table = pq.read_table(out / s["output"] / f, columns=["id", raw_column])
            raw = np.stack(table.column(raw_column).to_numpy(zero_copy_only=False)).astype(np.float32)
            parts.append((table.column("id").to_pylist(), raw))
    return manifest, t, parts


def _refit_matters(first, t, parts):
    raw = np.concatenate([x for _, x in parts])
    moved = np.abs(_normalised(first.apply(raw)) - _normalised(t.apply(raw))).max()
    assert moved > 0.05, f"the refit moved the vectors by {moved} only: the test would not tell the fits apart"


def test_local_index_holds_the_current_fit_and_its_freshness_follows_the_pieces(refit):
    out, first, _ = refit
    manifest, t, parts = _current(out, LOCAL)
    _refit_matters(first[LOCAL], t, parts)
    loaded = load_index(index_path(out, LOCAL))
    assert loaded.index.ntotal == 100
    want = {i: row for ids, raw in parts for i, row in zip(ids, _normalised(t.apply(raw)))}
    got = loaded.index.reconstruct_n(0, loaded.index.ntotal)
    assert sorted(loaded.ids) == sorted(want)
    np.testing.assert_allclose(got, np.stack([want[i] for i in loaded.ids]), atol=1e-5)

    # freshness: the record keys on the pieces' content, not only on the files and the kind
    assert index_status(out, manifest, [LOCAL], "flat") == ([], [LOCAL])
    assert staleness(Output(str(out)), manifest, LOCAL) is None  # what `strata search` warns on
    built = json.loads((out / "indexes" / "_built.json").read_text())[LOCAL.name]
    assert built["fitted"].startswith("sha256:")
    path = out / manifest["derived"][LOCAL.name]["transform"]
    saved = path.with_name(path.name + ".npz").read_bytes()
    Transform(t.name, t.mean + 0.01, t.basis, t.fitted_on).save(path)  # refitted in place, no file of rows new
    assert index_status(out, manifest, [LOCAL], "flat") == ([LOCAL], [])
    assert "fitted pieces it was built through" in staleness(Output(str(out)), manifest, LOCAL)
    path.with_name(path.name + ".npz").write_bytes(saved)  # the same content again: up to date again
    assert index_status(out, manifest, [LOCAL], "flat") == ([], [LOCAL])
    mixed = json.loads(json.dumps(manifest))  # a mix's weights are a fitted piece too
    mixed["derived"][LOCAL.name]["weights"] = [1.0]
    assert index_status(out, mixed, [LOCAL], "flat") == ([LOCAL], [])


def _codes(index) -> dict:
    """label -> (list, PQ code bytes) of an IVF-PQ (on-disk or in memory)."""
    ivf = faiss.extract_index_ivf(index)
    lists, size = ivf.invlists, ivf.code_size
    found = {}
    for lst in range(ivf.nlist):
        n = lists.list_size(lst)
        if not n:
            continue
        ids = faiss.rev_swig_ptr(lists.get_ids(lst), n).copy()
        codes = faiss.rev_swig_ptr(lists.get_codes(lst), n * size).copy().reshape(n, size)
        found.update({int(i): (lst, c.tobytes()) for i, c in zip(ids, codes)})
    return found


def test_ray_index_holds_the_current_fit_not_the_first_quantiser_or_lists(refit):
    out, first, first_record = refit
    manifest, t, parts = _current(out, RAY)
    _refit_matters(first[RAY], t, parts)
    rec = ir.read_build_record(out, RAY)

    # the quantiser is the one trained on the current fit's vectors (the same seeded sample, in-process)
    shards = ir.shards_of(out, manifest)
    source = reader(out, manifest, RAY)
    trained = ir.train_ivfpq(str(out), [s.rel for s in shards], [s.rows for s in shards], source, 8, 32,
                             rec.options, 0)
    assert bytes(trained) == (ir.parts_dir(out, RAY) / ir.TRAINED).read_bytes()

    # every vector's code is the code of the current transform of its raw vector, under that quantiser
    loaded = load_index(index_path(out, RAY))
    assert loaded.index.ntotal == 100 and sorted(i for i in loaded.ids if i is not None) == \
        sorted(i for ids, _ in parts for i in ids)
    label = {i: lab for lab, i in enumerate(loaded.ids) if i is not None}
    ref = faiss.deserialize_index(trained)
    for ids, raw in parts:  # one part at a time, as the build reads them
        ref.add_with_ids(_normalised(t.apply(raw)), np.array([label[i] for i in ids], dtype=np.int64))
    assert _codes(loaded.index) == _codes(ref)
    # how: the record's key moved with the fit, so the first quantiser and parts were not reused
    assert rec.key.fitted != first_record.key.fitted and rec.key.fitted.startswith("sha256:")
    assert rec.trained_at != first_record.trained_at


def test_int8_indexes_key_on_their_ranges_and_raw_float_ones_on_nothing(tmp_path):
    """An int8 output's index is built through its quantisation ranges: fresh while they hold, stale when
    they change. A raw float column has no fitted piece (digest None, as in records from before the digest)."""
    from pipeline import quantize as qz
    from pipeline.index import build_indexes

    v = Variant(3, "mean")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    ranges = qz.calibrate(x)
    for dtype in ("int8", "float32"):
        out = tmp_path / dtype
        (out / "embeddings" / "s0").mkdir(parents=True)
        stored = qz.quantize_int8(x, ranges) if dtype == "int8" else x
        pq.write_table(pa.table({"id": [f"d{i}" for i in range(300)], v.column: qz.to_arrow(stored)}),
                       out / "embeddings" / "s0" / "part-0.parquet")
        manifest = {"signature": {"dtype": dtype}, "shards": [{"path": "a", "output": "embeddings/s0",
                                                               "files": ["part-0.parquet"]}],
                    "variants": [{"name": v.name, "column": v.column, "layer": 3, "pooling": "mean", "dim": 16,
                                  "dtype": dtype}]}
        Output(str(out)).write_manifest(manifest)
        if dtype == "int8":
            qz.write_ranges(Output(str(out)), {v.name: ranges}, {v.name: v.column}, {"rows": 300})
        build_indexes(out, kind="flat")
        assert index_status(out, manifest, None, "flat") == ([], [v])
        fitted = json.loads((out / "indexes" / "_built.json").read_text())[v.name]["fitted"]
        if dtype == "float32":
            assert fitted is None
            continue
        assert fitted.startswith("sha256:")
        qz.write_ranges(Output(str(out)), {v.name: ranges * 1.5}, {v.name: v.column}, {"rows": 300})
        assert index_status(out, manifest, None, "flat") == ([v], [])

"""Content-addressed reuse (pipeline/runner/reuse.py): rows copied across shards, file names and ids;
a run's duplicate texts embedded once; the plan equal on the driver and on Ray; a damaged part
never copied."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.runner import read_embeddings
from pipeline.runner import reuse
from pipeline.runner.shards import inspect_shards, list_shards, work_units
from reference import embed
from conftest import data_file  # noqa: E402

OPTS = dict(layers="1,-1", poolings="mean,last", id_column="id", progress=False)


@pytest.fixture(scope="module")
def corpus():
    rows = [json.loads(line) for line in (data_file("scifact", "corpus.jsonl")).read_text().splitlines()[:300]]
    return [r["_id"] for r in rows], [(r["title"] + " " + r["text"]).strip() for r in rows]


def write(directory: Path, names, ids, texts):
    directory.mkdir(parents=True, exist_ok=True)
    k = len(names)
    for i, name in enumerate(names):
        sl = slice(i * len(texts) // k, (i + 1) * len(texts) // k)
        pq.write_table(pa.table({"id": ids[sl], "text": texts[sl]}), directory / name, row_group_size=29)


def vectors(out) -> dict:
    t = read_embeddings(str(out))
    cols = [c for c in t.column_names if c.startswith("emb_")]
    return {c: dict(zip(t.column("id").to_pylist(), np.stack(t.column(c).to_numpy(zero_copy_only=False))))
            for c in cols}


def manifest(out) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def reference_plan(new: list[tuple[bytes, int]], stored: list[tuple[bytes, str, int]], dedup: bool) -> dict:
    """The plan written plainly: a row whose key is stored copies one of the stored rows holding it;
    otherwise the first new row (by gid) is embedded and, with dedup, later ones deferred."""
    holders, first_new, plan = {}, {}, {}
    for key, src, row in stored:
        holders.setdefault(key, set()).add((src, row))
    for key, gid in sorted(new, key=lambda x: x[1]):
        if key in holders:
            plan[gid] = ("copy", holders[key])
        elif key in first_new:
            plan[gid] = ("defer",) if dedup else ("embed",)
        else:
            first_new[key] = gid
            plan[gid] = ("embed",)
    return plan


@pytest.mark.parametrize("dedup", [True, False])
def test_resolve_equals_a_plain_reference(dedup):
    rng = np.random.default_rng(0)
    pool = [hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in range(40)]
    new = [(pool[rng.integers(40)], (int(s) << reuse.SHARD_BITS) + r) for s in range(3) for r in range(25)]
    stored = [(pool[rng.integers(40)], f"file:///p{rng.integers(4)}", int(r)) for r in range(30)]
    table = pa.table({"key": pa.array([k for k, _ in new] + [k for k, _, _ in stored], pa.binary(16)),
                      "gid": pa.array([g for _, g in new] + [-1] * len(stored), pa.int64()),
                      "unit": pa.array([g >> reuse.SHARD_BITS for _, g in new] + [-1] * len(stored), pa.int32()),
                      "src_part": pa.array([-1] * len(new) + [int(s[-1]) for _, s, _ in stored], pa.int32()),
                      "src_row": pa.array([-1] * len(new) + [r for _, _, r in stored], pa.int64())})
    sources = [f"file:///p{i}" for i in range(4)]
    table = table.take(pa.array(rng.permutation(table.num_rows)))  # input order does not matter
    got = reuse.resolve(table, sources, dedup=dedup, every=True).to_pylist()
    want = reference_plan(new, stored, dedup)
    assert len(got) == len(new)
    for r in got:
        gid = (r["unit"] << reuse.SHARD_BITS) + r["row"]
        kind = "copy" if r["src"] else "defer" if r["defer"] else "embed"
        assert want[gid][0] == kind
        if kind == "copy":
            assert (r["src"], r["src_row"]) in want[gid][1]
    listed = reuse.resolve(table, sources, dedup=dedup, every=False).to_pylist()
    assert len(listed) == sum(v[0] != "embed" for v in want.values())
    # rows dropped: per key, stored rows in leaving parts beyond the new rows with that key
    leaving = {1, 3}
    going, coming = {}, {}
    for key, src, _ in stored:
        if int(src[-1]) in leaving:
            going[key] = going.get(key, 0) + 1
    for key, _ in new:
        coming[key] = coming.get(key, 0) + 1
    assert reuse.dropped_rows(table, leaving) == sum(max(0, n - coming.get(k, 0)) for k, n in going.items()) > 0


def test_the_plan_is_the_same_on_the_driver_and_on_ray(ray_local, corpus, tmp_path):
    """The key table brought together on the driver and by Ray Data's hash shuffle: one plan."""
    ids, texts = corpus
    texts = texts[:120] + texts[:30]  # 30 texts twice
    write(tmp_path / "in", ["a.parquet", "b.parquet", "c.parquet"], [f"i{k}" for k in range(150)], texts)
    old = tmp_path / "old"
    old.mkdir()
    salt = b"s" * 32
    keys = reuse.text_keys(texts[100:140], salt)
    pq.write_table(pa.table({"id": [f"o{k}" for k in range(40)], "key": pa.array(keys, pa.binary(16))}), old / "p.parquet")
    fs, shards = list_shards(str(tmp_path / "in"))
    inspect_shards(fs, shards, "text", "id")
    units = work_units(shards, unit_rows=20)
    sources = [f"file://{old / 'p.parquet'}"]
    kw = dict(fs=fs, text_column="text", id_column="id", salt=salt, dedup=True)
    import ray

    plans = {}
    for name, r, limit in (("driver", None, reuse.DRIVER_ROWS), ("ray", ray, 0)):
        url = f"file://{tmp_path / name}"
        p = reuse.make_plan(units, sources, url, ray=r, driver_rows=limit, **kw)
        rows = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / name).rglob("*.parquet"))])
        per_unit = {u: len(list((tmp_path / name / f"{u:08d}").glob("*.parquet"))) for u in p.units}
        plans[name] = (p.copied, p.deferred, p.units, sorted(rows.to_pylist(), key=lambda x: (x["row"], x["src"] or "")),
                       per_unit)
    assert plans["driver"][:4] == plans["ray"][:4]
    # stored: rows 100..139 = texts 100..119 and 0..19; so rows 0..19, 100..119 and 120..139 (texts 0..19
    # again) are copied; rows 140..149 repeat texts 20..29, which are not stored: deferred
    assert plans["driver"][:2] == (60, 10)


def test_a_re_export_under_new_names_and_ids_embeds_nothing(ray_local, model_dir, corpus, tmp_path):
    """The same rows re-exported Spark-style (new uuid file names, new ids, a _SUCCESS marker, another
    split into files): every vector is copied bit for bit, nothing goes through the model."""
    ids, texts = corpus
    write(tmp_path / "in", ["part-0.parquet", "part-1.parquet", "part-2.parquet"], ids, texts)
    embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    before = vectors(tmp_path / "out")
    for f in (tmp_path / "in").iterdir():
        f.unlink()
    new_ids = [f"new-{i}" for i in ids]
    write(tmp_path / "in", [f"part-00000-9f{k}.snappy.parquet" for k in range(4)], new_ids, texts)
    (tmp_path / "in" / "_SUCCESS").write_text("")
    summary = embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert (summary.shards_embedded, summary.shards_dropped, summary.rows) == (4, 3, len(texts))
    assert summary.rows_reused == len(texts) and summary.rows_embedded == 0 and summary.tokens == 0
    assert summary.rows_dropped == 0  # every text the old shards held is held again
    after = vectors(tmp_path / "out")
    for col, old in before.items():
        for i, n in zip(ids, new_ids):
            assert np.array_equal(after[col][n], old[i])  # the user's new ids, the stored vectors
    m = manifest(tmp_path / "out")
    assert "retired" not in m and m["last_run"]["rows_embedded"] == 0
    assert sorted(p.name for p in (tmp_path / "out" / "embeddings").iterdir()) == sorted(
        Path(e["output"]).name for e in m["shards"])  # the old shards' folders are gone, nothing else
    # 7 rows deleted from one file, which is rewritten: they are the rows dropped; nothing embedded
    name = "part-00000-9f1.snappy.parquet"
    t = pq.read_table(tmp_path / "in" / name)
    pq.write_table(t.slice(7), tmp_path / "in" / name)
    summary = embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert (summary.rows_dropped, summary.rows_embedded, summary.rows_reused) == (7, 0, t.num_rows - 7)


def test_a_runs_duplicate_texts_are_embedded_once(ray_local, model_dir, corpus, tmp_path):
    """Texts repeated across and within shards: each distinct text goes through the model once, its
    copies are bit-identical, and the output equals embedding every row."""
    ids, texts = corpus
    dup = texts[:100] + texts[:60] + texts[10:30]  # 80 copies of texts that also occur earlier
    rid = [f"r{k}" for k in range(len(dup))]
    write(tmp_path / "in", ["x.parquet", "y.parquet"], rid, dup)
    summary = embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert summary.rows == 180 and summary.rows_embedded == 100
    assert summary.rows_reused == 80 and summary.rows_deduplicated == 80
    got = vectors(tmp_path / "out")
    first = {}
    for r, t in zip(rid, dup):
        first.setdefault(t, r)
    model = __import__("pipeline").Encoder
    from pipeline.request import resolve

    want = model.from_request(resolve(model_dir, layers="1,-1", poolings="mean,last", digest=False)).encode(dup)
    for v, arr in want.items():
        for k, (r, t) in enumerate(zip(rid, dup)):
            assert np.array_equal(got[v.column][r], got[v.column][first[t]])
            np.testing.assert_allclose(got[v.column][r], arr[k], rtol=1e-5, atol=1e-6)


def test_a_damaged_part_is_never_copied(ray_local, model_dir, corpus, tmp_path):
    """A stored part whose bytes changed (same size) is a copy source: the shard copying from it fails
    naming it, its own shard is taken out of the output, and the next run embeds both afresh."""
    ids, texts = corpus
    texts, ids = texts[:90], ids[:90]
    write(tmp_path / "in", ["a.parquet", "b.parquet"], ids, texts)
    embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    # a later run: a resume checks the checksums of the last run's parts only, so a's are copied unchecked
    pq.write_table(pa.table({"id": ["d0"], "text": ["Another document."]}), tmp_path / "in" / "d.parquet")
    embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    entry = next(e for e in manifest(tmp_path / "out")["shards"] if e["rel"] == "a.parquet")
    part = tmp_path / "out" / entry["output"] / entry["files"][0]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    (tmp_path / "in" / "b.parquet").unlink()
    pq.write_table(pa.table({"id": ids[:45], "text": texts[:45]}), tmp_path / "in" / "c.parquet")  # a's texts again
    from pipeline.runner import EmbedError

    with pytest.raises(EmbedError, match=r"c\.parquet: .*does not match its checksum"):
        embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert "a.parquet" not in {e["rel"] for e in manifest(tmp_path / "out")["shards"]}
    summary = embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert summary.shards_embedded == 2 and not summary.shards_failed and summary.rows_reused == 45
    embed(str(tmp_path / "in"), str(tmp_path / "fresh"), model=model_dir, **OPTS)
    got, fresh = vectors(tmp_path / "out"), vectors(tmp_path / "fresh")
    for col in fresh:
        assert sorted(got[col]) == sorted(fresh[col])
        for k in fresh[col]:
            np.testing.assert_allclose(got[col][k], fresh[col][k], rtol=1e-5, atol=1e-6)

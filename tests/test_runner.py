"""The distributed pipeline end to end, on a local Ray shared by this module's tests."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import Encoder
from pipeline import runner
from pipeline.runner import EmbedError, read_embeddings
from reference import embed
from conftest import data_file  # noqa: E402

OPTS = dict(layers="1,-1", poolings="mean,last,wmean_nosink", id_column="id", progress=False)


@pytest.fixture(scope="module")
def corpus():
    rows = [json.loads(line) for line in (data_file("scifact", "corpus.jsonl")).read_text().splitlines()[:800]]
    return [r["_id"] for r in rows], [(r["title"] + " " + r["text"]).strip() for r in rows]


def write_shards(directory: Path, ids, texts, k=8, row_group_size=37):
    directory.mkdir(parents=True, exist_ok=True)
    n = len(texts)
    for i in range(k):
        sl = slice(i * n // k, (i + 1) * n // k)
        pq.write_table(pa.table({"id": ids[sl], "text": texts[sl]}), directory / f"part-{i}.parquet",
                       row_group_size=row_group_size)


def manifest(out) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def by_id(table: pa.Table) -> dict:
    cols = [c for c in table.column_names if c.startswith("emb_")]
    ids = table.column("id").to_pylist()
    return {c: dict(zip(ids, table.column(c).to_numpy(zero_copy_only=False).tolist())) for c in cols} | {"_ids": ids}


def test_actor_calls_are_bounded_so_outputs_stream(ray_local, model_dir, corpus, tmp_path):
    # one shard, one row group, one read unit of 800 rows: the embed stage still works (and
    # writes) in calls of at most EMBED_BATCH_ROWS rows, not one call for the whole unit
    ids, texts = corpus
    write_shards(tmp_path / "in", ids, texts, k=1, row_group_size=len(texts))
    summary = embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert summary.rows == len(texts)
    (entry,) = manifest(tmp_path / "out")["shards"]
    sizes = [pq.read_metadata(tmp_path / "out" / entry["output"] / f).num_rows for f in entry["files"]]
    assert sum(sizes) == len(texts) and max(sizes) <= runner.EMBED_BATCH_ROWS
    assert len(sizes) >= -(-len(texts) // runner.EMBED_BATCH_ROWS)


def test_round_trip_equals_single_process_encoder(ray_local, model_dir, corpus, tmp_path):
    ids, texts = corpus
    write_shards(tmp_path / "in", ids, texts)
    summary = embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert summary.rows == len(texts) and summary.shards_embedded == 8 and summary.rows_rejected == 0

    table = read_embeddings(str(tmp_path / "out"))
    got_ids = table.column("id").to_pylist()
    assert sorted(got_ids) == sorted(ids) and len(got_ids) == len(set(got_ids))  # exactly once
    enc = Encoder.load(model_dir, layers="1,-1", poolings="mean,last,wmean_nosink")
    ref = enc.encode(texts)
    order = {i: k for k, i in enumerate(ids)}
    idx = np.array([order[i] for i in got_ids])
    for v in enc.variants:
        got = np.stack(table.column(v.column).to_numpy(zero_copy_only=False))
        want = ref[v][idx]
        err = np.abs(got - want).max(axis=1) / np.linalg.norm(want, axis=1)
        assert err.max() <= 1e-5, v.name

    m = manifest(tmp_path / "out")
    assert m["model"]["weights_digest"].startswith("sha256:")
    assert {v["name"] for v in m["variants"]} == {v.name for v in enc.variants}
    assert sum(s["rows_written"] for s in m["shards"]) == len(texts)
    # plain pyarrow reads every committed file back with fixed-size-list columns of the right dim
    for s in m["shards"]:
        for f in s["files"]:
            t = pq.read_table(tmp_path / "out" / s["output"] / f)
            for v in enc.variants:
                assert t.schema.field(v.column).type == pa.list_(pa.float32(), enc.dim)


def test_resume_after_injected_crash_is_exactly_once(ray_local, model_dir, corpus, tmp_path, monkeypatch):
    ids, texts = corpus
    write_shards(tmp_path / "in", ids, texts)
    import pipeline.runner.commit as commit

    real_commit, commits = commit._commit, []

    def crashing_commit(*a, **kw):
        if len(commits) == 3:
            raise KeyboardInterrupt("injected crash after 3 shards")
        commits.append(1)
        return real_commit(*a, **kw)

    monkeypatch.setattr(commit, "_commit", crashing_commit)
    with pytest.raises(KeyboardInterrupt):
        embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert len(manifest(tmp_path / "out")["shards"]) == 3
    monkeypatch.setattr(commit, "_commit", real_commit)
    summary = embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert summary.shards_skipped == 3 and summary.shards_embedded == 5
    got = read_embeddings(str(tmp_path / "out"), ["id"]).column("id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == len(ids)
    assert not (tmp_path / "out" / "_staging").exists()


def test_incremental_touches_only_changed_shards_and_equals_fresh_run(ray_local, model_dir, corpus, tmp_path):
    ids, texts = corpus
    src = tmp_path / "in"
    write_shards(src, ids, texts)
    embed(str(src), str(tmp_path / "out"), model=model_dir, **OPTS)
    before = {s["rel"]: s for s in manifest(tmp_path / "out")["shards"]}

    # change one shard, add one, delete one
    t = pq.read_table(src / "part-2.parquet")
    pq.write_table(t.set_column(1, "text", pa.array([x.upper() for x in t.column("text").to_pylist()])),
                   src / "part-2.parquet")
    pq.write_table(pa.table({"id": ["new-1", "new-2"], "text": ["A brand new document.", "Another one."]}),
                   src / "part-9.parquet")
    (src / "part-5.parquet").unlink()
    summary = embed(str(src), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert (summary.shards_embedded, summary.shards_skipped, summary.shards_dropped) == (2, 6, 1)
    after = {s["rel"]: s for s in manifest(tmp_path / "out")["shards"]}
    assert set(after) == set(before) - {"part-5.parquet"} | {"part-9.parquet"}
    changed = {rel for rel in after if rel not in before or after[rel]["output"] != before[rel]["output"]}
    assert changed == {"part-2.parquet", "part-9.parquet"}
    assert not (tmp_path / "out" / before["part-5.parquet"]["output"]).exists()
    assert not (tmp_path / "out" / before["part-2.parquet"]["output"]).exists()

    embed(str(src), str(tmp_path / "fresh"), model=model_dir, **OPTS)
    inc, fresh = by_id(read_embeddings(str(tmp_path / "out"))), by_id(read_embeddings(str(tmp_path / "fresh")))
    assert sorted(inc.pop("_ids")) == sorted(fresh.pop("_ids"))
    for col in fresh:
        for k, v in fresh[col].items():
            np.testing.assert_allclose(inc[col][k], v, rtol=0, atol=1e-6)


def test_a_changed_shard_reembeds_only_its_new_texts(ray_local, model_dir, corpus, tmp_path):
    """Two texts of a shard edited and one row deleted: only the two edited rows go through the
    model; every other row's vectors are copied bit for bit from the shard's previous parts (keyed on
    the text and the output's settings), and the result equals a fresh run of the new input."""
    ids, texts = corpus
    src = tmp_path / "in"
    write_shards(src, ids[:240], texts[:240], k=3)
    embed(str(src), str(tmp_path / "out"), model=model_dir, **OPTS)
    old = by_id(read_embeddings(str(tmp_path / "out")))
    t = pq.read_table(src / "part-1.parquet").to_pylist()
    t[3]["text"], t[10]["text"] = "An edited first text.", "A second edited text, longer than the first one."
    del t[20]
    pq.write_table(pa.Table.from_pylist(t), src / "part-1.parquet", row_group_size=37)
    summary = embed(str(src), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert (summary.shards_embedded, summary.rows, summary.rows_reused) == (1, 79, 77)
    entry = next(e for e in manifest(tmp_path / "out")["shards"] if e["rel"] == "part-1.parquet")
    assert entry["rows_reused"] == 77 and entry["rows_written"] == 79
    inc = by_id(read_embeddings(str(tmp_path / "out")))
    edited = {t[3]["id"], t[10]["id"]}
    for col in old:
        if col == "_ids":
            continue
        for r in t:
            if r["id"] not in edited:
                assert np.array_equal(inc[col][r["id"]], old[col][r["id"]])  # copied, bit for bit
    embed(str(src), str(tmp_path / "fresh"), model=model_dir, **OPTS)
    fresh = by_id(read_embeddings(str(tmp_path / "fresh")))
    assert sorted(inc.pop("_ids")) == sorted(fresh.pop("_ids"))
    for col in fresh:
        for k, v in fresh[col].items():
            np.testing.assert_allclose(inc[col][k], v, rtol=0, atol=1e-6)


def test_changed_settings_refused_without_force(ray_local, model_dir, corpus, tmp_path):
    ids, texts = corpus
    write_shards(tmp_path / "in", ids[:40], texts[:40], k=2)
    embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    opts = dict(OPTS, poolings="max")
    with pytest.raises(ValueError, match="different variants"):
        embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **opts)
    embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, force=True, **opts)
    t = read_embeddings(str(tmp_path / "out"))
    assert [c for c in t.column_names if c.startswith("emb_")] == ["emb_1_max", "emb_4_max"]
    assert t.num_rows == 40


def test_rejected_rows_recorded_never_dropped(ray_local, model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    texts = ["fine text", None, "", "   ", "ok\x00with control\x07chars", "word " * 1_000_000, "last one"]  # a 5 MB document
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(texts))], "text": texts}), tmp_path / "in" / "a.parquet")
    summary = embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, max_length=64, **OPTS)
    assert summary.rows == 7 and summary.rows_rejected == 3 and summary.truncated == 1
    s = manifest(tmp_path / "out")["shards"][0]
    assert (s["rows_written"], s["rows_rejected"]) == (4, 3)
    assert s["rejected_reasons"] == {"null text": 1, "empty text": 2}
    rej = pq.read_table(tmp_path / "out" / s["output"] / s["rejects_files"][0]).to_pylist()
    assert {(r["id"], r["reason"]) for r in rej} == {("r1", "null text"), ("r2", "empty text"), ("r3", "empty text")}
    assert sorted(read_embeddings(str(tmp_path / "out"), ["id"]).column("id").to_pylist()) == ["r0", "r4", "r5", "r6"]


def test_corrupt_shard_named_others_commit_then_fixed_rerun_completes(ray_local, model_dir, corpus, tmp_path):
    ids, texts = corpus
    write_shards(tmp_path / "in", ids[:60], texts[:60], k=3)
    good = (tmp_path / "in" / "part-1.parquet").read_bytes()
    (tmp_path / "in" / "part-1.parquet").write_bytes(good[: len(good) // 2])
    with pytest.raises(EmbedError, match="part-1.parquet"):
        embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    m = manifest(tmp_path / "out")
    assert {s["rel"] for s in m["shards"]} == {"part-0.parquet", "part-2.parquet"} and "part-1.parquet" in m["failed"]
    (tmp_path / "in" / "part-1.parquet").write_bytes(good)
    summary = embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert summary.shards_embedded == 1 and summary.shards_skipped == 2
    assert sorted(read_embeddings(str(tmp_path / "out"), ["id"]).column("id").to_pylist()) == sorted(ids[:60])


def test_input_errors_name_the_problem(model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Parquet files"):
        embed(str(tmp_path / "empty"), str(tmp_path / "out"), model=model_dir, **OPTS)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "in" / "a.parquet")
    with pytest.raises(ValueError, match="text column 'text' not found.*available columns: id, body"):
        embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    pq.write_table(pa.table({"id": ["a"], "text": [3]}), tmp_path / "in" / "a.parquet")
    with pytest.raises(ValueError, match="has type int64, expected a string"):
        embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)


def test_derived_ids_and_empty_shard(ray_local, model_dir, tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["one", "two", "three"]}), tmp_path / "in" / "sub" / "a.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "in" / "empty.parquet")
    opts = dict(OPTS, id_column=None)
    summary = embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **opts)
    assert summary.shards_embedded == 2
    got = read_embeddings(str(tmp_path / "out"), ["id"]).column("id").to_pylist()
    assert got == ["sub/a.parquet#0", "sub/a.parquet#1", "sub/a.parquet#2"]


@pytest.mark.slow
@pytest.mark.alone
def test_driver_killed_then_rerun_is_exactly_once(model_dir, corpus, tmp_path):
    """A real SIGKILL of the `strata embed` driver after its first commit, then the same command."""
    ids, texts = corpus
    write_shards(tmp_path / "in", ids, texts, k=8)
    cmd = [sys.executable, "-m", "pipeline", "embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", model_dir,
           "--layers", "1,-1", "--poolings", "mean", "--id-column", "id", "-q"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "first-run.log", "w")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=log)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if manifest(tmp_path / "out")["shards"]:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(manifest(tmp_path / "out")["shards"])
    assert 1 <= committed < 8, (tmp_path / "first-run.log").read_text()[-2000:]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{8 - committed} shards embedded, {committed} skipped" in done.stdout
    got = read_embeddings(str(tmp_path / "out"), ["id"]).column("id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == len(ids)


def test_duplicate_ids_reported_rows_kept(ray_local, model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "a"], "text": ["one", "two", "three"]}), tmp_path / "in" / "x.parquet")
    pq.write_table(pa.table({"id": ["b", "c"], "text": ["four", "five"]}), tmp_path / "in" / "y.parquet")
    summary = embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert summary.rows == 5 and summary.duplicate_ids == 2
    dup = manifest(tmp_path / "out")["duplicate_ids"]
    assert dup["count"] == 2 and sorted(dup["examples"]) == ["a", "b"]
    assert sorted(read_embeddings(str(tmp_path / "out"), ["id"]).column("id").to_pylist()) == ["a", "a", "b", "b", "c"]


def test_output_of_the_previous_layout_is_read_and_resumed(ray_local, model_dir, tmp_path):
    """An output written before the resolved request (tests/fixtures/v1-output) is read as it is,
    and re-running the same command on the unchanged input skips its shard."""
    import shutil

    fixture = Path(__file__).parent / "fixtures" / "v1-output"
    out, inp = tmp_path / "out", tmp_path / "in"
    shutil.copytree(fixture / "output", out)
    shutil.copytree(fixture / "input", inp)
    old = manifest(out)
    (entry,) = old["shards"]
    stamp = float(entry["fingerprint"].split("stamp=")[1])
    os.utime(inp / "shard.parquet", (stamp, stamp))  # the same file, as far as the fingerprint can tell
    # made when 512 was every model's default; this tiny model's own limit is now its 256 positions
    summary = embed(str(inp), str(out), model=model_dir, layers="1,-1", poolings="mean,last", id_column="id",
                    max_length=512, progress=False)
    assert (summary.shards_skipped, summary.shards_embedded, summary.rows) == (1, 0, 0)
    assert manifest(out)["shards"] == old["shards"]  # nothing re-embedded or rewritten
    table = read_embeddings(str(out))
    texts = pq.read_table(inp / "shard.parquet").column("text").to_pylist()
    ref = Encoder.load(model_dir, layers="1,-1", poolings="mean,last", max_length=512).encode(texts)
    assert table.column("id").to_pylist() == [f"t{i}" for i in range(20)]
    for v in ref:
        got = np.stack(table.column(v.column).to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, ref[v], rtol=1e-5, atol=1e-6)


def test_templates_through_ray_equal_the_encoder(ray_local, model_dir, corpus, tmp_path):
    """One forward pass per template in the actors; columns emb_{layer}_{pooling}__{template}."""
    ids, texts = corpus
    ids, texts = ids[:60], texts[:60]
    write_shards(tmp_path / "in", ids, texts, k=2)
    opts = dict(layers="2,-1", poolings="mean_nosink,last", templates=["plain", "echo"], max_length=96,
                id_column="id", progress=False)
    summary = embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **opts)
    assert summary.rows == 60 and summary.rows_rejected == 0
    m = manifest(tmp_path / "out")
    assert [v["column"] for v in m["variants"]][-2:] == ["emb_4_mean_nosink__echo", "emb_4_last__echo"]
    assert m["signature"]["templates"]["echo"].startswith("Rewrite the sentence: {text}")
    table = read_embeddings(str(tmp_path / "out"))
    ref = Encoder.load(model_dir, layers="2,-1", poolings="mean_nosink,last", templates=["plain", "echo"],
                       max_length=96).encode(texts)
    order = {i: k for k, i in enumerate(ids)}
    idx = np.array([order[i] for i in table.column("id").to_pylist()])
    for v in ref:
        got = np.stack(table.column(v.column).to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, ref[v][idx], rtol=1e-4, atol=1e-4 * np.abs(ref[v]).max())


def test_an_output_made_at_another_max_length_says_how_to_match_it(ray_local, model_dir, tmp_path):
    """Resuming without --max-length, where the model's own limit differs from the one the output
    was made with: refused before any work, naming both values and the option that matches."""
    import shutil

    fixture = Path(__file__).parent / "fixtures" / "v1-output"
    out, inp = tmp_path / "out", tmp_path / "in"
    shutil.copytree(fixture / "output", out)
    shutil.copytree(fixture / "input", inp)
    with pytest.raises(ValueError, match=r"different max_length \(it was made with max length 512; without "
                                         r"--max-length this model now gets its own 256"):
        embed(str(inp), str(out), model=model_dir, layers="1,-1", poolings="mean,last", id_column="id",
              progress=False)


def test_embed_actor_runs_all_torch_work_on_one_thread(model_dir, tmp_path, monkeypatch):
    """Ray builds the actor on its main thread and Ray Data calls it from others, two calls at once: the
    model load and every forward pass must still share one thread (one OpenMP pool; see
    ``EmbedActor.__init__``), and the vectors, returned or written as parts, must be the bare Encoder's."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import fsspec
    import pyarrow.compute as pc

    from pipeline.request import resolve
    from pipeline.runner import stages

    threads = {"load": set(), "encode": set()}
    load, encode = Encoder.from_request.__func__, Encoder.encode_tokenized

    def spy_load(cls, *a, **kw):
        threads["load"].add(threading.get_ident())
        return load(cls, *a, **kw)

    def spy_encode(self, *a, **kw):
        threads["encode"].add(threading.get_ident())
        return encode(self, *a, **kw)

    writers = []  # (thread, scheduling policy) of each write_parts call
    write_parts = stages.write_parts

    def spy_write(*a, **kw):
        writers.append((threading.get_ident(), os.sched_getscheduler(0) if hasattr(os, "SCHED_IDLE") else None))
        return write_parts(*a, **kw)

    monkeypatch.setattr(Encoder, "from_request", classmethod(spy_load))
    monkeypatch.setattr(Encoder, "encode_tokenized", spy_encode)
    monkeypatch.setattr(stages, "write_parts", spy_write)
    request = resolve(model_dir, layers="1,-1", poolings="mean,last", max_length=32, digest=False)
    texts = ["a short one", "a somewhat longer sentence than the first", "third"]
    path = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    unit = pa.table({"shard": [0], "row0": [0], "rows": [3], "rgs": [[0]], "skip": [0], "rel": ["texts.parquet"],
                     "path": [str(path)]})
    block = stages.read_and_tokenize(unit, fs=fsspec.filesystem("file"), request=request, text_column="text",
                                     id_column=None)
    out_url = str(tmp_path / "out")
    write = dict(output_url=out_url, run_id="r1", keys=["texts"], columns=[v.column for v in request.variants],
                 fmt="parquet")
    actor = stages.EmbedActor(request, threads=None, write=write)
    with ThreadPoolExecutor(2) as callers:  # calls from threads other than the one that built the actor, at once
        calls = [callers.submit(actor, block) for _ in range(2)] + [callers.submit(actor.embed, block)]
        metas, out = [f.result() for f in calls[:2]], calls[2].result()
    assert len(threads["load"]) == 1 and threads["encode"] == threads["load"]
    assert threads["load"] != {threading.get_ident()}
    # Both blocks' parts are written on one more thread, at the OS's idle priority where it has one.
    assert len(writers) == 2 and len({t for t, _ in writers}) == 1
    assert writers[0][0] not in threads["load"] | {threading.get_ident()}
    if hasattr(os, "SCHED_IDLE"):
        assert {p for _, p in writers} == {os.SCHED_IDLE}
    want = Encoder.from_request(request).encode(texts)
    order = pc.sort_indices(out.column("_row")).to_numpy()
    for v in request.variants:
        got = np.stack(out.column(v.column).to_numpy(zero_copy_only=False))[order]
        np.testing.assert_allclose(got, want[v], rtol=1e-5, atol=1e-6)
    # A call writes the block's parts itself and returns only their metadata: one row per shard.
    for meta in metas:
        assert meta.num_rows == 1 and meta.column("rows").to_pylist() == [[0, 1, 2]]
        assert meta.column("error").to_pylist() == [None]
        written = pq.read_table(tmp_path / "out" / "_staging" / "r1" / "texts" / meta.column("part")[0].as_py())
        for v in request.variants:
            np.testing.assert_allclose(np.stack(written.column(v.column).to_numpy(zero_copy_only=False)), want[v],
                                       rtol=1e-5, atol=1e-6)


def test_a_shard_replaced_while_being_read_fails_alone(model_dir, tmp_path):
    """A shard swapped for a shorter file after it was listed: its unit comes back as one error row
    naming what changed (its shard fails, the others commit); it used to raise out of the read stage
    and abort the whole run ("UDF failed to process a data block")."""
    import fsspec

    from pipeline.request import resolve
    from pipeline.runner import stages

    request = resolve(model_dir, layers="-1", poolings="mean", max_length=32, digest=False)
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"text": [f"text {i}" for i in range(10)]}), path)
    unit = pa.table({"shard": [3], "row0": [0], "rows": [10], "rgs": [[0]], "skip": [0], "rel": ["s.parquet"],
                     "path": [str(path)]})
    pq.write_table(pa.table({"text": ["only", "four", "rows", "now"]}), path)  # replaced after listing
    block = stages.read_and_tokenize(unit, fs=fsspec.filesystem("file"), request=request, text_column="text",
                                     id_column=None)
    assert block.num_rows == 1 and block.column("_shard").to_pylist() == [3]
    (error,) = block.column("_error").to_pylist()
    assert "4 rows where 10 were listed from row 0: the file changed while it was being read" in error


def test_actor_threads_follow_the_cpus_and_a_thread_cap_in_the_environment(monkeypatch):
    """One CPU actor on a 2-CPU node runs torch on 2 threads; OMP_NUM_THREADS=1 in the driver's environment
    caps it (Ray replaces that variable in its workers, so the driver carries it over)."""
    from types import SimpleNamespace

    from pipeline.runner.run import _resources

    def fake(cpus):
        return SimpleNamespace(cluster_resources=lambda: {"CPU": float(cpus)},
                               nodes=lambda: [{"Alive": True, "Resources": {"CPU": float(cpus)}}])

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _resources(fake(2), None, None) == (1, 1.0, 0.0, 2)
    assert _resources(fake(8), None, None) == (1, 4.0, 0.0, 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _resources(fake(2), None, None) == (1, 1.0, 0.0, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _resources(fake(8), None, None) == (1, 4.0, 0.0, 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "auto")  # not a count: no cap
    assert _resources(fake(2), None, None)[3] == 2

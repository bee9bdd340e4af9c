"""Strata against a real S3 server (moto's server mode on 127.0.0.1, reached over HTTP by s3fs):
commits without folders or renames, resume after a SIGKILL, re-runs, the lock, storage options
per URL and their secrets kept out of every message."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.runner import read_embeddings
from pipeline.storage import LOCK, Output, OutputInUse
from pipeline.stores import set_storage_options
from reference import embed
from s3server import SECRET_KEY

OPTS = dict(layers="1,-1", poolings="mean,last", id_column="id", progress=False)
WORDS = "river stone cloud light tree house bird fish cat dog wind rain sun moon hill road".split()

pytestmark = pytest.mark.slow


def shards(fs, prefix: str, n: int, rows: int, seed: int = 0) -> list[str]:
    """``n`` Parquet shards of ``rows`` short texts under ``prefix`` (a bucket path); their ids."""
    ids = []
    for s in range(n):
        part = [f"s{s}-r{r}" for r in range(rows)]
        texts = [" ".join(WORDS[(seed + s * 5 + r * 3 + k) % len(WORDS)] for k in range(6 + r % 5)) for r in range(rows)]
        with fs.open(f"{prefix}/shard-{s:02d}.parquet", "wb") as f:
            pq.write_table(pa.table({"id": part, "text": texts}), f)
        ids += part
    return ids


def vectors(table: pa.Table, column: str) -> dict[str, np.ndarray]:
    return dict(zip(table.column("id").to_pylist(), np.asarray(table.column(column).to_pylist(), dtype=np.float32)))


def test_embed_commits_to_s3_and_equals_a_local_run(ray_local, model_dir, s3, tmp_path):
    """Storage options given per URL (no environment): every row once, vectors equal to the same
    input embedded on local disk, no staging object left, and a re-run does nothing."""
    ids = shards(s3.fs, f"{s3.name}/in", 3, 40)
    set_storage_options(s3.url(), s3.options)
    summary = embed(s3.url("in"), s3.url("out"), model=model_dir, **OPTS)
    assert summary.shards_embedded == 3 and summary.rows == len(ids)
    got = read_embeddings(s3.url("out"))
    assert sorted(got.column("id").to_pylist()) == sorted(ids)
    assert not [p for p in s3.fs.find(f"{s3.name}/out") if "/_staging/" in p or p.endswith(LOCK)]

    local_in = tmp_path / "in"
    local_in.mkdir()
    s3.fs.get(f"{s3.name}/in/", str(local_in), recursive=True)
    embed(str(local_in), str(tmp_path / "out"), model=model_dir, **OPTS)
    want = read_embeddings(str(tmp_path / "out"))
    for col in ("emb_1_mean", "emb_4_last"):
        a, b = vectors(got, col), vectors(want, col)
        assert a.keys() == b.keys()
        np.testing.assert_array_equal(np.stack([a[k] for k in sorted(a)]), np.stack([b[k] for k in sorted(b)]))

    again = embed(s3.url("in"), s3.url("out"), model=model_dir, **OPTS)
    assert again.shards_embedded == 0 and again.shards_skipped == 3


def test_lock_refusal_names_the_url_and_break_lock_takes_it(ray_local, model_dir, s3):
    shards(s3.fs, f"{s3.name}/in", 1, 10)
    set_storage_options(s3.url(), s3.options)
    held = {"token": "x", "host": "pod-7f9c", "pid": 1, "started": "2026-12-06T00:00:00Z", "heartbeat": time.time()}
    s3.fs.pipe(f"{s3.name}/out/{LOCK}", json.dumps(held).encode())
    with pytest.raises(OutputInUse) as e:
        embed(s3.url("in"), s3.url("out"), model=model_dir, **OPTS)
    msg = str(e.value)
    assert f"s3://{s3.name}/out/{LOCK}" in msg and "host pod-7f9c" in msg and "--break-lock" in msg, msg
    assert "5 min" in msg, msg
    summary = embed(s3.url("in"), s3.url("out"), model=model_dir, break_lock=True, **OPTS)
    assert summary.rows == 10 and not s3.fs.exists(f"{s3.name}/out/{LOCK}")


def test_an_index_on_the_store_is_copied_whole_and_a_local_one_used_in_place(s3, tmp_path):
    """``local_index``: a local output's index is used where it is; a store's is copied into the scratch
    folder with the extra files its JSON names (a Ray-built index's lists and vectors); with one of
    its three files missing there is no index, on either."""
    from pipeline.index import index_path, local_index, sidecars
    from pipeline.variants import Variant

    set_storage_options(s3.url(), s3.options)
    v = Variant(3, "mean")
    here = index_path(tmp_path / "out", v)
    ids, meta = sidecars(here)
    files = {here.name: b"faiss bytes", ids.name: b"ids bytes", "L3.mean.lists": b"inverted lists",
             "L3.mean.vectors": b"re-ranking vectors",
             meta.name: json.dumps({"ondisk": "L3.mean.lists", "vectors": "L3.mean.vectors"}).encode()}
    here.parent.mkdir(parents=True)
    for name, data in files.items():
        (here.parent / name).write_bytes(data)
        s3.fs.pipe(f"{s3.name}/out/indexes/{name}", data)
    assert local_index(Output(str(tmp_path / "out")), v, tmp_path / "a") == here
    assert not (tmp_path / "a").exists()  # nothing copied
    got = local_index(Output(s3.url("out")), v, tmp_path / "b")
    assert got == tmp_path / "b" / here.name
    assert {p.name: p.read_bytes() for p in got.parent.iterdir()} == files
    ids.unlink()
    s3.fs.rm(f"{s3.name}/out/indexes/{ids.name}")
    assert local_index(Output(str(tmp_path / "out")), v, tmp_path / "c") is None
    assert local_index(Output(s3.url("out")), v, tmp_path / "d") is None


def test_an_empty_lock_is_named_and_stale_after_the_timeout(s3, monkeypatch):
    set_storage_options(s3.url(), s3.options)
    s3.fs.pipe(f"{s3.name}/out/{LOCK}", b"")
    out = Output(s3.url("out"))
    with pytest.raises(OutputInUse, match=rf"cannot be read.*s3://{s3.name}/out/{LOCK}"):
        with out.lock():
            pass
    import pipeline.storage as storage

    monkeypatch.setattr(storage, "LOCK_STALE_S", -1.0)  # as if the empty lock were old
    with out.lock():
        assert json.loads(s3.fs.cat(f"{s3.name}/out/{LOCK}"))["pid"]


def test_a_missing_bucket_is_refused_and_never_created(model_dir, s3, tmp_path):
    """A mistyped bucket, as OUTPUT of `strata embed` and of a job: one line naming it, and no bucket made
    (fsspec's makedirs creates a missing bucket)."""
    shards(s3.fs, f"{s3.name}/in", 1, 5)
    typo = f"{s3.name}-typo"
    r = cli(["embed", s3.url("in"), f"s3://{typo}/out", "--model", model_dir, "--layers", "1", "--poolings", "mean",
             "--id-column", "id", "-q"], s3.env)
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("strata embed:")]
    assert f"bucket '{typo}' of s3://{typo}/out does not exist: Strata never creates buckets" in line, line
    spec = tmp_path / "job.yaml"
    spec.write_text(job_spec(s3, model_dir, "all").replace(f'output: "{s3.url("jobs")}"', f'output: "s3://{typo}/jobs"'))
    r = cli(["run", str(spec)], s3.env)
    assert r.returncode == 2 and f"bucket '{typo}'" in r.stderr, r.stderr[-2000:]
    s3.fs.invalidate_cache()
    assert not s3.fs.exists(typo)


def job_spec(s3, model_dir: str, index_variants: str, extra: str = "") -> str:
    """A job embedding s3://BUCKET/in into s3://BUCKET/jobs/nightly, its storage options in the spec."""
    return f"""
name: nightly
input: {{location: "{s3.url('in')}", id_column: id}}
model: {model_dir}
variants: {{layers: "1,-1", poolings: [mean]}}
embedding: {{max_length: 64, batch_tokens: 2048}}
resources: {{actors: 1}}
output: "{s3.url('jobs')}"
indexes: {{variants: {index_variants}, kind: flat}}
storage: {{"s3://{s3.name}": {json.dumps(s3.options)}}}
""" + extra


def cli(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.mark.alone
def test_cli_kill_then_resume_is_exactly_once(model_dir, s3, tmp_path):
    """A SIGKILL of `strata embed` after its first commit on S3, then the same command: every row
    exactly once; credentials from the environment, as a pod has them."""
    ids = shards(s3.fs, f"{s3.name}/in", 8, 150)
    cmd = [sys.executable, "-m", "pipeline", "embed", s3.url("in"), s3.url("out"), "--model", model_dir,
           "--layers", "1,-1", "--poolings", "mean", "--id-column", "id", "-q"]
    import contextlib
    import os

    fs = s3.fs
    # Ray's own failures on a loaded 2-core machine (a raylet declared dead, a node that times out at
    # start-up) end a first run before it commits anything: that run is started again, once. What is
    # tested is what follows a kill after a commit, never Ray's start-up.
    ray_failure = ("node it was running on is dead", "timed out during startup", "raylet")
    for attempt in (1, 2):
        log_path = tmp_path / f"first-{attempt}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=s3.env, start_new_session=True, stdout=log, stderr=log)
            deadline = time.time() + 420  # a loaded 2-core machine has taken over 180 s to the first commit
            while time.time() < deadline and proc.poll() is None:
                try:
                    if json.loads(fs.cat(f"{s3.name}/out/manifest.json")).get("shards"):
                        break
                except (FileNotFoundError, ValueError):
                    pass
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        fs.invalidate_cache()
        committed = 0
        with contextlib.suppress(FileNotFoundError):
            committed = len(json.loads(fs.cat(f"{s3.name}/out/manifest.json"))["shards"])
        said = log_path.read_text()
        if committed == 0 and proc.returncode != -signal.SIGKILL and attempt == 1 and any(
                x in said for x in ray_failure):
            continue
        break
    assert 1 <= committed < 8, (f"{committed} committed when killed; the first run "
                                + ("had exited" if proc.returncode != -signal.SIGKILL else "was killed") + ": "
                                + said[-2000:])
    done = subprocess.run(cmd, env=s3.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{8 - committed} shards embedded, {committed} skipped" in done.stdout
    set_storage_options(s3.url(), s3.options)
    got = read_embeddings(s3.url("out"), ["id"]).column("id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == len(ids)


def test_secret_in_storage_options_never_reaches_a_message(model_dir, s3, tmp_path):
    """Two stores in one command: INPUT on the live server, OUTPUT on an endpoint that refuses
    connections, the secret given only as storage options. The one-line error names the output,
    and neither it nor the log holds the secret."""
    shards(s3.fs, f"{s3.name}/in", 1, 5)
    env = {k: v for k, v in s3.env.items() if not k.startswith("AWS_")}
    env.update(STRATA_LOG_DIR=str(tmp_path / "logs"), AWS_MAX_ATTEMPTS="1")
    dead = dict(s3.options, endpoint_url="http://127.0.0.1:9")
    r = cli(["embed", s3.url("in"), "s3://elsewhere/out", "--model", model_dir, "--layers", "1", "--poolings", "mean",
             "--id-column", "id", "-q", "--input-options", json.dumps(s3.options), "--output-options",
             json.dumps(dead)], env)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert lines and "s3://elsewhere/out" in lines[0], r.stderr[-2000:]
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log")) if (tmp_path / "logs").exists() else ""
    for text in (r.stderr, r.stdout, logs):
        assert SECRET_KEY not in text and SECRET_KEY.split("/")[-1] not in text


@pytest.mark.alone
def test_job_on_s3_commits_indexes_and_moves_latest(model_dir, s3, tmp_path):
    """`strata run` of a job whose input and output are on S3, its storage options in the spec (none
    in the environment): LATEST names a version whose manifest lists every shard, its indexes are on
    the store, and job.json keeps the secret as ***."""
    ids = shards(s3.fs, f"{s3.name}/in", 2, 20)
    spec = tmp_path / "job.yaml"
    spec.write_text(job_spec(s3, model_dir, "all"))
    env = {k: v for k, v in s3.env.items() if not k.startswith("AWS_")}
    env["STRATA_CACHE"] = str(tmp_path / "cache")
    r = cli(["run", str(spec)], env)
    assert r.returncode == 0, r.stderr[-3000:]
    fs = s3.fs
    latest = json.loads(fs.cat(f"{s3.name}/jobs/nightly/LATEST"))
    version = f"{s3.name}/jobs/nightly/{latest['version']}/published/{latest['published']}"
    manifest = json.loads(fs.cat(f"{version}/manifest.json"))
    assert sum(s["rows_written"] for s in manifest["shards"]) == len(ids)
    assert {p.rsplit("/", 1)[-1] for p in fs.find(f"{version}/indexes")} >= {"L1.mean.faiss", "L4.mean.faiss"}
    assert not list((tmp_path / "cache").rglob("part-*"))  # indexed from the store: no embeddings copied
    job_file = fs.cat(f"{version}/job.json").decode()
    assert SECRET_KEY not in job_file and json.loads(job_file)["spec"]["storage"][f"s3://{s3.name}"]["secret"] == "***"
    again = cli(["run", str(spec)], env)
    assert again.returncode == 0 and "0 shards embedded, 2 skipped" in again.stdout, again.stdout[-2000:]
    assert json.loads(fs.cat(f"{s3.name}/jobs/nightly/LATEST"))["published"] == latest["published"]  # no change


@pytest.mark.alone
def test_two_concurrent_runs_one_refused(model_dir, s3, tmp_path):
    """A second `strata embed` into an S3 output a live run holds is refused in one line naming the
    lock; the first run completes with every row once."""
    ids = shards(s3.fs, f"{s3.name}/in", 4, 30)
    cmd = ["embed", s3.url("in"), s3.url("out"), "--model", model_dir, "--layers", "1", "--poolings", "mean",
           "--id-column", "id", "-q"]
    # The first run holds its lock until the test lets it embed (a file appears): the second then
    # surely meets a live run, however slowly a loaded machine starts it.
    go = tmp_path / "go"
    hold = ("import os, sys, time\nfrom pipeline.runner import run\nreal = run._run_ray\n"
            "def held(*a, **k):\n    while not os.path.exists(sys.argv[1]):\n        time.sleep(0.1)\n"
            "    return real(*a, **k)\nrun._run_ray = held\nfrom pipeline.cli import main\n"
            "sys.exit(main(sys.argv[2:]))\n")
    first = subprocess.Popen([sys.executable, "-c", hold, str(go), *cmd], env=s3.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    fs = s3.fs
    deadline = time.time() + 300
    while time.time() < deadline and not fs.exists(f"{s3.name}/out/{LOCK}"):
        fs.invalidate_cache()
        time.sleep(0.1)
    second = cli(cmd, s3.env)
    go.touch()
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode != 0
    line = [x for x in second.stderr.splitlines() if "error" in x][0]
    assert "in use by another run" in line and f"s3://{s3.name}/out/{LOCK}" in line, second.stderr[-2000:]
    set_storage_options(s3.url(), s3.options)
    got = read_embeddings(s3.url("out"), ["id"]).column("id").to_pylist()
    assert sorted(got) == sorted(ids)


def test_index_and_search_an_output_on_s3(ray_local, model_dir, s3, tmp_path):
    """`strata index s3://…` reads the committed parts in ranged reads (no copy of the output on local
    disk) and uploads the index; its search results equal those of the same output indexed on local
    disk; `--engine ray` is refused in one line naming why; a re-index of nothing changed is fresh."""
    from pipeline.cli import main
    from pipeline.index import index_status

    shards(s3.fs, f"{s3.name}/in", 2, 30)
    set_storage_options(s3.url(), s3.options)
    embed(s3.url("in"), s3.url("out"), model=model_dir, **OPTS)
    local = tmp_path / "out"
    s3.fs.get(f"{s3.name}/out/", str(local), recursive=True)
    queries = tmp_path / "q.parquet"
    pq.write_table(pa.table({"id": ["q0", "q1", "q2"], "text": ["river stone cloud", "bird fish cat dog", "sun moon hill"]}),
                   queries)
    opts = ["--output-options", json.dumps(s3.options)]
    assert main(["index", s3.url("out"), "--kind", "flat", *opts]) == 0
    assert main(["index", str(local), "--kind", "flat"]) == 0
    names = {p.rsplit("/", 1)[-1] for p in s3.fs.find(f"{s3.name}/out/indexes")}
    assert {"L4.mean.faiss", "L4.mean.ids.parquet", "L4.mean.json", "_built.json"} <= names
    stale, fresh = index_status(s3.url("out"), json.loads(s3.fs.cat(f"{s3.name}/out/manifest.json")), kind="flat")
    assert not stale and len(fresh) == 4
    for where, dest in ((s3.url("out"), tmp_path / "r-s3.parquet"), (str(local), tmp_path / "r-local.parquet")):
        args = ["search", where, "L4.mean", "--queries", str(queries), "--id-column", "id", "--k", "5", "--out", str(dest)]
        assert main(args + (opts if where.startswith("s3://") else [])) == 0
    a, b = pq.read_table(tmp_path / "r-s3.parquet"), pq.read_table(tmp_path / "r-local.parquet")
    assert a.num_rows == 15 and a.column("doc_id").to_pylist() == b.column("doc_id").to_pylist()
    r = cli(["index", s3.url("out"), "--kind", "ivfpq", "--engine", "ray"], s3.env)
    assert r.returncode == 2 and "--engine ray writes its inverted lists to a local disk" in r.stderr, r.stderr


def test_commit_dir_on_s3_copies_each_object_and_leaves_no_staging(s3):
    """On an object store a commit copies each staged object (nested ones too) to its own key: no
    folder object is ever copied (fsspec 2026.6's recursive move failed on exactly that)."""
    set_storage_options(s3.url(), s3.options)
    out = Output(s3.url("out"))
    staged = out.path("_staging", "run1", "shard-a")
    files = {"part-0.parquet": b"a" * 10, "rejects-part-0.parquet": b"r", "sub/part-1.arrow": b"b" * 3}
    for name, data in files.items():
        out.fs.pipe_file(f"{staged}/{name}", data)
    rel = out.commit_dir(staged, "shard-a", "run1")
    fs = s3.fs
    got = {p[len(f"{s3.name}/out/{rel}") + 1:]: fs.cat_file(p) for p in fs.find(f"{s3.name}/out/{rel}")}
    assert got == files
    assert not fs.find(f"{s3.name}/out/_staging")


def test_nightly_job_on_s3_publishes_versions_and_a_crash_never_reaches_latest(ray_local, model_dir, s3, tmp_path,
                                                                                 monkeypatch):
    """Nightly re-embedding on S3: a shard edited, one added, one removed; the run crashes after its
    commits, before LATEST moves. A reader of LATEST still gets the previous version whole; the next
    run publishes the new one without embedding again, and retention (keep 1) then removes the old
    version and the shard folders only it read."""
    import io

    import pipeline.jobs.run as jobs
    from pipeline.jobs import read_latest, run_job

    fs = s3.fs
    ids_a = shards(fs, f"{s3.name}/in", 3, 20)
    spec = tmp_path / "nightly.yaml"
    spec.write_text(job_spec(s3, model_dir, "[L4.mean]", "retention: {keep: 1}\n"))
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    run = lambda: run_job(spec, progress=False, stream=io.StringIO())  # noqa: E731
    run()
    job = s3.url("jobs", "nightly")
    latest_a = read_latest(job)
    url_a = f"{job}/{latest_a['version']}/published/{latest_a['published']}"
    assert sorted(read_embeddings(url_a, ["id"]).column("id").to_pylist()) == sorted(ids_a)

    # upstream: shard 1 edited, shard 2 removed, shard 3 added
    t = pq.read_table(fs.open(f"{s3.name}/in/shard-01.parquet", "rb"))
    with fs.open(f"{s3.name}/in/shard-01.parquet", "wb") as f:
        pq.write_table(t.set_column(1, "text", pa.array([x.upper() for x in t.column("text").to_pylist()])), f)
    fs.rm(f"{s3.name}/in/shard-02.parquet")
    with fs.open(f"{s3.name}/in/shard-03.parquet", "wb") as f:
        pq.write_table(pa.table({"id": [f"new-{i}" for i in range(20)], "text": [f"fresh text {i}" for i in range(20)]}), f)
    ids_b = [i for i in ids_a if not i.startswith("s2-")] + [f"new-{i}" for i in range(20)]

    def crash(*a, **k):
        raise RuntimeError("killed between commit and flip")

    monkeypatch.setattr(jobs, "build_indexes", crash)
    with pytest.raises(RuntimeError, match="between commit and flip"):
        run()
    monkeypatch.undo()
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    assert read_latest(job) == latest_a  # the reader's view: the previous version, whole
    got = read_embeddings(url_a, ["id", "emb_4_mean"])
    assert sorted(got.column("id").to_pylist()) == sorted(ids_a)

    second = run()
    assert second["embed"]["shards_embedded"] == 0  # its version was frozen by the crashed run: now indexed, named
    latest_b = read_latest(job)
    url_b = f"{job}/{latest_b['version']}/published/{latest_b['published']}"
    assert latest_b["published"] != latest_a["published"]
    assert sorted(read_embeddings(url_b, ["id"]).column("id").to_pylist()) == sorted(ids_b)
    assert second["retention"]["removed"] == [latest_a["published"]] and second["retention"]["freed_folders"] == 2
    fs.invalidate_cache()
    assert not fs.exists(url_a.split("://", 1)[1])
    series = f"{s3.name}/jobs/nightly/{latest_b['version']}"
    manifest = json.loads(fs.cat(f"{series}/manifest.json"))
    assert manifest.get("retired") == []
    on_store = {p.split("/embeddings/")[1].split("/")[0] for p in fs.find(f"{series}/embeddings")}
    assert on_store == {s["output"].split("/")[-1] for s in manifest["shards"]}

    # then upstream re-exports everything Spark-style: new file names, a _SUCCESS marker, the same rows
    rows = pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in sorted(fs.find(f"{s3.name}/in"))])
    before = vectors(read_embeddings(url_b, ["id", "emb_4_mean"]), "emb_4_mean")
    fs.rm(f"{s3.name}/in", recursive=True)
    for k, (lo, hi) in enumerate(((0, 25), (25, rows.num_rows))):
        with fs.open(f"{s3.name}/in/part-0000{k}-5d1e-c000.snappy.parquet", "wb") as f:
            pq.write_table(rows.slice(lo, hi - lo), f)
    fs.pipe(f"{s3.name}/in/_SUCCESS", b"")
    third = run()
    # nothing through the model, every vector copied; the index updated from the version LATEST named: unchanged
    assert third["embed"]["rows_embedded"] == 0 and third["embed"]["rows_reused"] == rows.num_rows
    (index,) = third["indexes"]["built"]
    # the second run updated version a's index (shard 1's 20 edited texts and shard 2's 20 rows out, 40 in)
    assert second["indexes"]["built"][0]["update"] == {"deleted": 40, "added": 40, "changed_since_training": 80}
    assert index["update"] == {"deleted": 0, "added": 0, "changed_since_training": 80}
    latest_c = read_latest(job)
    url_c = f"{job}/{latest_c['version']}/published/{latest_c['published']}"
    after = vectors(read_embeddings(url_c, ["id", "emb_4_mean"]), "emb_4_mean")
    assert before.keys() == after.keys() and all(np.array_equal(before[i], after[i]) for i in before)

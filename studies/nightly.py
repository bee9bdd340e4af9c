"""``python studies/nightly.py``: scheduled re-embedding on S3, measured case by case.

A job (``strata run``, in a child process as a scheduler runs it) embeds ``--shards`` x ``--rows``
short texts from ``s3://BUCKET/in`` into ``s3://BUCKET/jobs`` on a real S3 server: moto's server
mode, started here on 127.0.0.1 behind a WSGI layer that counts every request's bytes. The job's
requests (driver and Ray workers) reach it as ``127.0.0.1``; this script's own reads as ``localhost``,
so they are not counted. Upstream then changes, one case at a time, and the job runs again:

- ``initial``: the first run;
- ``unchanged``: nothing changed;
- ``new shard``: one more shard of ``--rows`` rows;
- ``1% edited``: 1% of the texts of every shard rewritten (with ``--kills``, again after it: the run
  SIGKILLed at each stage, the reader checked each time, then completed by running again);
- ``re-export``: every row written again Spark-style under new file names (and a ``_SUCCESS``);
- ``5% deleted``: 5% of the rows removed.

Per case: rows embedded, copied (``reuse``) and dropped, bytes read from and written to the store,
objects copied inside it, wall time, what the index did, and what a reader of LATEST saw: polled
while the job runs (the published version it names, its rows, and whether every part it lists is
there).

Prints the table and writes ``{out}/nightly.json`` and ``{out}/nightly.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: this checkout's pipeline, not another installed one
    sys.path.insert(0, str(ROOT))

from pipeline.bench.measure import git_commit  # noqa: E402

KEY, SECRET = "AKIASTRATASTUDYKEY00", "studysecretstudysecretstudysecret0000000"
KILL_STAGES = (("embedding", "job nightly:", 10.0), ("after the commits", "  embed:", 0.0),
               ("indexing the new version", "  published version", 0.0))


class Counting:
    """WSGI layer in front of moto: bytes in (request bodies) and out (response bodies) per method,
    objects copied server-side, for requests whose Host is 127.0.0.1 (the job's)."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()
        self.reset()

    def reset(self) -> dict:
        with getattr(self, "lock", threading.Lock()):
            old = getattr(self, "counts", None)
            self.counts = {"requests": 0, "bytes_read": 0, "bytes_written": 0, "copies": 0, "gets": 0, "puts": 0,
                           "read_by_area": {}}
        return old

    def __call__(self, environ, start_response):
        counted = environ.get("HTTP_HOST", "").startswith("127.0.0.1")
        method = environ["REQUEST_METHOD"]
        sent = int(environ.get("CONTENT_LENGTH") or 0)
        copy = "HTTP_X_AMZ_COPY_SOURCE" in environ
        body = self.app(environ, start_response)
        got = 0
        try:
            for chunk in body:
                got += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()
            if counted:
                with self.lock:
                    c = self.counts
                    c["requests"] += 1
                    c["copies"] += copy
                    c["bytes_written"] += sent
                    if method == "GET":
                        c["gets"] += 1
                        c["bytes_read"] += got
                        area = area_of(environ.get("PATH_INFO", ""))
                        c["read_by_area"][area] = c["read_by_area"].get(area, 0) + got
                    if method in ("PUT", "POST") and not copy:
                        c["puts"] += 1


def area_of(path: str) -> str:
    """What a request read: the input, the staging folder, committed parts, indexes, or metadata."""
    for part, area in (("/in/", "input"), ("/_staging/", "staging"), ("/embeddings/", "parts"),
                       ("/indexes/", "indexes")):
        if part in path:
            return area
    return "metadata"


def start_server():
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    counting = Counting(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, counting, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, counting, port


def texts_for(rng: np.random.Generator, n: int, vocab: list[str]) -> list[str]:
    lengths = rng.integers(8, 20, size=n)
    return [" ".join(vocab[j] for j in rng.integers(len(vocab), size=k)) + f" ({rng.integers(1 << 40):x})."
            for k in lengths]


class Upstream:
    """The input corpus on the store, changed case by case; ``rows`` is what it holds."""

    def __init__(self, fs, bucket: str, shards: int, rows: int, seed: int = 0):
        self.fs, self.prefix, self.rng = fs, f"{bucket}/in", np.random.default_rng(seed)
        syll = ["ka", "lo", "mi", "ra", "te", "su", "no", "vi", "de", "po", "an", "el", "or", "ix", "um"]
        self.vocab = [a + b + c for a in syll for b in syll for c in syll[:9]]
        self.files: dict[str, pa.Table] = {}
        for s in range(shards):
            self.put(f"shard-{s:02d}.parquet", self.new_rows(f"s{s}", rows))

    def new_rows(self, tag: str, n: int) -> pa.Table:
        return pa.table({"id": [f"{tag}-{i}" for i in range(n)], "text": texts_for(self.rng, n, self.vocab)})

    def put(self, name: str, t: pa.Table) -> None:
        with self.fs.open(f"{self.prefix}/{name}", "wb") as f:
            pq.write_table(t, f)
        self.files[name] = t

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.files.values())

    def new_shard(self, rows: int) -> str:
        name = f"shard-{len(self.files):02d}.parquet"
        self.put(name, self.new_rows(f"s{len(self.files)}", rows))
        return f"{rows:,} rows in {name}"

    def edit(self, share: float) -> str:
        n = 0
        for name, t in list(self.files.items()):
            k = int(round(share * t.num_rows))
            at = self.rng.choice(t.num_rows, size=k, replace=False)
            texts = t.column("text").to_pylist()
            for i, new in zip(at, texts_for(self.rng, k, self.vocab)):
                texts[i] = new
            self.put(name, t.set_column(1, "text", pa.array(texts)))
            n += k
        return f"{n:,} texts rewritten in place"

    def re_export(self, parts: int) -> str:
        every = pa.concat_tables(list(self.files.values()))
        for name in list(self.files):
            self.fs.rm(f"{self.prefix}/{name}")
        self.files.clear()
        cut = np.linspace(0, every.num_rows, parts + 1).astype(int)
        job = f"{self.rng.integers(1 << 32):08x}"
        for k in range(parts):
            self.put(f"part-{k:05d}-{job}-c000.snappy.parquet", every.slice(cut[k], cut[k + 1] - cut[k]))
        self.fs.pipe(f"{self.prefix}/_SUCCESS", b"")
        return f"{every.num_rows:,} rows under {parts} new file names + _SUCCESS"

    def delete(self, share: float) -> str:
        n = 0
        for name, t in list(self.files.items()):
            k = int(round(share * t.num_rows))
            keep = np.setdiff1d(np.arange(t.num_rows), self.rng.choice(t.num_rows, size=k, replace=False))
            self.put(name, t.take(pa.array(keep)))
            n += k
        return f"{n:,} rows removed"


class Reader:
    """A reader of LATEST, polling from this process (not counted): the version it names, its rows,
    and whether every part its manifest lists is on the store."""

    def __init__(self, fs, job: str):
        self.fs, self.job = fs, job
        self.seen: list[dict] = []
        self._stop = threading.Event()

    def look(self) -> dict:
        self.fs.invalidate_cache()
        try:
            latest = json.loads(self.fs.cat(f"{self.job}/LATEST"))
        except FileNotFoundError:
            return {"version": None, "rows": 0, "whole": True}
        root = f"{self.job}/{latest['version']}/published/{latest['published']}"
        m = json.loads(self.fs.cat(f"{root}/manifest.json"))
        rows, whole = 0, True
        for s in m["shards"]:
            folder = os.path.normpath(f"{root}/{s['output']}")
            for f in s["files"]:
                try:
                    whole &= self.fs.info(f"{folder}/{f}")["size"] == s["parts"][f]["bytes"]
                except FileNotFoundError:
                    whole = False
            rows += s["rows_written"]
        return {"version": latest["published"], "rows": rows, "whole": bool(whole)}

    def poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen.append(self.look())
            except Exception as e:  # noqa: BLE001 - a failed read is what a reader would see
                self.seen.append({"version": None, "rows": 0, "whole": False, "error": f"{type(e).__name__}: {e}"})
            self._stop.wait(0.5)

    def __enter__(self):
        self.seen, self._stop = [], threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    def summary(self) -> str:
        views = {}
        for s in self.seen:
            views.setdefault((s["version"], s["rows"], s["whole"]), 0)
            views[(s["version"], s["rows"], s["whole"])] += 1
        return "; ".join(f"{v[1]:,} rows{'' if v[2] else ' NOT WHOLE'} ({n} looks)" for v, n in views.items())


def key_column_bytes(fs, job: str) -> float:
    """Bytes a row's ``key`` takes in the committed parts (its column chunks' compressed size): the key
    table's size per row."""
    latest = json.loads(fs.cat(f"{job}/LATEST"))
    m = json.loads(fs.cat(f"{job}/{latest['version']}/manifest.json"))
    size = rows = 0
    for s in m["shards"]:
        for f in s["files"]:
            with fs.open(f"{job}/{latest['version']}/{s['output']}/{f}", "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                col = next(rg.column(c) for c in range(rg.num_columns) if rg.column(c).path_in_schema == "key")
                size += col.total_compressed_size
                rows += rg.num_rows
    return round(size / max(rows, 1), 2)


def run_job(spec: Path, env: dict, kill_after: tuple[str, float] | None = None) -> tuple[dict | None, float, str]:
    """``strata run SPEC --json`` in a child process; with ``kill_after`` (a line prefix, seconds) SIGKILL
    it that long after that line appears. Returns (summary, seconds, the killed stage or '')."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(spec), "--json", "-q"], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    summary = None
    lines = []
    for line in p.stdout:
        lines.append(line)
        if kill_after and line.startswith(kill_after[0]):
            time.sleep(kill_after[1])
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return None, time.perf_counter() - t0, line.strip()
            kill_after = None  # it ended before the kill: read the rest
        if line.startswith("{"):
            summary = json.loads(line)
    rc = p.wait()
    if rc:
        raise RuntimeError(f"strata run exited {rc}: {''.join(lines)[-2000:]}\n{p.stderr.read()[-3000:]}")
    return summary, time.perf_counter() - t0, ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python studies/nightly.py", description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--rows", type=int, default=10_000, help="rows per shard")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="1,4")
    ap.add_argument("--kind", default="ivfpq", help="the job's index kind")
    ap.add_argument("--kills", action="store_true", help="kill the 1%%-edit case at each stage first")
    ap.add_argument("--out", default="studies/out")
    args = ap.parse_args(argv)

    import s3fs

    server, counting, port = start_server()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": KEY, "secret": SECRET}
    reader_fs = s3fs.S3FileSystem(endpoint_url=f"http://localhost:{port}", key=KEY, secret=SECRET,
                                  skip_instance_cache=True)
    bucket = "nightly"
    reader_fs.mkdir(bucket)
    upstream = Upstream(reader_fs, bucket, args.shards, args.rows)
    last_layer = args.layers.split(",")[-1]
    work = Path(tempfile.mkdtemp(prefix="strata-nightly-"))
    spec = work / "nightly.yaml"
    spec.write_text(f"""name: nightly
input: {{location: "s3://{bucket}/in", id_column: id}}
model: {args.model}
variants: {{layers: "{args.layers}", poolings: [mean]}}
embedding: {{max_length: 64}}
output: "s3://{bucket}/jobs"
indexes: {{variants: [L{last_layer}.mean], kind: {args.kind}}}
retention: {{keep: 2}}
storage: {{"s3://{bucket}": {json.dumps(options)}}}
""")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"STRATA_CACHE": str(work / "cache")}
    reader = Reader(reader_fs, f"{bucket}/jobs/nightly")
    cases = [("initial", lambda: f"{upstream.rows:,} rows in {args.shards} shards"),
             ("unchanged", lambda: "nothing"),
             ("new shard", lambda: upstream.new_shard(args.rows)),
             ("1% edited", lambda: upstream.edit(0.01)),
             *([("1% edited, killed", lambda: upstream.edit(0.01))] if args.kills else []),
             ("re-export", lambda: upstream.re_export(4)),
             ("5% deleted", lambda: upstream.delete(0.05))]
    results = []
    for name, change in cases:
        what = change()
        kills = []
        if name == "1% edited, killed":
            for stage, line, delay in KILL_STAGES:
                before = reader.look()
                with reader:
                    _, seconds, killed = run_job(spec, env, (line, delay))
                after = reader.look()
                kills.append({"stage": stage, "killed_at": killed, "seconds": round(seconds, 1),
                              "reader_during": reader.summary(), "reader_after": after,
                              "latest_unchanged": after == before})
                print(f"  killed {stage}: reader after {after['rows']:,} rows, whole {after['whole']}, "
                      f"LATEST unchanged {after == before}", flush=True)
        counting.reset()
        with reader:
            summary, seconds, _ = run_job(spec, env)
        io = counting.reset()
        e = summary["embed"]
        (index,) = summary["indexes"]["built"] or [None]
        after = reader.look()
        row = {"case": name, "change": what, "input_rows": upstream.rows, "rows_embedded": e["rows_embedded"],
               "rows_reused": e["rows_reused"], "rows_deduplicated": e["rows_deduplicated"],
               "rows_dropped": e["rows_dropped"], "plan_seconds": round(e["plan_seconds"], 1),
               "seconds": round(seconds, 1), "mb_read": round(io["bytes_read"] / 1e6, 2),
               "mb_written": round(io["bytes_written"] / 1e6, 2), "objects_copied": io["copies"],
               "mb_read_by_area": {k: round(v / 1e6, 2) for k, v in sorted(io["read_by_area"].items())},
               "requests": io["requests"],
               "index": None if index is None else (
                   f"updated: {index['update']['deleted']:,} deleted, {index['update']['added']:,} added"
                   if index.get("update") else f"built ({index.get('rebuilt')})"),
               "published_new": summary.get("published_new"), "reader_during": reader.summary(),
               "reader_after": after, "kills": kills}
        assert after["rows"] == upstream.rows and after["whole"], (after, upstream.rows)
        results.append(row)
        print(f"{name:11} {what}: embedded {row['rows_embedded']:,}, copied {row['rows_reused']:,}, dropped "
              f"{row['rows_dropped']:,}; read {row['mb_read']} MB, wrote {row['mb_written']} MB, "
              f"{row['objects_copied']} copies ({row['mb_read_by_area']}); {row['seconds']} s; index {row['index']}; reader: "
              f"{row['reader_during']}", flush=True)
    key_bytes = key_column_bytes(reader_fs, f"{bucket}/jobs/nightly")
    server.shutdown()
    record = {"git_commit": git_commit(), "key_bytes_per_row": key_bytes, "shards": args.shards, "rows_per_shard": args.rows, "model": args.model,
              "layers": args.layers, "kind": args.kind, "cpus": os.cpu_count(), "cases": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nightly.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"Measured by `python studies/nightly.py{' --kills' if args.kills else ''}` at {record['git_commit']} "
             f"({args.shards} x {args.rows:,} rows, {args.model} layers {args.layers}, {os.cpu_count()} CPUs, "
             "moto S3 on 127.0.0.1).", "",
             "| case | upstream change | embedded | copied | dropped | read MB | written MB | copies | wall s "
             "| index | a reader of LATEST saw |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['change']} | {r['rows_embedded']:,} | {r['rows_reused']:,} | "
                     f"{r['rows_dropped']:,} | {r['mb_read']} | {r['mb_written']} | {r['objects_copied']} | "
                     f"{r['seconds']} | {r['index']} | {r['reader_during']} |")
    for r in results:
        for k in r["kills"]:
            lines.append(f"\n- killed while {k['stage']} ({k['killed_at']!r}): LATEST unchanged "
                         f"{k['latest_unchanged']}, a reader then saw {k['reader_after']['rows']:,} rows "
                         f"(whole: {k['reader_after']['whole']})")
    lines.append(f"\nThe key column takes {key_bytes} bytes a row in the committed parts.")
    (out / "nightly.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

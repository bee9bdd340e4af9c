"""``python studies/index_memory.py``: peak memory per Ray index task while the corpus grows 4x.

Makes synthetic clustered float32 outputs of N and 4N rows (dim 64) cut into parts of the *same*
size (so 4N has 4x the parts), builds each with ``index.ray.build_ivfpq_ray`` on a local Ray (tasks
of 1 CPU, FAISS on 1 thread) with the IVF-PQ options fixed (nlist, m, train rows), and reports per
task kind (sample, train, encode) the peak RSS of each task, taken inside the task by ``TaskPeaks``,
the probe the build passes to every task (``index/ray/tasks.py``: VmHWM after resetting it at the
task's start, so a reused Ray worker does not carry an earlier task's peak), and the driver's peak
during the merge (reset after the last encode). What should stay flat: sample, train and encode (a
part's chunk + its codes); what grows: the merge (the driver holds every id) and the wall time.

Prints a table and writes ``{out}/index_memory.md`` and ``{out}/index_memory.json`` (the JSON is
what ``studies/scale_check.py`` reads when copied to ``docs/scale_measured.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: this checkout's pipeline, not another installed one
    sys.path.insert(0, str(ROOT))

from pipeline.bench.measure import git_commit, write_study  # noqa: E402

COL = "emb_3_mean"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


class TaskPeaks:
    """The build's task probe (``build_ivfpq_ray(probe=...)``): a task's own peak RSS, appended to ``path``
    as ``{"task", "rel", "rows", "peak_rss_mb", "start_rss_mb", "pid"}`` per task (pickled into each task)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.start_mb = 0.0

    def start(self) -> None:
        """Start a task's own peak: a reused Ray worker's lifetime peak would carry earlier tasks' memory
        (Linux: writing 5 to clear_refs resets VmHWM; elsewhere the lifetime peak is what is reported)."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start_mb = round(_status_kb("VmRSS:") / 1024, 1)
        except (OSError, StopIteration):
            pass

    def stop(self, task: str, rel: str = "", rows: int = 0) -> dict:
        """This process's peak RSS (MB) since ``start``, appended to the file and returned."""
        try:
            kb = _status_kb("VmHWM:")
        except (OSError, StopIteration):
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mb = round(kb / 1024, 1)
        with open(self.path, "a") as f:
            f.write(json.dumps({"task": task, "rel": rel, "rows": rows, "peak_rss_mb": mb,
                                "start_rss_mb": self.start_mb, "pid": os.getpid()}) + "\n")
        return {"peak_rss_mb": mb}


def clustered(n: int, dim: int, seed: int, clusters: int = 200) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    return centres[rng.integers(clusters, size=n)] + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)


def make_output(root: Path, parts: int, part_rows: int, dim: int, seed: int = 0) -> int:
    """A committed output of ``parts`` parts of ``part_rows`` rows each (written part by part)."""
    shards = []
    for p in range(parts):
        folder = root / "embeddings" / f"s{p}-c0"
        folder.mkdir(parents=True)
        x = clustered(part_rows, dim, seed * 10_000 + p)
        ids = [f"doc-{p}-{i}" for i in range(part_rows)]
        pq.write_table(pa.table({"id": ids, COL: pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)}),
                       folder / "part-0.parquet", row_group_size=4096)
        shards.append({"path": f"in/s{p}.parquet", "output": f"embeddings/s{p}-c0", "files": ["part-0.parquet"],
                       "rows": part_rows})
    manifest = {"signature": {"dtype": "float32"}, "shards": shards,
                "variants": [{"name": "L3.mean", "column": COL, "layer": 3, "pooling": "mean", "dim": dim,
                              "dtype": "float32"}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return parts * part_rows


def build(root: Path, opts: dict, peaks_file: Path) -> dict:
    from pipeline.index.ray import build_ivfpq_ray

    probe = TaskPeaks(peaks_file.resolve())
    n_shards = len(json.loads((root / "manifest.json").read_text())["shards"])
    seen, merge = [], {}

    encode_s = []

    def on_shard(v, key, result):
        seen.append(key)
        encode_s.append(result["seconds"])
        if len(seen) == n_shards:
            probe.start()  # the driver's peak from here on is the merge's
            tracemalloc.start()  # and its Python heap (the ids): RSS hides it under memory freed earlier

    def on_built(v, params, seconds):
        merge["peak_rss_mb"] = probe.stop("merge", "", params["rows"])["peak_rss_mb"]
        merge["py_heap_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
        tracemalloc.stop()
        merge["seconds"] = round(seconds, 2)

    peaks_file.write_text("")
    t0 = time.perf_counter()
    build_ivfpq_ray(root, on_shard=on_shard, on_built=on_built, probe=probe, **opts)
    wall = time.perf_counter() - t0
    tasks = [json.loads(line) for line in peaks_file.read_text().splitlines() if line.strip()]
    by = {}
    for t in tasks:
        by.setdefault(t["task"], []).append(t["peak_rss_mb"])
        by.setdefault(t["task"] + "_above_start", []).append(round(t["peak_rss_mb"] - t["start_rss_mb"], 1))
    return {"seconds": round(wall, 1), "merge_seconds": merge["seconds"], "merge_py_heap_mb": merge["py_heap_mb"],
            "tasks": by,
            "encode_seconds": round(sum(encode_s), 2)}


def row(label: str, rows: int, parts: int, r: dict) -> dict:
    t = r["tasks"]
    med = lambda v: float(np.median(v))  # noqa: E731
    return {"corpus": label, "rows": rows, "parts": parts, "part_rows": rows // parts,
            "sample_mb_median": med(t["sample"]), "sample_mb_max": max(t["sample"]),
            "train_mb": max(t["train"]), "encode_mb_median": med(t["encode"]), "encode_mb_max": max(t["encode"]),
            "encode_tasks": len(t["encode"]),
            "encode_above_start_mb_max": max(t["encode_above_start"]),
            "train_above_start_mb": max(t["train_above_start"]),
            "merge_above_start_mb": max(t["merge_above_start"]), "merge_mb": max(t["merge"]),
            "merge_py_heap_mb": r["merge_py_heap_mb"], "merge_seconds": r["merge_seconds"],
            "build_seconds": r["seconds"], "encode_task_seconds_sum": r["encode_seconds"],
            "encode_us_per_row": round(1e6 * r["encode_seconds"] / rows, 2)}


def _ratio(b: dict, a: dict, key: str) -> str:
    """b/a of one figure; "n/a" where the small corpus measured 0 (a sample too coarse for a tiny run)."""
    return f"{b[key] / a[key]:.2f}x" if a[key] else "n/a"


def markdown(rows: list[dict], meta: dict) -> str:
    head = ("| corpus | rows | parts x rows | sample task MB (median / max) | train task MB | "
            "encode task MB (median / max) | encode above its start MB (max) | merge (driver) MB | "
            "merge above its start MB | merge Python heap peak MB | merge s | build s | encode task µs/row |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['corpus']} | {r['rows']:,} | {r['parts']} x {r['part_rows']:,} | "
                     f"{r['sample_mb_median']:.0f} / {r['sample_mb_max']:.0f} | {r['train_mb']:.0f} | "
                     f"{r['encode_mb_median']:.0f} / {r['encode_mb_max']:.0f} | {r['encode_above_start_mb_max']:.1f} | "
                     f"{r['merge_mb']:.0f} | {r['merge_above_start_mb']:.1f} | {r['merge_py_heap_mb']:.1f} | "
                     f"{r['merge_seconds']:.1f} | {r['build_seconds']:.1f} | {r['encode_us_per_row']:.1f} |")
    a, b = rows[0], rows[-1]
    lines.append("")
    lines.append(f"Ratios {b['corpus']}/{a['corpus']}: encode task max {_ratio(b, a, 'encode_mb_max')}, "
                 f"train {_ratio(b, a, 'train_mb')}, merge RSS {_ratio(b, a, 'merge_mb')}, "
                 f"merge Python heap {_ratio(b, a, 'merge_py_heap_mb')}, "
                 f"build time {_ratio(b, a, 'build_seconds')}.")
    lines.append(f"Medians of {meta['repeats']} builds per size, interleaved. Options: {meta['options']}; "
                 f"dim {meta['dim']}; {meta['machine']}; commit {meta['commit']}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python studies/index_memory.py", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=50_000, help="N (the small corpus); the large one is 4N")
    ap.add_argument("--part-rows", type=int, default=12_500)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--nlist", type=int, default=256)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--train-rows", type=int, default=16_384)
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="builds per size, interleaved; the table gives medians")
    ap.add_argument("--out", default="bench-index-memory")
    args = ap.parse_args(argv)

    import faiss
    import ray

    faiss.omp_set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peaks_file = out / "task-peaks.jsonl"
    os.environ["OMP_NUM_THREADS"] = "1"
    started = not ray.is_initialized()  # a caller's Ray (a test's) is used as it is
    if started:  # address="local": a Ray of its own, even while another is up on this machine
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
    opts = dict(nlist=args.nlist, m=args.m, train_rows=args.train_rows, chunk_rows=args.chunk_rows,
                task_cpus=1.0, threads=1)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="strata-index-mem-warm-") as tmp:  # Ray and worker start-up
            make_output(Path(tmp), args.cpus, 2000, args.dim, seed=9)
            build(Path(tmp), dict(opts, nlist=16, train_rows=1000), peaks_file)
        runs: dict[str, list[dict]] = {"1x": [], "4x": []}
        for _ in range(args.repeats):
            for label, mult in (("1x", 1), ("4x", 4)):
                with tempfile.TemporaryDirectory(prefix=f"strata-index-mem-{label}-") as tmp:
                    parts = mult * args.rows // args.part_rows
                    rows = make_output(Path(tmp), parts, args.part_rows, args.dim)
                    r = build(Path(tmp), opts, peaks_file)
                    runs[label].append(row(label, rows, parts, r))
                    print(json.dumps(runs[label][-1]), flush=True)
    finally:
        if started:
            ray.shutdown()
    for label, rs in runs.items():  # medians over the repeats, field by field
        results.append({k: (rs[0][k] if isinstance(rs[0][k], str) else
                            round(float(np.median([r[k] for r in rs])), 2)) for k in rs[0]})
        for k in ("rows", "parts", "part_rows", "encode_tasks"):
            results[-1][k] = int(results[-1][k])
    results_all = runs
    commit = git_commit(__file__) or "-"
    meta = {"repeats": args.repeats, "options": opts, "dim": args.dim, "commit": commit,
            "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
            "machine": f"{os.cpu_count()} CPUs visible, {args.cpus} given to Ray, {platform.machine()}"}
    write_study(out, "index_memory", {"meta": meta, "rows": results, "runs": results_all}, markdown(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

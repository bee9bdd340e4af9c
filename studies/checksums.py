"""What the per-part checksums cost (issue #43, item 10): the CRC-32 each committed part carries is
computed by its writer over the bytes it uploads, and verified (``Output.check_parts``) by reading
every byte of every part before an output is read whole (``strata index``, evaluation, export).

    python studies/checksums.py [--parts 8 --rows 5000 --dim 576 --repeats 5] [--out bench-checksums]

Writes parts as the embed stage does (``parts.write_part``: id, key and one float32 vector
column), then times, interleaved and repeated (medians):

- writing: ``write_part`` (serialise, CRC-32 the buffer, write) against the same write with no CRC;
- reading: ``read_part`` of every part (what a reader does anyway) against ``file_crc32`` of every
  part (what the verification adds).

Prints a Markdown table and writes it, with ``results.json``, to ``--out``. Local disk, warm page
cache: on an object store the verification is a second download of every part (its bytes, not its
time, are the cost there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: this checkout's pipeline, not another installed one
    sys.path.insert(0, str(ROOT))


def part_table(rows: int, dim: int, seed: int):
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, dim), dtype=np.float32)
    return pa.table({"id": [f"doc-{seed}-{i}" for i in range(rows)],
                     "key": pa.array([rng.bytes(16) for _ in range(rows)], pa.binary()),
                     "emb_12_mean": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)})


def main(argv: list[str] | None = None) -> int:
    import fsspec
    import pyarrow.parquet as pq

    from pipeline.bench.measure import git_commit, machine_info, median
    from pipeline.parts import file_crc32, parquet_options, read_part, write_part

    p = argparse.ArgumentParser(prog="python studies/checksums.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", type=int, default=8)
    p.add_argument("--rows", type=int, default=5000, help="rows per part")
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench-checksums")
    args = p.parse_args(argv)

    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    fs = fsspec.filesystem("file")
    tables = [part_table(args.rows, args.dim, i) for i in range(args.parts)]
    paths = [str(out / "parts" / f"part-{i}.parquet") for i in range(args.parts)]
    times: dict[str, list[float]] = {"write_with_crc": [], "write_without_crc": [], "read": [], "crc": []}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every mode alike
        t = time.perf_counter()
        for table, path in zip(tables, paths):
            write_part(fs, path, table)
        times["write_with_crc"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for table, path in zip(tables, paths):
            pq.write_table(table, path, **parquet_options(table.schema))
        times["write_without_crc"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for path in paths:
            read_part(fs, path)
        times["read"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for path in paths:
            file_crc32(fs, path)
        times["crc"].append(time.perf_counter() - t)
    mb = sum(fs.info(path)["size"] for path in paths) / 2**20
    med = {k: median(v) for k, v in times.items()}
    result = {"parts": args.parts, "rows_per_part": args.rows, "dim": args.dim, "mb": round(mb, 1),
              "repeats": args.repeats, "seconds": {k: round(v, 4) for k, v in med.items()},
              "write_overhead": round(med["write_with_crc"] / med["write_without_crc"], 3),
              "verify_vs_read": round(med["crc"] / med["read"], 3),
              "crc_mb_per_s": round(mb / med["crc"], 1) if med["crc"] else None,
              "machine": machine_info(), "commit": git_commit(__file__),
              "command": "python studies/checksums.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    md = "\n".join([
        "| parts x rows x dim | MB | write (CRC) s | write (no CRC) s | write ratio | read all s | "
        "verify all s | verify / read | verify MB/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.parts} x {args.rows:,} x {args.dim} | {mb:.1f} | {med['write_with_crc']:.3f} | "
        f"{med['write_without_crc']:.3f} | {result['write_overhead']:.2f}x | {med['read']:.3f} | {med['crc']:.3f} | "
        f"{result['verify_vs_read']:.2f}x | {result['crc_mb_per_s']} |",
        "",
        f"Medians of {args.repeats} interleaved repeats; local disk, warm page cache; `{result['command']}`, commit "
        f"{result['commit']}.",
    ]) + "\n"
    print(md)
    (out / "checksums.md").write_text(md)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

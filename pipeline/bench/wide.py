"""Wide grids and short texts (issue #18): ``strata embed`` against the bare ``Encoder``, in one run.

    python -m pipeline.bench.wide [--texts N] [--out bench-wide]

Texts: the unique sentences of STS-B test (vendored in ``pipeline/demo_data``), about 13 tokens
each. Model: SmolLM2-135M at full depth. For 1 variant (``L30.mean``) and 155 (every layer x
last, mean, wmean, mean_nosink, wmean_nosink):

- ``encoder``: ``Encoder.encode`` in-process (no I/O): the model's cost;
- ``embed``: ``strata embed`` through Ray Data on one Parquet shard, steady-state tokens/s (the
  rate after the first output, as ``EmbedSummary`` reports it), float32 and float16;
- part writing: one batch of real 155-variant embeddings written as Parquet with pyarrow's
  defaults (dictionary, snappy, statistics: how parts were written before) and with
  ``storage.parquet_options``: time and size.

Short-text batch shapes: the bare encoder at token budgets x row caps, tokens/s and executed
FLOP/s as a share of the in-run dense matmul peak (``modes.run_hardware``).

Prints each figure as it is measured and writes ``results.json`` and ``results.md``. Medians of
``--repeats`` runs, interleaved; compare ratios, not seconds, on a shared machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

STSB = Path(__file__).resolve().parents[1] / "demo_data" / "stsb" / "sts-test.csv"
WIDE_POOLINGS = "last,mean,wmean,mean_nosink,wmean_nosink"


def sentences(n: int | None) -> list[str]:
    seen: dict[str, None] = {}
    for line in STSB.read_text(encoding="utf-8").splitlines():
        f = line.split("\t")
        if len(f) >= 7:
            seen.setdefault(f[5], None)
            seen.setdefault(f[6], None)
    texts = list(seen)
    return texts[:n] if n else texts


def _encoder_rate(model: str, texts: list[str], layers: str, poolings: str, **settings) -> tuple[float, dict]:
    """The bare encoder's tokens/s, and its executed FLOPs (the padded shapes it ran)."""
    from ..batching import plan_batches
    from ..encoder import Encoder
    from ..request import resolve
    from .measure import model_info, pass_flops

    enc = Encoder.from_request(resolve(model, layers=layers, poolings=poolings, max_length=128, digest=False,
                                       **settings))
    enc.encode(texts[:64])  # warm
    t0 = time.perf_counter()
    res = enc.encode(texts)
    dt = time.perf_counter() - t0
    ids, _ = enc.tokenize(texts)
    plan = plan_batches([len(x) for x in ids], batch_tokens=enc.settings.batch_tokens,
                        max_rows=enc.settings.max_batch_rows, pad_multiple=enc.pad_multiple)
    info = model_info(enc.model, enc.blocks)
    executed = pass_flops(info["block_params"], info["hidden"], max(enc.layers),
                          [(len(b.indices), b.padded_len) for b in plan])
    return res.stats.tokens / dt, {"seconds": dt, "tokens": res.stats.tokens, "padded": res.stats.padded_tokens,
                                   "passes": res.stats.batches, "executed_flops": executed}


def _embed_rate(model: str, shard_dir: Path, out: Path, layers: str, poolings: str, dtype: str) -> dict:
    from ..request import resolve
    from ..runner import embed

    request = resolve(model, layers=layers, poolings=poolings, max_length=128, dtype=dtype)
    s = embed(request, str(shard_dir), str(out), progress=False)
    size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
    return {"steady_tok_s": s.steady_tokens_per_second, "tok_s": s.tokens_per_second, "seconds": s.seconds,
            "bytes": size}


def _write_formats(model: str, texts: list[str]) -> dict:
    from ..encoder import Encoder
    from ..request import resolve
    from ..storage import parquet_options

    enc = Encoder.from_request(resolve(model, layers="all", poolings=WIDE_POOLINGS, max_length=128, digest=False))
    res = enc.encode(texts[:256])
    cols = {"id": pa.array([f"r{i}" for i in range(len(texts[:256]))])}
    for v, arr in res.items():
        cols[v.column] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
    t32 = pa.table(cols)
    t16 = pa.table({k: (c if k == "id" else pa.FixedSizeListArray.from_arrays(
        pa.array(np.asarray(c.values).astype(np.float16)), c.type.list_size)) for k, c in cols.items()})
    raw = {"float32": sum(t32.column(c).nbytes for c in t32.column_names[1:]),
           "float16": sum(t16.column(c).nbytes for c in t16.column_names[1:])}
    out = {}
    for dtype, t in (("float32", t32), ("float16", t16)):
        times = {"pyarrow default (before)": [], "parquet_options (now)": []}
        sizes = {}
        for _ in range(5):
            for name, kw in (("pyarrow default (before)", {}), ("parquet_options (now)", parquet_options(t.schema))):
                b = io.BytesIO()
                t0 = time.perf_counter()
                pq.write_table(t, b, **kw)
                times[name].append(time.perf_counter() - t0)
                sizes[name] = b.tell()
        out[dtype] = {name: {"seconds": statistics.median(v), "MB_per_s": raw[dtype] / statistics.median(v) / 1e6,
                             "size_of_raw": sizes[name] / raw[dtype]} for name, v in times.items()}
        out[dtype]["raw_bytes"] = raw[dtype]
        out[dtype]["rows"] = t.num_rows
        out[dtype]["variants"] = len(res)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--texts", type=int, default=None, help="first N unique sentences (default: all 2,552)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="bench-wide")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: encoder,embed,write,shapes")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = sentences(args.texts)
    results: dict = {"texts": len(texts), "model": args.model, "cpus": os.cpu_count()}
    from .measure import machine_info

    results["machine"] = machine_info()
    print(f"{len(texts)} unique STS-B test sentences, {args.model}")
    grids = {"1 variant": ("-1", "mean"), "155 variants": ("all", WIDE_POOLINGS)}
    rows = []
    if "write" not in skip:
        results["write"] = _write_formats(args.model, texts)
        for dtype, r in results["write"].items():
            for name in ("pyarrow default (before)", "parquet_options (now)"):
                print(f"write {dtype} {name}: {r[name]['MB_per_s']:.0f} MB/s, {r[name]['size_of_raw']:.3f} of raw")
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "in"
        shard.mkdir()
        pq.write_table(pa.table({"text": texts}), shard / "sts.parquet")
        for rep in range(args.repeats):
            for grid, (layers, poolings) in grids.items():
                if "encoder" not in skip:
                    rate, info = _encoder_rate(args.model, texts, layers, poolings)
                    rows.append({"run": "Encoder.encode", "grid": grid, "dtype": "float32", "tok_s": rate, **info})
                    print(f"[{rep}] encoder {grid}: {rate:,.0f} tok/s")
                if "embed" not in skip:
                    for dtype in ("float32", "float16") if grid == "155 variants" else ("float32",):
                        r = _embed_rate(args.model, shard, Path(tmp) / f"out-{rep}-{grid[:3]}-{dtype}", layers,
                                        poolings, dtype)
                        rows.append({"run": "strata embed", "grid": grid, "dtype": dtype, **r})
                        print(f"[{rep}] embed {grid} {dtype}: steady {r['steady_tok_s']:,.0f} tok/s, "
                              f"{r['bytes'] / 1e6:.1f} MB")
    results["runs"] = rows
    if "shapes" not in skip:
        from .modes import run_hardware

        peak = run_hardware({"device": "cpu"})["peak_flops_per_second"]
        results["matmul_peak_flops"] = peak
        shapes = []
        for budget in (4096, 8192, 16384):
            for cap in (256, 1024):
                rate, info = _encoder_rate(args.model, texts, "-1", "mean", batch_tokens=budget, max_batch_rows=cap)
                share = info["executed_flops"] / info["seconds"] / peak
                shapes.append({"batch_tokens": budget, "max_batch_rows": cap, "tok_s": rate, "share_of_peak": share,
                               **info})
                print(f"shape {budget} tokens x {cap} rows: {rate:,.0f} tok/s, {share:.1%} of matmul peak")
        results["shapes"] = shapes
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``strata bench --embed-vs-encoder``: what ``strata embed`` costs beyond the model, in one run.

Two text sets, both from the demo data vendored in the package (no ``../shared`` needed):

- ``short``: the unique sentences of STS-B test, about 13 tokens each (titles, queries, chat
  turns: many rows per token), max length 128;
- ``mixed``: the benchmark's CPU sample (64 SciFact abstracts + 192 STS-B sentences, shuffled,
  ``sample.sample_texts``) repeated ``MIXED_COPIES`` times, max length 512. It is embedded in
  work units of 256 rows so every block holds the sample's mix (a unit is sorted longest
  first; one larger unit would put every abstract in the first block).

Two grids at full depth: 1 variant (the last layer, ``mean``) and 155 (every layer x ``last,
mean, wmean, mean_nosink, wmean_nosink``).

For each text set and grid, ``--repeats`` runs of ``embed``, each between two runs of
``encoder`` (encoder, embed, encoder, embed, ..., encoder):

- ``encoder``: ``Encoder.encode`` in-process (on the device ``--device`` picks) after a warm-up
  call: the model's cost, with its executed FLOP/s (the padded shapes it ran) as a share of the
  dense matmul peak measured at the start of the run (``modes.run_hardware``);
- ``embed``: ``runner.embed`` (what ``strata embed`` runs) through Ray Data on one Parquet
  shard, float32 output: its steady-state tokens/s (the rate after the first output, as
  ``EmbedSummary`` reports it). Ray is started for each run and shut down after it, so the
  encoder runs share the machine with nothing.

Each embed run is set against the mean of the encoder runs just before and just after it, so a
machine whose speed drifts over minutes (shared, noisy) moves both sides of the ratio alike; the
summary is the median of these bracketed ratios.

Also: one batch of real 155-variant embeddings written as Parquet with pyarrow's defaults (how
parts were written before issue #18) and with ``parts.parquet_options``: MB/s and size.
With ``--batch-tokens B1,B2,..``: the encoder on the short texts at those budgets x row caps
256 and 1024, with the share of the matmul peak (the batch-shape choice).

Writes JSON (``--out``, default ``bench-embed-vs-encoder.json``) and Markdown (``--markdown``,
default the same path with ``.md``). Compare ratios of medians, not seconds, on a shared machine.
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..demo import DEMO_DATA
from .measure import machine_info, now_utc, versions

WIDE_POOLINGS = "last,mean,wmean,mean_nosink,wmean_nosink"
GRIDS = {"1 variant": ("-1", "mean"), "155 variants": ("all", WIDE_POOLINGS)}
MIXED_COPIES = 3
MIXED_UNIT_ROWS = 256
ROW_CAPS = (256, 1024)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def short_texts(n: int | None = None) -> list[str]:
    """The unique sentences of the vendored STS-B test split, in file order (sentence 1, then 2, of each pair)."""
    from ..evaldata import load_sts

    sts = load_sts(DEMO_DATA / "stsb" / "sts-test.csv")
    texts = list(dict.fromkeys(s for pair in zip(sts.sentence1, sts.sentence2) for s in pair))
    return texts[:n] if n else texts


def text_sets(quick: bool = False) -> dict[str, dict]:
    """The two text sets with the settings each is embedded with."""
    from .options import SAMPLE_SIZES
    from .sample import sample_texts

    docs, sentences = SAMPLE_SIZES["quick" if quick else "cpu"]
    mixed, _ = sample_texts(DEMO_DATA, docs, sentences)
    return {"short": {"texts": short_texts(64 if quick else None), "max_length": 128, "unit_rows": None},
            "mixed": {"texts": mixed * MIXED_COPIES, "max_length": 512, "unit_rows": MIXED_UNIT_ROWS}}


def encoder_run(model: str, texts: list[str], layers: str, poolings: str, max_length: int, device: str = "auto",
                **settings) -> dict:
    """The bare encoder's tokens/s on ``texts`` after a warm-up call, and its executed FLOPs."""
    from ..batching import plan_batches
    from ..encoder import Encoder
    from ..request import resolve
    from .measure import model_info, pass_flops

    enc = Encoder.from_request(resolve(model, layers=layers, poolings=poolings, max_length=max_length, digest=False,
                                       **settings), device=device)
    enc.encode(texts[:64])
    t0 = time.perf_counter()
    res = enc.encode(texts)
    seconds = time.perf_counter() - t0
    ids, _ = enc.tokenize(texts)
    plan = plan_batches([len(x) for x in ids], batch_tokens=enc.settings.batch_tokens,
                        max_rows=enc.settings.max_batch_rows, pad_multiple=enc.pad_multiple)
    info = model_info(enc.model, enc.blocks)
    executed = pass_flops(info["block_params"], info["hidden"], max(enc.layers),
                          [(len(b.indices), b.padded_len) for b in plan])
    return {"tok_s": res.stats.tokens / seconds, "seconds": seconds, "tokens": res.stats.tokens,
            "passes": res.stats.batches, "executed_flops": executed, "variants": len(res),
            "padding_efficiency": res.stats.padding_efficiency}


def embed_run(model: str, shard_dir: Path, out: Path, layers: str, poolings: str, max_length: int,
              unit_rows: int | None) -> dict:
    """``runner.embed`` on ``shard_dir``, Ray started for this run and shut down after it."""
    import ray

    from ..request import resolve
    from ..runner import UNIT_ROWS, embed

    request = resolve(model, layers=layers, poolings=poolings, max_length=max_length)
    try:
        s = embed(request, str(shard_dir), str(out), progress=False, unit_rows=unit_rows or UNIT_ROWS)
    finally:
        ray.shutdown()
    return {"tok_s": s.steady_tokens_per_second, "overall_tok_s": s.tokens_per_second, "seconds": s.seconds,
            "tokens": s.tokens, "rows": s.rows, "padding_efficiency": s.padding_efficiency,
            "bytes": sum(p.stat().st_size for p in out.rglob("*.parquet"))}


def write_formats(model: str, texts: list[str]) -> dict:
    """One batch of real 155-variant vectors written with pyarrow's defaults and with ``parquet_options``."""
    from ..encoder import Encoder
    from ..request import resolve
    from ..parts import parquet_options

    enc = Encoder.from_request(resolve(model, layers="all", poolings=WIDE_POOLINGS, max_length=128, digest=False))
    res = enc.encode(texts[:256])
    cols = {"id": pa.array([f"r{i}" for i in range(len(texts[:256]))])}
    for v, arr in res.items():
        cols[v.column] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
    tables = {"float32": pa.table(cols)}
    tables["float16"] = pa.table({k: (c if k == "id" else pa.FixedSizeListArray.from_arrays(
        pa.array(np.asarray(c.values).astype(np.float16)), c.type.list_size)) for k, c in cols.items()})
    out = {}
    for dtype, t in tables.items():
        raw = sum(t.column(c).nbytes for c in t.column_names[1:])
        times: dict[str, list[float]] = {"pyarrow defaults (before)": [], "parquet_options (now)": []}
        sizes = {}
        for _ in range(5):
            for name, kw in (("pyarrow defaults (before)", {}), ("parquet_options (now)", parquet_options(t.schema))):
                b = io.BytesIO()
                t0 = time.perf_counter()
                pq.write_table(t, b, **kw)
                times[name].append(time.perf_counter() - t0)
                sizes[name] = b.tell()
        out[dtype] = {name: {"MB_per_s": raw / statistics.median(v) / 1e6, "size_of_raw": sizes[name] / raw}
                      for name, v in times.items()}
        out[dtype].update(raw_bytes=raw, rows=t.num_rows, variants=len(res))
    return out


def summarise(runs: list[dict], peak: float | None) -> list[dict]:
    """Per text set and grid: median encoder and embed tokens/s, and the median of the bracketed ratios
    (each embed run over the mean of the encoder runs just before and after it; ``runs`` in run order)."""
    rows = []
    for text_set in dict.fromkeys(r["texts"] for r in runs):
        for grid in dict.fromkeys(r["grid"] for r in runs if r["texts"] == text_set):
            pick = [r for r in runs if r["texts"] == text_set and r["grid"] == grid]
            enc = [r for r in pick if r["run"] == "encoder"]
            ratios = []
            for i, r in enumerate(pick):
                around = [pick[j]["tok_s"] for j in (i - 1, i + 1) if 0 <= j < len(pick) and pick[j]["run"] == "encoder"]
                if r["run"] == "embed" and r["tok_s"] and around:
                    ratios.append(r["tok_s"] / statistics.mean(around))
            emb = [r for r in pick if r["run"] == "embed" and r["tok_s"]]
            row = {"texts": text_set, "grid": grid, "repeats": sum(r["run"] == "embed" for r in pick),
                   "encoder_tok_s": statistics.median(r["tok_s"] for r in enc) if enc else None,
                   "embed_tok_s": statistics.median(r["tok_s"] for r in emb) if emb else None,
                   "embed_bytes": emb[0]["bytes"] if emb else None,
                   "ratios": ratios, "ratio": statistics.median(ratios) if ratios else None}
            if enc and peak:
                row["encoder_share_of_peak"] = statistics.median(r["executed_flops"] / r["seconds"] for r in enc) / peak
            rows.append(row)
    return rows


def to_markdown(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    lines = ["# `strata bench --embed-vs-encoder`", "",
             f"- date: {report['date']}; machine: {m.get('cpu')}, {m.get('usable_cpus', m.get('logical_cpus'))} usable "
             f"CPU cores; torch {v.get('torch')}, ray {v.get('ray')}, commit {v.get('git_commit') or '-'}",
             f"- model {report['model']}, full depth; {report['repeats']} embed runs per case, each between two encoder "
             f"runs; ratio: median of embed / mean of the encoder runs around it; "
             f"dense matmul peak {report['peak_flops_per_second'] / 1e9:.1f} GFLOP/s" if report.get(
                 "peak_flops_per_second") else f"- model {report['model']}; repeats {report['repeats']}"]
    for name, ts in report["text_sets"].items():
        lines.append(f"- `{name}`: {ts['rows']:,} rows, {ts['tokens']:,} tokens (about {ts['tokens'] / ts['rows']:.0f} "
                     f"per row), max length {ts['max_length']}")
    lines += ["", "| texts | grid | bare `Encoder` tok/s | `strata embed` steady tok/s | embed / Encoder (x) | per run | "
              "Encoder executed FLOP/s, share of peak | output |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for r in report["summary"]:
        size = "-" if r["embed_bytes"] is None else f"{r['embed_bytes'] / 1e6:,.1f} MB"
        lines.append(f"| {r['texts']} | {r['grid']} | {_fmt(r['encoder_tok_s'], ',.0f')} | "
                     f"{_fmt(r['embed_tok_s'], ',.0f')} | {_fmt(r['ratio'], '.3f')} | "
                     f"{', '.join(format(x, '.3f') for x in r.get('ratios', ())) or '-'} | "
                     f"{_fmt(r.get('encoder_share_of_peak'), '.1%')} | {size} |")
    if report.get("write"):
        lines += ["", "Writing one batch of real 155-variant vectors:", "",
                  "| dtype | rows | raw MB | pyarrow defaults (before): MB/s, size of raw | parquet_options (now) |",
                  "|---|---:|---:|---:|---:|"]
        for dtype, w in report["write"].items():
            b, n = w["pyarrow defaults (before)"], w["parquet_options (now)"]
            lines.append(f"| {dtype} | {w['rows']} | {w['raw_bytes'] / 1e6:.1f} | {b['MB_per_s']:.0f}, "
                         f"{b['size_of_raw']:.2f}x | {n['MB_per_s']:.0f}, {n['size_of_raw']:.2f}x |")
    if report.get("shapes"):
        lines += ["", "Encoder batch shapes on the short texts (1 variant):", "",
                  "| batch tokens | row cap | passes | tok/s | executed FLOP/s, share of peak |",
                  "|---:|---:|---:|---:|---:|"]
        for s in report["shapes"]:
            lines.append(f"| {s['batch_tokens']:,} | {s['max_batch_rows']:,} | {s['passes']} | {s['tok_s']:,.0f} | "
                         f"{_fmt(s['share_of_peak'], '.1%')} |")
    return "\n".join(lines) + "\n"


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def run(args) -> int:
    """The study, from ``strata bench``'s parsed ``args`` (``--model --repeats --quick --batch-tokens --out
    --markdown --no-hardware``)."""
    from .options import batch_tokens_sweep

    t_start = time.perf_counter()
    model, repeats = args.model, args.repeats or (1 if args.quick else 3)
    out_path = Path(args.out or "bench-embed-vs-encoder.json")
    md_path = Path(args.markdown) if args.markdown else out_path.with_suffix(".md")
    sets = text_sets(args.quick)
    grids = {"1 variant": GRIDS["1 variant"]} if args.quick else GRIDS
    report: dict = {"schema": "strata-bench-embed-vs-encoder/1", "date": now_utc(), "machine": machine_info(),
                    "versions": versions(), "model": model, "repeats": repeats, "text_sets": {}, "runs": []}
    if not args.no_hardware:
        from .modes import run_hardware

        report["peak_flops_per_second"] = run_hardware({"device": args.device})["peak_flops_per_second"]
        log(f"dense matmul peak {report['peak_flops_per_second'] / 1e9:.1f} GFLOP/s")
    if not args.quick:
        report["write"] = write_formats(model, sets["short"]["texts"])
        for dtype, w in report["write"].items():
            log(f"write {dtype}: before {w['pyarrow defaults (before)']['MB_per_s']:.0f} MB/s, "
                f"now {w['parquet_options (now)']['MB_per_s']:.0f} MB/s")
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        for name, ts in sets.items():
            (Path(tmp) / name).mkdir()
            pq.write_table(pa.table({"text": ts["texts"]}), Path(tmp) / name / "texts.parquet")

        def encoder(name: str, ts: dict, grid: str, rep: int) -> dict:
            e = encoder_run(model, ts["texts"], *grids[grid], ts["max_length"], args.device)
            report["runs"].append({"run": "encoder", "texts": name, "grid": grid, "repeat": rep, **e})
            report["text_sets"][name] = {"rows": len(ts["texts"]), "tokens": e["tokens"],
                                         "max_length": ts["max_length"], "unit_rows": ts["unit_rows"]}
            return e

        for name, ts in sets.items():
            for grid, (layers, poolings) in grids.items():
                before = encoder(name, ts, grid, 0)
                for rep in range(repeats):
                    r = embed_run(model, Path(tmp) / name, Path(tmp) / f"out-{rep}-{name}-{grid[:3]}", layers,
                                  poolings, ts["max_length"], ts["unit_rows"])
                    if r["tokens"] != before["tokens"] or r["rows"] != len(ts["texts"]):
                        raise RuntimeError(f"{name}, {grid}: embed saw {r['rows']} rows and {r['tokens']} tokens, "
                                           f"the encoder {len(ts['texts'])} and {before['tokens']}")
                    report["runs"].append({"run": "embed", "texts": name, "grid": grid, "repeat": rep, **r})
                    after = encoder(name, ts, grid, rep + 1)
                    around = (before["tok_s"] + after["tok_s"]) / 2
                    steady = (f"{r['tok_s']:,.0f} tok/s ({r['tok_s'] / around:.3f}x)" if r["tok_s"]
                              else "- (too few outputs for a steady state)")
                    log(f"[{rep + 1}/{repeats}] {name}, {grid}: encoder {before['tok_s']:,.0f} and "
                        f"{after['tok_s']:,.0f} tok/s around embed steady {steady}")
                    before = after
    report["summary"] = summarise(report["runs"], report.get("peak_flops_per_second"))
    budgets = batch_tokens_sweep(args.batch_tokens, True)
    if budgets:
        peak = report.get("peak_flops_per_second")
        report["shapes"] = []
        for budget in budgets:
            for cap in ROW_CAPS:
                e = encoder_run(model, sets["short"]["texts"], "-1", "mean", 128, args.device, batch_tokens=budget,
                                max_batch_rows=cap)
                share = e["executed_flops"] / e["seconds"] / peak if peak else None
                report["shapes"].append({"batch_tokens": budget, "max_batch_rows": cap, "share_of_peak": share, **e})
                log(f"shape {budget} tokens x {cap} rows: {e['tok_s']:,.0f} tok/s")
    report["total_seconds"] = time.perf_counter() - t_start
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    md = to_markdown(report)
    md_path.write_text(md)
    print(md)
    log(f"wrote {out_path} and {md_path} in {report['total_seconds']:.0f} s")
    return 0

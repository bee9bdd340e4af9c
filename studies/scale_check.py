"""``python studies/scale_check.py``: recompute every table number of ``docs/scale.md``.

Each number in the doc's checked tables is recomputed here from its inputs: measured CPU figures
(constants below, each naming its source in BENCHMARKS.md), the index-build measurement
(``docs/scale_measured.json``, written by ``python studies/index_memory.py`` and copied),
``pipeline.sizing``'s storage formula, and assumptions named as such (the GPU rate: no GPU was
measured). A table row of the doc whose first cell is one of the rows computed here must equal it
cell for cell; a computed row missing from the doc is an error too; so is an input the doc's text
states differently, or a BENCHMARKS.md line the constants come from that changed. Exit 1 naming each
line that differs; ``--print`` prints the computed tables (to paste into the doc).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: this checkout's pipeline, not another installed one
    sys.path.insert(0, str(ROOT))

from pipeline import probe, sizing  # noqa: E402

DOC = ROOT / "docs" / "scale.md"
MEASURED = ROOT / "docs" / "scale_measured.json"

# ---- inputs (measured here, with their source) ----------------------------------------------------
DOCS = 10**9
# BENCHMARKS.md, "SciFact abstracts": 400 abstracts, 127,433 tokens, p10/p50/p90 = 192/301/512, max length 512
SAMPLE_TEXTS, SAMPLE_TOKENS = 400, 127_433
# BENCHMARKS.md, same run: strata-encoder, SmolLM2-135M float32 on 2 CPU cores, truncated grid (deepest layer 18
# of 30), 982 tokens/s, 139.8 G useful FLOP/s
CPU_TOKENS_S, CPU_USEFUL_FLOPS = 982, 139.8e9
DEPTH_FRACTION = 18 / 30  # the measured grid's deepest layer: the same fraction is assumed for every model
GRID_VARIANTS = 24  # the measured grid: 6 layers x 4 poolings
# ---- assumptions (NOT measured) --------------------------------------------------------------------
GPU_PEAK_FLOPS = 989e12  # H100 SXM bf16 dense peak (vendor figure)
GPU_EFFICIENCY = 0.30  # assumed share of that peak doing useful work; not measured (no GPU was lent)
NODE_CPUS = 16  # index-build node size assumed for the memory-per-node row
PART_ROWS = 1_000_000  # part size assumed at scale (an embed part of 1M rows)
CHUNK_ROWS = 65_536  # the Ray index build's default chunk (index/ray/driver.py)
PROBE_QUERIES = 500  # probe.DEFAULT_ITEMS, checked below

# architectures (config.json of each model): hidden, layers, intermediate, heads, kv heads, vocab
MODELS = {
    "SmolLM2-135M": (576, 30, 1536, 9, 3, 49152),
    "SmolLM2-360M": (960, 32, 2560, 15, 5, 49152),
    "SmolLM2-1.7B": (2048, 24, 8192, 32, 32, 49152),
}


def block_params(hidden, layers, inter, heads, kv, vocab) -> int:
    """Parameters of the transformer blocks (no embeddings, no norms): what a token's FLOPs scale with."""
    head = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv * head
    return layers * (attn + 3 * hidden * inter)


def fmt_int(x: float) -> str:
    return f"{round(x):,}"


def fmt_tb(b: float) -> str:
    return f"{b / 1e12:,.2f} TB"


def tables(measured: dict) -> dict[str, list[str]]:
    """{first cell: the row's cells} for every checked row."""
    assert probe.DEFAULT_ITEMS == PROBE_QUERIES, "probe.DEFAULT_ITEMS changed: update PROBE_QUERIES"
    rows: dict[str, list[str]] = {}
    tokens = DOCS * SAMPLE_TOKENS / SAMPLE_TEXTS
    rows["corpus tokens"] = ["corpus tokens", f"{tokens / 1e9:,.1f} G",
                             f"{SAMPLE_TOKENS / SAMPLE_TEXTS:.1f} per document"]
    base = block_params(*MODELS["SmolLM2-135M"])
    flop_per_token = CPU_USEFUL_FLOPS / CPU_TOKENS_S  # measured, SmolLM2-135M to 60% depth
    for name, arch in MODELS.items():
        ratio = block_params(*arch) / base
        cpu_tps = CPU_TOKENS_S / ratio
        cpu_h = tokens / cpu_tps / 3600
        gpu_h = tokens * flop_per_token * ratio / (GPU_PEAK_FLOPS * GPU_EFFICIENCY) / 3600
        rows[name] = [name, f"{block_params(*arch) / 1e6:,.0f} M", f"{ratio:.2f}", fmt_int(cpu_tps), fmt_int(cpu_h),
                      fmt_int(gpu_h) + " (not measured)"]
    for name, arch in MODELS.items():
        dim = arch[0]
        per = [fmt_tb(DOCS * sizing.vector_bytes(dim, d)) for d in ("float32", "float16", "int8", "binary")]
        rows[f"{dim} dims ({name})"] = [f"{dim} dims ({name})", *per,
                                         fmt_tb(GRID_VARIANTS * DOCS * sizing.vector_bytes(dim, "float32"))]
    rows["ids"] = ["ids", fmt_tb(DOCS * sizing.ID_BYTES), f"{sizing.ID_BYTES} bytes each (sizing.ID_BYTES), once "
                   f"for all variants"]

    r1, r4 = measured["rows"][0], measured["rows"][-1]
    us = r4["encode_us_per_row"]
    cfg = f"dim {measured['meta']['dim']}, nlist {measured['meta']['options']['nlist']}, 1 thread"
    rows["encode time per row"] = ["encode time per row", f"{r1['encode_us_per_row']:.1f} / {us:.1f} µs", cfg,
                                   f"{DOCS * us / 1e6 / 3600:,.1f} CPU-hours"]
    enc = r4["encode_mb_max"]
    rows["encode task, peak MB"] = ["encode task, peak MB", f"{r1['encode_mb_max']:.0f} / {enc:.0f}",
                                    f"parts of {r4['part_rows']:,} rows both times", "set by the part size"]
    for name, arch in MODELS.items():
        dim = arch[0]
        m = max(1, dim // 4)
        task = enc + (PART_ROWS * (m + 8) + CHUNK_ROWS * dim * 4) / 2**20
        rows[f"encode task at {dim} dims"] = [f"encode task at {dim} dims", f"{task:,.0f} MB",
                                             f"{NODE_CPUS * task / 1024:,.1f} GiB"]
    rows["merge (driver), RSS MB"] = ["merge (driver), RSS MB", f"{r1['merge_mb']:.0f} / {r4['merge_mb']:.0f}",
                                      "the driver's whole peak during the merge", "-"]
    rows["merge (driver), above its start MB"] = [
        "merge (driver), above its start MB",
        f"{r1['merge_above_start_mb']:.1f} / {r4['merge_above_start_mb']:.1f}",
        "pages of the .ivfdata written through a memory map (file-backed: the OS can drop them)", "-"]
    rows["merge (driver), Python heap MB"] = [
        "merge (driver), Python heap MB", f"{r1['merge_py_heap_mb']:.2f} / {r4['merge_py_heap_mb']:.2f}",
        "tracemalloc peak: the ids, streamed one part at a time", "set by the part size"]
    probe_texts = probe.DEFAULT_DOCS + PROBE_QUERIES
    probe_tokens = len(probe.TEMPLATES) * probe_texts * SAMPLE_TOKENS / SAMPLE_TEXTS
    rows["probe"] = ["probe", f"{len(probe.TEMPLATES)} x {probe_texts:,} texts", f"{probe_tokens / 1e6:.1f} M",
                     f"{probe_tokens / CPU_TOKENS_S / 60:.0f} min", f"{probe_tokens / tokens:.1e}"]
    return rows


def prose(measured: dict) -> list[str]:
    """Inputs the doc's text states, as it must state them (whitespace-normalised)."""
    o = measured["meta"]["options"]
    return [f"SmolLM2-135M's {CPU_TOKENS_S} tokens/s on 2 cores", f"{GPU_EFFICIENCY:.0%} of an H100's bf16 dense peak "
            f"({GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s)", f"to {DEPTH_FRACTION:.0%} of depth",
            f"(dim {measured['meta']['dim']}, nlist {o['nlist']}, m {o['m']})",
            f"of {PART_ROWS / 1e6:.0f}M rows; per node, {NODE_CPUS} tasks at once",
            f"{len(probe.TEMPLATES)} templates × ({probe.DEFAULT_DOCS:,} documents + {PROBE_QUERIES} queries)"]


def sources() -> list[str]:
    """The lines of BENCHMARKS.md the measured constants come from (so they cannot drift either)."""
    return [f"{SAMPLE_TEXTS} texts, {SAMPLE_TOKENS} tokens; length p0/p10/p50/p90/p100 = 85/192/301/512/512",
            f"| strata-encoder | 1 | 129.71 | {CPU_TOKENS_S} | 3.08 | 0.94 | 1678 | 2.2 | 148.7 G | "
            f"{CPU_USEFUL_FLOPS / 1e9:.1f} G |"]


def doc_rows(text: str) -> dict[str, tuple[int, list[str]]]:
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("|") and not set(s) <= set("|-: "):
            cells = [c.strip().replace("**", "") for c in s.strip("|").split("|")]
            out.setdefault(cells[0], (n, cells))
    return out


def check(doc: Path = DOC, measured: Path = MEASURED) -> list[str]:
    measured_data = json.loads(measured.read_text())
    want = tables(measured_data)
    have = doc_rows(doc.read_text())
    errors = []
    flat = " ".join(doc.read_text().split())
    errors += [f"{doc.name}: the text should say '{c}' (the input the tables use)" for c in prose(measured_data)
               if c not in flat]
    bench = (ROOT / "BENCHMARKS.md").read_text()
    errors += [f"BENCHMARKS.md no longer has '{c}', where scale_check's constants come from" for c in sources()
               if c not in bench]
    for key, cells in want.items():
        if key not in have:
            errors.append(f"{doc.name}: no table row '{key}' (computed: | {' | '.join(cells)} |)")
            continue
        n, got = have[key]
        if got[:len(cells)] != cells:
            errors.append(f"{doc.name}:{n}: | {' | '.join(got)} | differs from the computed | {' | '.join(cells)} |")
    return errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python studies/scale_check.py", description=__doc__.split("\n")[0])
    ap.add_argument("--print", action="store_true", help="print the computed rows")
    ap.add_argument("--doc", default=str(DOC))
    ap.add_argument("--measured", default=str(MEASURED))
    args = ap.parse_args(argv)
    if args.print:
        for cells in tables(json.loads(Path(args.measured).read_text())).values():
            print("| " + " | ".join(cells) + " |")
        return 0
    errors = check(Path(args.doc), Path(args.measured))
    for e in errors:
        print(e, file=sys.stderr)
    if not errors:
        print(f"{Path(args.doc).name}: every checked number agrees with its inputs")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())

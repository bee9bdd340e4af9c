"""The parent process: one child per mode, then the report.

``run(args)`` resolves settings and grids, samples the texts, starts one fresh interpreter
per mode and grid (``spawn``; the child side is ``modes``), compares the modes' embeddings,
derives rates and ratios (``measure``), adds the batch-token sweep and the Ray
memory-scaling run, and writes the JSON report and its Markdown (``markdown``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .markdown import to_markdown
from .measure import (TOLERANCE, compare, finish_mode, machine_info, now_utc, ratio, ratios, useful_flops,
                      versions)
from .options import FULL_MODEL_MODES, add_arguments, model_layers, resolve_grid, settings
from ..evaldata import default_data_dir
from .sample import sample_texts

CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TQDM_DISABLE": "1"}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def spawn(spec: dict, work: Path, tag: str, timeout: float) -> dict:
    """Run one mode in a fresh interpreter; its result dict, or a 'failed' record."""
    spec = dict(spec, result_path=str(work / f"{tag}.result.json"),
                embeddings_path=str(work / f"{tag}.npz"))
    spec_path = work / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, **CHILD_ENV)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the pipeline package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.bench", "--child", str(spec_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: it and anything it started
        output, _ = proc.communicate()
        return {"status": "failed", "error": f"timed out after {timeout:.0f} s", "output_tail": output[-2000:]}
    wall = time.perf_counter() - t0
    result_path = Path(spec["result_path"])
    if proc.returncode != 0 or not result_path.exists():
        return {"status": "failed", "error": f"exit status {proc.returncode}", "output_tail": output[-4000:]}
    result = json.loads(result_path.read_text())
    result["process_seconds"] = wall
    result["load_average_before"] = load_before
    result["load_average_after"] = os.getloadavg()[0]
    if result.get("status") == "ok" and Path(spec["embeddings_path"]).exists():
        result["_embeddings_path"] = spec["embeddings_path"]
    return result


def run(args) -> int:
    """Run the benchmark described by parsed ``args``; writes JSON + Markdown, prints the table."""
    import numpy as np

    if args.embed_vs_encoder:
        from .overhead import run as run_overhead

        return run_overhead(args)
    t_start = time.perf_counter()
    st = settings(args)
    out_path = Path(args.out or ("bench-quick.json" if args.quick else "bench-results.json"))
    md_path = Path(args.markdown) if args.markdown else (
        out_path.with_suffix(".md") if (args.quick or args.out) else Path("BENCHMARKS.md"))
    texts, kinds = sample_texts(args.data or default_data_dir(), st["docs"], st["sentences"], st["seed"])
    n_layers = model_layers(st["model"])
    grids = [resolve_grid("truncated", args.layers, args.poolings, n_layers)]
    if args.layers_full and args.layers_full.lower() != "none":
        grids.append(resolve_grid("full-depth", args.layers_full, args.poolings, n_layers))
    report: dict[str, Any] = {
        "schema": "strata-bench/1", "date": now_utc(), "command": command_line(args), "machine": machine_info(),
        "versions": versions(), "settings": st, "grids": [], "notes": [],
    }
    work = Path(tempfile.mkdtemp(prefix="strata-bench-"))
    try:
        texts_path = work / "texts.json"
        texts_path.write_text(json.dumps(texts))
        base = {"model": st["model"], "device": st["device"], "max_length": st["max_length"],
                "batch_size": st["batch_size"], "texts_path": str(texts_path), "repeats": st["repeats"],
                "naive_variants": st["naive_variants"], "budget_seconds": st["mode_budget_seconds"]}
        peak = None
        if not args.no_hardware:
            log("hardware: dense matmul peak")
            hw = spawn(dict(base, mode="hardware"), work, "hardware", args.timeout)
            report["hardware"] = hw
            peak = hw.get("peak_flops_per_second")
        for gi, grid in enumerate(grids):
            modes: dict[str, dict] = {}
            for mode in st["modes"]:
                if st["quick"] and gi > 0 and mode != "strata-encoder":
                    # naive and hf run the same full-model passes whatever the grid: --quick times them once
                    why = (f"--quick: same full-model passes as grid {grids[0]['name']}; ratios use those"
                           if mode in FULL_MODEL_MODES else "--quick runs Ray on the first grid only")
                    modes[mode] = {"status": "skipped", "reason": why}
                    continue
                log(f"grid {grid['name']} ({grid['n_variants']} variants, deepest layer {grid['deepest']}): {mode}")
                spec = dict(base, mode=mode, variants=grid["variants"], work_dir=str(work / f"ray-{gi}"))
                res = spawn(spec, work, f"{gi}-{mode}", args.timeout)
                if res.get("status") == "failed":
                    log(f"  {mode} failed: {res.get('error')}\n{res.get('output_tail', '')[-1500:]}")
                elif res.get("status") == "ok":
                    log(f"  {res['seconds']:.2f} s, {res['tokens'] / res['seconds']:.0f} tokens/s, "
                        f"peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB")
                modes[mode] = res
            lengths = next((r["lengths"] for r in modes.values() if r.get("lengths")), None)
            info = next((r["model"] for r in modes.values() if r.get("model")), None)
            useful = useful_flops(info["block_params"], info["hidden"], grid["deepest"], lengths) if info else None
            ref_mode, errs = compare(modes)
            tol = TOLERANCE[st["model_dtype"]]
            for mode, res in modes.items():
                finish_mode(res, peak, useful)
                if mode in errs:
                    res["max_rel_err"] = errs[mode]
                    res["matches_reference"] = errs[mode] <= tol
                if args.save_embeddings and res.get("_embeddings_path"):
                    dest = Path(args.save_embeddings)
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(res["_embeddings_path"], dest / f"{grid['name']}-{mode}.npz")
                res.pop("_embeddings_path", None)
            if lengths:
                arr = np.asarray(lengths)
                grid["data"] = {"rows": len(lengths), "tokens": int(arr.sum()),
                                "length_percentiles": {f"p{p}": int(np.percentile(arr, p)) for p in (0, 10, 50, 90, 100)},
                                "at_max_length": int((arr >= st["max_length"]).sum())}
            for res in modes.values():
                res.pop("lengths", None)
            borrowed = {}
            if gi > 0:  # full-model modes skipped here were timed on the first grid (same texts)
                first = report["grids"][0]["modes"]
                borrowed = {m: first[m] for m in FULL_MODEL_MODES
                            if modes.get(m, {}).get("status") == "skipped" and m in first}
            grid.update(modes=modes, reference=ref_mode, tolerance=tol, useful_flops=useful,
                        ratios=ratios(modes, grid["n_variants"], borrowed),
                        ratios_borrow=sorted(m for m, r in borrowed.items() if r.get("status") == "ok"))
            report["grids"].append(grid)
        report["data"] = {"docs": st["docs"], "sentences": st["sentences"], "rows": len(texts),
                          "doc_chars_mean": _mean_len(texts, kinds, "doc"),
                          "sentence_chars_mean": _mean_len(texts, kinds, "sentence"),
                          "source": "SciFact corpus.jsonl (title + ' ' + text) and distinct STS-B sentences, "
                                    "shuffled together"}
        report["batch_tokens"] = _batch_tokens(st, base, grids[0], work, args.timeout)
        report["memory_scaling"] = _memory_scaling(st, base, grids[0], report["grids"][0]["modes"],
                                                   work, args.timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _notes(report)
    report["total_seconds"] = time.perf_counter() - t_start
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    md = to_markdown(report)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md)
    print(md)
    log(f"wrote {out_path} and {md_path} in {report['total_seconds']:.0f} s")
    failed = [(g["name"], m) for g in report["grids"] for m, r in g["modes"].items() if r.get("status") == "failed"]
    mismatched = [(g["name"], m) for g in report["grids"] for m, r in g["modes"].items()
                  if r.get("matches_reference") is False]
    if failed or mismatched:
        log(f"failed: {failed}; embeddings differing from the reference: {mismatched}")
        return 1
    return 0


def command_line(args) -> str:
    """``strata bench`` and the options of ``args`` that differ from their defaults (the report names its command)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    words = ["strata", "bench"]
    for dest, default in vars(parser.parse_args([])).items():
        value = getattr(args, dest, default)
        if value != default:
            flag = "--" + dest.replace("_", "-")
            words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def _mean_len(texts, kinds, kind) -> float | None:
    xs = [len(t) for t, k in zip(texts, kinds) if k == kind]
    return sum(xs) / len(xs) if xs else None


def _batch_tokens(st, base, grid, work, timeout) -> dict:
    """strata-encoder at each budget of the sweep, on the first grid."""
    if not st["batch_tokens_sweep"]:
        return {"status": "skipped", "reason": "no --batch-tokens sweep"}
    if "strata-encoder" not in st["modes"]:
        return {"status": "skipped", "reason": "strata-encoder not among --modes"}
    log(f"batch token budgets {st['batch_tokens_sweep']}: strata-encoder on grid {grid['name']}")
    res = spawn(dict(base, mode="batch-tokens", variants=grid["variants"], budgets=st["batch_tokens_sweep"]),
                work, "batch-tokens", timeout)
    res.pop("_embeddings_path", None)
    if res.get("status") == "ok":
        best = max(res["budgets"], key=lambda r: r["tokens_per_second"])
        res.update(grid=grid["name"], default=st["encoder_batch_tokens"], best=best["batch_tokens"])
    return res


def _memory_scaling(st, base, grid, grid_modes, work, timeout) -> dict:
    """Peak memory of the Ray path at 1x and 4x the corpus: does memory grow with the data?"""
    if "strata-ray" not in st["modes"]:
        return {"status": "skipped", "reason": "strata-ray not among --modes"}
    if not st["memory_scaling"]:
        return {"status": "skipped", "reason": "--no-memory-scaling"}
    one = grid_modes.get("strata-ray", {})
    if one.get("status") != "ok":
        return {"status": "not available", "reason": "the 1x Ray run did not succeed"}
    log("memory scaling: Ray path on 4x the corpus")
    four = spawn(dict(base, mode="strata-ray", variants=grid["variants"], scale=4, work_dir=str(work / "ray-4x")),
                 work, "ray-4x", timeout)
    four.pop("_embeddings_path", None)
    finish_mode(four, None, None)
    keys = ("rows", "tokens", "seconds", "tokens_per_second", "startup_seconds", "steady_tokens_per_second",
            "peak_rss_bytes", "peak_tree_rss_bytes", "peak_tree_pss_bytes", "status", "error")
    out = {"status": "ok" if four.get("status") == "ok" else "failed", "grid": grid["name"],
           "1x": {k: one.get(k) for k in keys if k in one}, "4x": {k: four.get(k) for k in keys if k in four}}
    if four.get("status") == "ok":
        enc = grid_modes.get("strata-encoder", {})
        out["ratios"] = {
            "driver peak RSS 4x/1x": ratio(four.get("peak_rss_bytes"), one.get("peak_rss_bytes")),
            "tree peak PSS 4x/1x": ratio(four.get("peak_tree_pss_bytes"), one.get("peak_tree_pss_bytes")),
            # the longest Ray run of the benchmark: the one where a steady state is best seen
            "ray 4x steady/encoder": ratio(four.get("steady_tokens_per_second"),
                                           enc.get("tokens_per_second") if enc.get("status") == "ok" else None),
        }
    return out


def _notes(report: dict) -> None:
    notes = report["notes"]
    for g in report["grids"]:
        nv = g["modes"].get("naive", {})
        if nv.get("extrapolated"):
            notes.append(f"{g['name']}: naive timed {nv['variants_measured']} of {nv['variants_total']} passes "
                         f"(median {nv['seconds_per_pass']:.2f} s per pass, every pass being the same full-model "
                         "computation); its total is that median x variants.")
    notes.append("Peak RSS is per mode (a fresh process each, getrusage) and includes the loaded model. For Ray "
                 "it is the driver's own; the sampled peak over all Ray processes is given as PSS (shared pages "
                 "such as the object store counted once).")
    notes.append("CPU s / s: process CPU time per second of a timed run; well below the torch thread count "
                 "means the mode was starved by other work on the machine and its timing is pessimistic.")
    notes.append("Useful FLOP/s counts the least work the grid needs (deepest requested layer, each text at its "
                 "own length): the same numerator for every mode, so it compares goodput; executed FLOP/s counts "
                 "what a mode really ran (all blocks for naive/hf, padding included).")


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.bench [options]``; ``--child SPEC`` runs one mode (what ``spawn`` starts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        from .modes import child_main

        return child_main(argv[1])
    for k, val in CHILD_ENV.items():
        os.environ.setdefault(k, val)
    from .. import bench

    parser = argparse.ArgumentParser(prog="strata bench", description=bench.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))

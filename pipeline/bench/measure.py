"""Measuring: clocks, memory, FLOP counts, the machine and its versions, and what the numbers mean.

Everything here is a plain function of numbers or of this process; nothing loads a model.
Used by the child processes (timing, RSS, FLOPs of a pass) and by the parent (comparing
the modes' embeddings, derived rates and ratios, machine description).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Sequence

# The first of these that ran is the reference the others' embeddings are compared with.
REFERENCE_ORDER = ("hf-single-pass", "naive", "strata-encoder", "strata-ray")
# Relative tolerance (per row, L2) between modes: float32 on CPU must agree to 1e-4; bf16
# on GPU differs with batch shapes at bf16 resolution.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 2e-2}


# ---------------------------------------------------------------------------- clocks and memory
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def timed(device, fn):
    """(fn(), wall seconds), with the GPU's queued work included on CUDA."""
    cuda = getattr(device, "type", str(device)) == "cuda"
    if cuda:
        import torch

        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def keep_going(spent: list[float], budget: float, wanted: int, minimum: int = 1) -> bool:
    """Repeat while wanted and affordable: the next run (as long as the median so far) fits the budget."""
    if len(spent) < minimum:
        return True
    if len(spent) >= wanted:
        return False
    return sum(spent) + median(spent) <= budget


class TreeMemory:
    """Samples this process and all its descendants (Ray's GCS, raylet, workers): peak sum of RSS and PSS."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self):
        import psutil

        me = psutil.Process()
        rss = pss = 0
        for p in [me] + me.children(recursive=True):
            try:
                mem = p.memory_full_info()
                rss += mem.rss
                pss += getattr(mem, "pss", mem.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)

    def _loop(self):
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - sampling must never break the run it measures
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------- FLOPs
def pass_flops(block_params: int, hidden: int, depth: int, shapes: Sequence[tuple[int, int]]) -> float:
    """Model FLOPs of passes that run ``depth`` blocks on batches of (rows, padded length)."""
    total = 0.0
    for rows, padded_len in shapes:
        tokens = rows * padded_len
        total += 2.0 * block_params * depth * tokens + 4.0 * depth * padded_len * hidden * tokens
    return total


def useful_flops(block_params: int, hidden: int, depth: int, lengths: Sequence[int]) -> float:
    """The least work for a grid: ``depth`` blocks over each text alone, at its own length."""
    return float(sum(2.0 * block_params * depth * n + 4.0 * depth * n * hidden * n for n in lengths))


def model_info(model, blocks) -> dict:
    """What the FLOP count needs of a loaded model: parameters per block, width, depth."""
    return {"block_params": int(sum(p.numel() for p in blocks[0].parameters())),
            "hidden": int(model.config.hidden_size), "n_layers": int(model.config.num_hidden_layers),
            "attention": getattr(model.config, "_attn_implementation", None), "dtype": str(model.dtype)}


# ---------------------------------------------------------------------------- the machine
def machine_info() -> dict:
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count()}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_bytes"] = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    info["platform"] = platform.platform()
    return info


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "ray", "tokenizers", "numpy", "strata"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["git_commit"] = git_commit()
    return out


def git_commit(script: str | Path | None = None) -> str | None:
    """This checkout's commit (short), with ``+dirty`` when ``script`` differs from it: what a
    published figure names (None outside a git checkout)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=5).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = head and script is not None and git("status", "--porcelain", "--", str(Path(script).resolve()))
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def write_study(out: str | Path, name: str, result: dict, md: str) -> Path:
    """A study's figures: ``{name}.json`` (every number) and ``{name}.md`` (the table the docs quote)
    in the folder ``out``, made if missing; the Markdown is printed too. Returns the Markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = md if md.endswith("\n") else md + "\n"
    (out / f"{name}.md").write_text(md)
    print(md, end="")
    return out / f"{name}.md"


# ---------------------------------------------------------------------------- comparing modes
def compare(results: dict[str, dict]) -> tuple[str | None, dict[str, float]]:
    """Worst per-row relative L2 difference of each mode's embeddings from the reference mode's."""
    import numpy as np

    ref_mode = next((m for m in REFERENCE_ORDER if "_embeddings_path" in results.get(m, {})), None)
    if ref_mode is None:
        return None, {}
    with np.load(results[ref_mode]["_embeddings_path"]) as f:
        ref = {name: f[name].astype(np.float64) for name in f.files}  # read once, not once per mode
    errs = {}
    for mode, res in results.items():
        if "_embeddings_path" not in res:
            continue
        got = np.load(res["_embeddings_path"])
        worst, compared = 0.0, 0
        for name in got.files:
            if name not in ref:
                continue
            a, b = got[name].astype(np.float64), ref[name]
            if a.shape != b.shape:
                raise RuntimeError(f"{mode} {name}: shape {a.shape} differs from {b.shape}")
            denom = np.maximum(np.linalg.norm(b, axis=1), 1e-12)
            worst = max(worst, float((np.linalg.norm(a - b, axis=1) / denom).max()))
            compared += 1
        res["variants_compared"] = compared
        errs[mode] = worst
    return ref_mode, errs


def finish_mode(res: dict, peak_flops: float | None, useful: float | None) -> dict:
    """Derived rates: tokens/s, rows/s, padding efficiency, FLOP/s and their share of the matmul peak."""
    if res.get("status") != "ok":
        return res
    secs = res["seconds"]
    res["tokens_per_second"] = res["tokens"] / secs if secs else 0.0
    res["rows_per_second"] = res["rows"] / secs if secs else 0.0
    if res.get("padded_tokens"):
        res["padding_efficiency"] = res["tokens"] / res["padded_tokens"]
    if res.get("executed_flops"):
        res["executed_flops_per_second"] = res["executed_flops"] / secs
        if peak_flops:
            res["fraction_of_peak"] = res["executed_flops_per_second"] / peak_flops
    if useful and res.get("scale", 1) == 1:
        res["useful_flops"] = useful
        res["useful_flops_per_second"] = useful / secs
        if peak_flops:
            res["useful_fraction_of_peak"] = res["useful_flops_per_second"] / peak_flops
    return res


def ratio(a, b):
    return a / b if a and b else None


def borrowed_tps(mode: str, res: dict, n_variants: int) -> float | None:
    """tokens/s of a full-model mode measured on another grid of the same texts, for this grid's size."""
    if res.get("status") != "ok":
        return None
    if mode == "naive":  # one identical full-model pass per variant
        per_pass = res.get("seconds_per_pass") or res["seconds"] / res["passes"]
        return res["tokens"] / (per_pass * n_variants)
    return res.get("tokens_per_second")


def ratios(modes: dict, n_variants: int, borrowed: dict | None = None) -> dict:
    """The grid's throughput ratios between modes (tokens/s), borrowing full-model modes timed elsewhere."""
    tps = {m: r.get("tokens_per_second") for m, r in modes.items() if r.get("status") == "ok"}
    for mode, res in (borrowed or {}).items():
        if mode not in tps:
            tps[mode] = borrowed_tps(mode, res, n_variants)
    enc, naive, hf, ray = (tps.get(m) for m in ("strata-encoder", "naive", "hf-single-pass", "strata-ray"))
    out = {
        "encoder/naive": ratio(enc, naive),
        "encoder/(variants x naive)": ratio(enc, n_variants * naive) if naive else None,
        "encoder/hf-single-pass": ratio(enc, hf),
        "hf-single-pass/naive": ratio(hf, naive),
        "ray/encoder": ratio(ray, enc),
    }
    r, e = modes.get("strata-ray", {}), modes.get("strata-encoder", {})
    if r.get("status") == "ok" and r.get("steady_tokens_per_second") and enc:
        out["ray steady/encoder"] = r["steady_tokens_per_second"] / enc
    if r.get("status") == "ok" and e.get("status") == "ok" and e.get("load_seconds") is not None:
        # the runner's clock includes Ray start-up and the actors' model load: add the encoder's load
        out["ray/encoder, both with model load"] = ratio(r["tokens"] / r["seconds"],
                                                         e["tokens"] / (e["seconds"] + e["load_seconds"]))
    return out

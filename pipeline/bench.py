"""``strata bench``: what one forward pass for a whole layer x pooling grid buys, measured.

Four ways to embed the same texts with the same model and the same pooling code
(``pipeline.pooling.pool``), so only the pass structure differs:

- ``naive``: one full-model pass per variant (``AutoModel``, ``output_hidden_states=True``,
  fixed batches of 32 in input order, right padding by the tokenizer), pooling that variant;
- ``hf-single-pass``: the same batches, one full pass per batch, every variant pooled from
  the returned hidden states;
- ``strata-encoder``: ``pipeline.encoder.Encoder.encode`` (length-sorted token-budget
  batches, the pass truncated after the deepest requested block);
- ``strata-ray``: end to end through Ray Data with ``pipeline.runner.embed`` on Parquet
  shards.

Each mode runs in a fresh subprocess, so its peak RSS (``getrusage`` in the child) is its
own; model loading is timed apart from embedding. Every mode's embeddings are compared
with the untruncated model's (``hf-single-pass``) so the modes are known to compute the
same thing. A dense-matmul probe gives the attainable FLOP/s that the model FLOP/s of each
mode is set against.

Model FLOPs per token of a pass that runs ``L`` blocks on a batch padded to ``T`` tokens:
``2 x (parameters of L blocks) + 4 x L x T x hidden`` (attention scores and mixing, dense,
not causal-halved); the embedding lookup and LM head are not counted. "executed" FLOPs
use the padded shapes a mode really ran (and its real depth: the naive and hf modes always
run every block); "useful" FLOPs are the least work the grid needs (deepest requested
layer, each text's own length) and are the same for every mode of a grid.

Use ``--quick`` for a small sample (under 3 minutes on 2 CPU cores); the default run (64
abstracts + 192 sentences on CPU, 1024 + 3072 on CUDA; about 25 minutes on 2 CPU cores) is what
``BENCHMARKS.md`` records.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

MODES = ("naive", "hf-single-pass", "strata-encoder", "strata-ray")
REFERENCE_ORDER = ("hf-single-pass", "naive", "strata-encoder", "strata-ray")  # first that ran is the reference
NAIVE_BATCH_SIZE = 32
# Grid "truncated": deepest layer at 60% of depth (18 of SmolLM2's 30), the depth range where
# intermediate-layer embeddings are usually best. Grid "full-depth" includes the last layer,
# where truncation cannot save anything. Percentages keep the grids meaningful for any model.
DEFAULT_LAYERS = "10%,20%,30%,40%,50%,60%"  # SmolLM2-135M: 3,6,9,12,15,18
DEFAULT_LAYERS_FULL = "17%,33%,50%,67%,83%,100%"  # SmolLM2-135M: 5,10,15,20,25,30
DEFAULT_POOLINGS = "last,mean,wmean,mean_nosink"
# Relative tolerance (per row, L2) between modes: float32 on CPU must agree to 1e-4; bf16
# on GPU differs with batch shapes at bf16 resolution.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 2e-2}
BATCH_TOKENS_SWEEP = (4096, 8192, 16384, 32768)  # padded tokens per forward pass, compared on strata-encoder
SAMPLE_SIZES = {  # (SciFact documents, STS-B sentences)
    "quick": (4, 12),
    "cpu": (64, 192),
    "cuda": (1024, 3072),
}
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TQDM_DISABLE": "1"}


# ============================================================================ data
def default_data_dir() -> Path:
    env = os.environ.get("STRATA_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def load_texts(data_dir: str | Path, docs: int, sentences: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """A shuffled mix of SciFact abstracts (``title + " " + text``) and distinct STS-B sentences.

    Returns (texts, kinds) where kinds[i] is "doc" or "sentence". Input order is a fixed
    shuffle, as a real corpus would arrive: not sorted by length.
    """
    data_dir = Path(data_dir)
    corpus = data_dir / "scifact" / "corpus.jsonl"
    if not corpus.exists():
        raise FileNotFoundError(f"benchmark data not found: {corpus} (set --data or STRATA_DATA)")
    rng = random.Random(seed)
    all_docs = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            text = (d.get("title", "") + " " + d.get("text", "")).strip()
            if text:
                all_docs.append(text)
    all_sents: dict[str, None] = {}
    for split in ("sts-train.csv", "sts-dev.csv", "sts-test.csv"):
        path = data_dir / "stsb" / split
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            fields = line.split("\t")  # not CSV: sentences contain quotes
            if len(fields) >= 7:
                for s in (fields[5].strip(), fields[6].strip()):
                    if s:
                        all_sents[s] = None
    sents = list(all_sents)
    if docs > len(all_docs) or sentences > len(sents):
        raise ValueError(f"asked for {docs} documents and {sentences} sentences; the data has "
                         f"{len(all_docs)} and {len(sents)}")
    picked = [(t, "doc") for t in rng.sample(all_docs, docs)] + [(t, "sentence") for t in rng.sample(sents, sentences)]
    rng.shuffle(picked)
    return [t for t, _ in picked], [k for _, k in picked]


# ============================================================================ helpers
def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def _now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _timed(device, fn):
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


def _model_info(model, blocks) -> dict:
    return {"block_params": int(sum(p.numel() for p in blocks[0].parameters())),
            "hidden": int(model.config.hidden_size), "n_layers": int(model.config.num_hidden_layers),
            "attention": getattr(model.config, "_attn_implementation", None), "dtype": str(model.dtype)}


def _keep_going(spent: list[float], budget: float, wanted: int, minimum: int = 1) -> bool:
    """Repeat while wanted and affordable: the next run (as long as the median so far) fits the budget."""
    if len(spent) < minimum:
        return True
    if len(spent) >= wanted:
        return False
    return sum(spent) + _median(spent) <= budget


def _save_embeddings(path: str, emb: dict) -> None:
    import numpy as np

    np.savez(path, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in emb.items()})


# ============================================================================ child: modes
def _load_hf(spec: dict):
    """The plain HF model for the naive and hf-single-pass modes: same weights and dtype as Strata."""
    import torch

    from . import models
    from .encoder import find_blocks, pick_device

    device = pick_device(spec["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok, _ = models.load(spec["model"], torch_dtype=dtype)
    model.to(device).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return model, tok, device, find_blocks(model)


def _hf_pass(model, tok, device, texts: list[str], max_length: int, batch_size: int,
             layer_poolings: dict[int, list[str]], out: dict):
    """One pass over the texts in fixed batches (input order); fills ``out``; returns batch shapes."""
    import torch

    from .pooling import pool

    shapes, lengths = [], []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            enc = tok(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            ids = enc["input_ids"].to(device)
            mask = enc["attention_mask"].to(device)
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
            for layer, poolings in layer_poolings.items():
                for pooling, vec in pool(hs[layer], mask, poolings).items():
                    out[f"L{layer}.{pooling}"][start:start + len(chunk)] = vec.float().cpu().numpy()
            shapes.append((int(ids.shape[0]), int(ids.shape[1])))
            lengths.extend(int(n) for n in enc["attention_mask"].sum(dim=1).tolist())
    return shapes, lengths


def _grid_layer_poolings(variants: list[tuple[int, str]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for layer, pooling in variants:
        out.setdefault(layer, []).append(pooling)
    return out


def _run_hf_modes(spec: dict) -> dict:
    import numpy as np

    model, tok, device, blocks = _load_hf(spec)
    info = _model_info(model, blocks)
    texts = json.loads(Path(spec["texts_path"]).read_text())
    variants = [tuple(v) for v in spec["variants"]]
    n, dim = len(texts), info["hidden"]
    load_seconds = time.perf_counter() - spec["_t_start"]
    rss_loaded = _current_rss_bytes()
    scratch = {f"L{layer}.{pooling}": np.empty((2, dim), np.float32) for layer, pooling in variants}
    _hf_pass(model, tok, device, texts[:2], spec["max_length"], 2, _grid_layer_poolings(variants), scratch)  # warm-up
    emb = {f"L{layer}.{pooling}": np.empty((n, dim), np.float32) for layer, pooling in variants}
    times: list[float] = []
    cpu0 = time.process_time()
    if spec["mode"] == "hf-single-pass":  # every variant from each pass; repeated for a median
        while _keep_going(times, spec["budget_seconds"], spec["repeats"]):
            (shapes, lengths), secs = _timed(device, lambda: _hf_pass(
                model, tok, device, texts, spec["max_length"], spec["batch_size"], _grid_layer_poolings(variants), emb))
            times.append(secs)
        seconds, passes_per_run = _median(times), 1
    else:  # naive: one pass per variant, in a fixed shuffled order so a partial run spans the grid
        order = list(variants)
        random.Random(1).shuffle(order)
        wanted = len(order) if spec["naive_variants"] in (None, "all") else min(int(spec["naive_variants"]), len(order))
        for layer, pooling in order:
            if not _keep_going(times, spec["budget_seconds"], wanted):
                break
            (shapes, lengths), secs = _timed(device, lambda: _hf_pass(
                model, tok, device, texts, spec["max_length"], spec["batch_size"], {layer: [pooling]}, emb))
            times.append(secs)
        measured = len(times)
        emb = {f"L{layer}.{pooling}": emb[f"L{layer}.{pooling}"] for layer, pooling in order[:measured]}
        # every naive pass is the same full-model computation; unmeasured passes cost the median
        seconds = sum(times) if measured == len(variants) else _median(times) * len(variants)
        passes_per_run = len(variants)
    cpu_seconds = (time.process_time() - cpu0) / len(times) * (len(variants) if spec["mode"] == "naive" else 1)
    _save_embeddings(spec["embeddings_path"], emb)
    depth = info["n_layers"]  # the plain model always runs every block
    executed = pass_flops(info["block_params"], info["hidden"], depth, shapes) * passes_per_run
    padded = sum(r * t for r, t in shapes)
    tokens = sum(lengths)
    result = {
        "rows": n, "tokens": tokens, "padded_tokens": padded, "batches": len(shapes),
        "seconds": seconds, "seconds_samples": times, "passes": passes_per_run, "depth_run": depth,
        "executed_flops": executed, "model": info, "lengths": lengths, "load_seconds": load_seconds,
        "rss_after_load_bytes": rss_loaded, "cpu_seconds": cpu_seconds,
    }
    if spec["mode"] == "naive":
        result.update(variants_measured=measured, variants_total=len(variants),
                      extrapolated=measured < len(variants), seconds_per_pass=_median(times))
    return result


def _run_encoder(spec: dict) -> dict:
    from .batching import plan_batches
    from .encoder import Encoder

    layers = ",".join(str(v[0]) for v in spec["variants"])
    poolings = list(dict.fromkeys(v[1] for v in spec["variants"]))
    enc = Encoder.load(spec["model"], device=spec["device"], layers=layers, poolings=poolings,
                       max_length=spec["max_length"])
    if {(v.layer, v.pooling) for v in enc.variants} != {tuple(v) for v in spec["variants"]}:
        raise ValueError("encoder variants differ from the grid's")
    info = _model_info(enc.model, enc.blocks)
    texts = json.loads(Path(spec["texts_path"]).read_text())
    load_seconds = time.perf_counter() - spec["_t_start"]
    rss_loaded = _current_rss_bytes()
    enc.encode(texts[:2])  # warm-up
    ids, _ = enc.tokenize(texts)
    lengths = [len(x) for x in ids]
    plan = plan_batches(lengths, batch_tokens=enc.config.batch_tokens, max_rows=enc.config.max_batch_rows,
                        pad_multiple=enc.pad_multiple)
    times: list[float] = []
    res = None
    cpu0 = time.process_time()
    while _keep_going(times, spec["budget_seconds"], spec["repeats"]):
        res, secs = _timed(enc.device, lambda: enc.encode(texts))
        times.append(secs)
    cpu_seconds = (time.process_time() - cpu0) / len(times)
    _save_embeddings(spec["embeddings_path"], res.embeddings)
    shapes = [(len(b.indices), b.padded_len) for b in plan]
    depth = max(enc.layers)  # blocks actually run (the final norm, when layer N is asked, is negligible)
    if res.stats.padded_tokens != sum(r * t for r, t in shapes) or res.stats.tokens != sum(lengths):
        raise RuntimeError("the encoder's batches differ from the benchmark's plan of them")
    return {
        "rows": res.stats.rows, "tokens": res.stats.tokens, "padded_tokens": res.stats.padded_tokens,
        "batches": res.stats.batches, "seconds": _median(times), "seconds_samples": times, "passes": 1,
        "depth_run": depth, "executed_flops": pass_flops(info["block_params"], info["hidden"], depth, shapes),
        "model": info, "lengths": lengths, "load_seconds": load_seconds, "rss_after_load_bytes": rss_loaded,
        "batch_tokens": enc.config.batch_tokens, "cpu_seconds": cpu_seconds,
    }


class _TreeMemory:
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


def _read_ray_output(out_dir: Path, n: int, names: list[str], scale: int):
    """Embeddings the runner committed, as {variant: (n, dim)} in input order (the first copy when scaled)."""
    import numpy as np

    from .runner import read_embeddings
    from .variants import Variant

    columns = [Variant.parse(name).column for name in names]
    table = read_embeddings(str(out_dir), ["id"] + columns)
    ids = np.asarray([int(x) for x in table.column("id").to_pylist()])
    if len(ids) != n * scale or len(np.unique(ids)) != len(ids):
        raise RuntimeError(f"the runner wrote {len(ids)} rows ({len(np.unique(ids))} distinct ids), expected {n * scale}")
    keep = ids < n
    emb = {}
    for name, column in zip(names, columns):
        col = table.column(column).combine_chunks()
        arr = np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ids), -1)[keep]
        out = np.empty_like(arr)
        out[ids[keep]] = arr
        emb[name] = out
    return emb


def _run_batch_tokens(spec: dict) -> dict:
    """strata-encoder at several padded-token budgets per forward pass, interleaved, median of repeats."""
    import dataclasses

    import torch

    from .encoder import Encoder

    enc = Encoder.load(spec["model"], device=spec["device"], layers=",".join(str(v[0]) for v in spec["variants"]),
                       poolings=list(dict.fromkeys(v[1] for v in spec["variants"])), max_length=spec["max_length"])
    texts = json.loads(Path(spec["texts_path"]).read_text())
    ids, _ = enc.tokenize(texts)
    enc.encode_ids(ids[:2])  # warm-up
    budgets = spec["budgets"]
    times: dict[int, list[float]] = {b: [] for b in budgets}
    stats, gpu_peak = {}, {}
    for _ in range(spec["repeats"]):
        for b in budgets:  # interleaved, so drift in the machine's load touches every budget alike
            enc.config = dataclasses.replace(enc.config, batch_tokens=b)
            if enc.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(enc.device)
            res, secs = _timed(enc.device, lambda: enc.encode_ids(ids))
            times[b].append(secs)
            stats[b] = res.stats
            if enc.device.type == "cuda":
                gpu_peak[b] = torch.cuda.max_memory_allocated(enc.device)
    rows = []
    for b in budgets:
        sec = _median(times[b])
        rows.append({"batch_tokens": b, "batches": stats[b].batches, "padding_efficiency": stats[b].padding_efficiency,
                     "seconds": sec, "seconds_samples": times[b], "tokens_per_second": stats[b].tokens / sec,
                     "peak_gpu_memory_bytes": gpu_peak.get(b)})
    return {"rows": len(ids), "tokens": stats[budgets[0]].tokens, "budgets": rows}


def _run_ray(spec: dict) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .runner import embed

    texts = json.loads(Path(spec["texts_path"]).read_text())
    scale = int(spec.get("scale", 1))
    work = Path(spec["work_dir"])
    in_dir, out_dir = work / "input", work / "output"
    shutil.rmtree(work, ignore_errors=True)
    in_dir.mkdir(parents=True)
    all_texts = texts * scale
    n_shards = max(1, min(8, len(all_texts) // 64))  # several shards, as a real input would have
    per = -(-len(all_texts) // n_shards)
    for s in range(n_shards):
        lo, hi = s * per, min(len(all_texts), (s + 1) * per)
        pq.write_table(pa.table({"id": pa.array(range(lo, hi), pa.int64()), "text": all_texts[lo:hi]}),
                       in_dir / f"part-{s:03d}.parquet")
    layers = ",".join(dict.fromkeys(str(v[0]) for v in spec["variants"]))
    poolings = ",".join(dict.fromkeys(v[1] for v in spec["variants"]))
    with _TreeMemory() as mem:
        t0 = time.perf_counter()
        summary = embed(str(in_dir), str(out_dir), model=spec["model"], layers=layers, poolings=poolings,
                        text_column="text", id_column="id", max_length=spec["max_length"], dtype="float32",
                        normalize=False, force=True, progress=False)
        wall = time.perf_counter() - t0
    # The driver's peak during the run, before the check below reads every output row back.
    driver_peak = _peak_rss_bytes()
    names = [f"L{layer}.{pooling}" for layer, pooling in spec["variants"]]
    emb = _read_ray_output(out_dir, len(texts), names, scale)
    _save_embeddings(spec["embeddings_path"], emb)
    seconds = float(getattr(summary, "seconds", wall) or wall)  # the runner's own clock: start-up included
    result = {
        "rows": int(getattr(summary, "rows", len(all_texts))), "tokens": int(getattr(summary, "tokens", 0)),
        "padded_tokens": int(getattr(summary, "padded_tokens", 0)) or None,
        "seconds": seconds, "seconds_samples": [seconds], "wall_seconds": wall, "passes": 1, "scale": scale,
        "startup_seconds": getattr(summary, "startup_seconds", None),
        # 0 when everything fits in one batch (no steady state to measure)
        "steady_tokens_per_second": getattr(summary, "steady_tokens_per_second", None) or None,
        "peak_rss_bytes": driver_peak, "peak_tree_rss_bytes": mem.peak_rss, "peak_tree_pss_bytes": mem.peak_pss,
        "shards": n_shards,
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


def _run_hardware(spec: dict) -> dict:
    """Attainable dense matmul FLOP/s: fp32 on CPU; bf16, fp16 and fp32 on GPU. Median of several."""
    import torch

    from .encoder import pick_device

    device = pick_device(spec["device"])
    out: dict[str, Any] = {"device": device.type, "threads": torch.get_num_threads(), "matmul": {}}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        plan = [("bfloat16", 8192, 25), ("float16", 8192, 25), ("float32", 4096, 10)]
    else:
        plan = [("float32", spec.get("matmul_size", 2048), 7)]
    for name, size, reps in plan:
        dtype = getattr(torch, name)
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        for _ in range(2):
            torch.matmul(a, b)
        samples = []
        for _ in range(reps):
            samples.append(_timed(device, lambda: torch.matmul(a, b))[1])
        secs = _median(samples)
        out["matmul"][name] = {"size": size, "seconds": secs, "flops_per_second": 2.0 * size ** 3 / secs,
                               "samples": len(samples)}
    out["peak_dtype"] = "bfloat16" if device.type == "cuda" else "float32"  # the dtype the model runs in
    out["peak_flops_per_second"] = out["matmul"][out["peak_dtype"]]["flops_per_second"]
    return out


_CHILD_MODES = {"naive": _run_hf_modes, "hf-single-pass": _run_hf_modes, "strata-encoder": _run_encoder,
                "strata-ray": _run_ray, "hardware": _run_hardware, "batch-tokens": _run_batch_tokens}


def _child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    spec["_t_start"] = time.perf_counter()
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    result = _CHILD_MODES[spec["mode"]](spec)
    result["status"] = "ok"
    result.setdefault("peak_rss_bytes", _peak_rss_bytes())
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            result["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    except Exception:  # noqa: BLE001
        pass
    tmp = spec["result_path"] + ".tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, spec["result_path"])
    return 0


# ============================================================================ parent
def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _spawn(spec: dict, work: Path, tag: str, timeout: float) -> dict:
    """Run one mode in a fresh interpreter; its result dict, or a 'failed' record."""
    spec = dict(spec, result_path=str(work / f"{tag}.result.json"),
                embeddings_path=str(work / f"{tag}.npz"))
    spec_path = work / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, **CHILD_ENV)
    root = str(Path(__file__).resolve().parents[1])
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


def _compare(results: dict[str, dict]) -> tuple[str | None, dict[str, float]]:
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


def _finish_mode(res: dict, peak_flops: float | None, useful: float | None) -> dict:
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


def _ratio(a, b):
    return a / b if a and b else None


FULL_MODEL_MODES = ("naive", "hf-single-pass")  # they run every block whatever the grid asks


def _borrowed_tps(mode: str, res: dict, n_variants: int) -> float | None:
    """tokens/s of a full-model mode measured on another grid of the same texts, for this grid's size."""
    if res.get("status") != "ok":
        return None
    if mode == "naive":  # one identical full-model pass per variant
        per_pass = res.get("seconds_per_pass") or res["seconds"] / res["passes"]
        return res["tokens"] / (per_pass * n_variants)
    return res.get("tokens_per_second")


def _ratios(modes: dict, n_variants: int, borrowed: dict | None = None) -> dict:
    tps = {m: r.get("tokens_per_second") for m, r in modes.items() if r.get("status") == "ok"}
    for mode, res in (borrowed or {}).items():
        if mode not in tps:
            tps[mode] = _borrowed_tps(mode, res, n_variants)
    enc, naive, hf, ray = (tps.get(m) for m in ("strata-encoder", "naive", "hf-single-pass", "strata-ray"))
    out = {
        "encoder/naive": _ratio(enc, naive),
        "encoder/(variants x naive)": _ratio(enc, n_variants * naive) if naive else None,
        "encoder/hf-single-pass": _ratio(enc, hf),
        "hf-single-pass/naive": _ratio(hf, naive),
        "ray/encoder": _ratio(ray, enc),
    }
    r, e = modes.get("strata-ray", {}), modes.get("strata-encoder", {})
    if r.get("status") == "ok" and r.get("steady_tokens_per_second") and enc:
        out["ray steady/encoder"] = r["steady_tokens_per_second"] / enc
    if r.get("status") == "ok" and e.get("status") == "ok" and e.get("load_seconds") is not None:
        # the runner's clock includes Ray start-up and the actors' model load: add the encoder's load
        out["ray/encoder, both with model load"] = _ratio(r["tokens"] / r["seconds"],
                                                          e["tokens"] / (e["seconds"] + e["load_seconds"]))
    return out


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
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                           capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def _resolve_grid(name: str, layers_spec: str, poolings_spec: str, n_layers: int) -> dict:
    from .variants import make_variants

    variants = make_variants(layers_spec, poolings_spec, n_layers)
    layers = sorted({v.layer for v in variants})
    return {"name": name, "layers_spec": layers_spec, "layers": layers,
            "poolings": list(dict.fromkeys(v.pooling for v in variants)),
            "variants": [[v.layer, v.pooling] for v in variants], "n_variants": len(variants),
            "deepest": max(layers), "depth_fraction": max(layers) / n_layers}


def _model_layers(model_spec: str) -> int:
    """Block count from the model's config alone (no weights)."""
    from transformers import AutoConfig

    from . import models

    where = models.materialize(models.resolve(model_spec))
    return int(AutoConfig.from_pretrained(str(where)).num_hidden_layers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``strata bench``."""
    from .models import DEFAULT_MODEL

    parser.add_argument("--quick", action="store_true",
                        help="small sample, one repeat, short per-mode budgets (under 3 minutes on 2 CPU cores)")
    parser.add_argument("--out", default=None, help="JSON results file (default: bench-results.json, "
                        "or bench-quick.json with --quick)")
    parser.add_argument("--markdown", default=None, help="Markdown report (default: BENCHMARKS.md, or the "
                        "--out path with .md with --quick or --out)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model spec (default: %(default)s)")
    parser.add_argument("--data", default=None, help="data directory with scifact/ and stsb/ "
                        "(default: $STRATA_DATA or ../shared/data next to the repository)")
    parser.add_argument("--docs", type=int, default=None, help="SciFact documents in the sample "
                        "(default: 4 quick, 64 on CPU, 1024 on CUDA)")
    parser.add_argument("--sentences", type=int, default=None, help="STS-B sentences in the sample "
                        "(default: 12 quick, 192 on CPU, 3072 on CUDA)")
    parser.add_argument("--layers", default=DEFAULT_LAYERS,
                        help="layers of the truncated grid (default: %(default)s = 3..18 of 30)")
    parser.add_argument("--layers-full", default=DEFAULT_LAYERS_FULL,
                        help="layers of the grid that includes the last layer ('none' to skip; default: %(default)s)")
    parser.add_argument("--poolings", default=DEFAULT_POOLINGS, help="poolings of both grids (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=NAIVE_BATCH_SIZE,
                        help="fixed batch size of the naive and hf-single-pass modes (default: %(default)s)")
    parser.add_argument("--modes", default=",".join(MODES), help="modes to run (default: all)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per mode, median reported "
                        "(default: 1 quick, else 3; fewer where the mode budget would be exceeded)")
    parser.add_argument("--naive-variants", default="all",
                        help="naive passes to time: 'all' or a number; the others are costed at the median "
                        "pass (default: all, within the mode budget)")
    parser.add_argument("--mode-budget", type=float, default=None,
                        help="seconds a mode may spend on repeats / naive passes beyond the first "
                        "(default: 15 quick, 300 otherwise)")
    parser.add_argument("--batch-tokens", default=None,
                        help="padded-token budgets per forward pass to compare on strata-encoder, comma-separated, "
                        f"or 'none' (default: none quick, else {','.join(map(str, BATCH_TOKENS_SWEEP))})")
    parser.add_argument("--no-memory-scaling", action="store_true", help="skip the 4x-corpus Ray run")
    parser.add_argument("--no-hardware", action="store_true", help="skip the matmul peak probe")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before a mode's process is killed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-embeddings", default=None, help="keep every mode's embeddings (.npz) in this folder")


def _settings(args) -> dict:
    import torch

    from .encoder import DEFAULT_BATCH_TOKENS

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    size_key = "quick" if args.quick else ("cuda" if cuda else "cpu")
    docs, sentences = SAMPLE_SIZES[size_key]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}: choose from {', '.join(MODES)}")
    nv = args.naive_variants
    if nv != "all" and not (nv.isdigit() and int(nv) > 0):
        raise ValueError(f"--naive-variants {nv!r}: 'all' or a positive number")
    return {
        "quick": bool(args.quick), "device": "cuda" if cuda else "cpu",
        "model_dtype": "bfloat16" if cuda else "float32", "model": args.model,
        "docs": args.docs if args.docs is not None else docs,
        "sentences": args.sentences if args.sentences is not None else sentences,
        "max_length": args.max_length, "batch_size": args.batch_size, "modes": modes,
        "repeats": args.repeats or (1 if args.quick else 3), "naive_variants": nv,
        "mode_budget_seconds": args.mode_budget if args.mode_budget is not None else (15.0 if args.quick else 300.0),
        "memory_scaling": not args.no_memory_scaling, "seed": args.seed,
        "encoder_batch_tokens": DEFAULT_BATCH_TOKENS["cuda" if cuda else "cpu"],
        "batch_tokens_sweep": _batch_tokens_sweep(args.batch_tokens, args.quick),
    }


def _batch_tokens_sweep(value: str | None, quick: bool) -> list[int]:
    if value is None:
        return [] if quick else list(BATCH_TOKENS_SWEEP)
    if value.strip().lower() == "none":
        return []
    try:
        budgets = sorted({int(x) for x in value.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--batch-tokens {value!r}: comma-separated positive integers, or 'none'") from None
    if not budgets or budgets[0] < 1:
        raise ValueError(f"--batch-tokens {value!r}: comma-separated positive integers, or 'none'")
    return budgets


def run(args) -> int:
    """Run the benchmark described by parsed ``args``; writes JSON + Markdown, prints the table."""
    import numpy as np

    t_start = time.perf_counter()
    st = _settings(args)
    out_path = Path(args.out or ("bench-quick.json" if args.quick else "bench-results.json"))
    md_path = Path(args.markdown) if args.markdown else (
        out_path.with_suffix(".md") if (args.quick or args.out) else Path("BENCHMARKS.md"))
    texts, kinds = load_texts(args.data or default_data_dir(), st["docs"], st["sentences"], st["seed"])
    n_layers = _model_layers(st["model"])
    grids = [_resolve_grid("truncated", args.layers, args.poolings, n_layers)]
    if args.layers_full and args.layers_full.lower() != "none":
        grids.append(_resolve_grid("full-depth", args.layers_full, args.poolings, n_layers))
    report: dict[str, Any] = {
        "schema": "strata-bench/1", "date": _now_utc(), "machine": machine_info(), "versions": versions(),
        "settings": st, "grids": [], "notes": [],
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
            _log("hardware: dense matmul peak")
            hw = _spawn(dict(base, mode="hardware"), work, "hardware", args.timeout)
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
                _log(f"grid {grid['name']} ({grid['n_variants']} variants, deepest layer {grid['deepest']}): {mode}")
                spec = dict(base, mode=mode, variants=grid["variants"], work_dir=str(work / f"ray-{gi}"))
                res = _spawn(spec, work, f"{gi}-{mode}", args.timeout)
                if res.get("status") == "failed":
                    _log(f"  {mode} failed: {res.get('error')}\n{res.get('output_tail', '')[-1500:]}")
                elif res.get("status") == "ok":
                    _log(f"  {res['seconds']:.2f} s, {res['tokens'] / res['seconds']:.0f} tokens/s, "
                         f"peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB")
                modes[mode] = res
            lengths = next((r["lengths"] for r in modes.values() if r.get("lengths")), None)
            info = next((r["model"] for r in modes.values() if r.get("model")), None)
            useful = useful_flops(info["block_params"], info["hidden"], grid["deepest"], lengths) if info else None
            ref_mode, errs = _compare(modes)
            tol = TOLERANCE[st["model_dtype"]]
            for mode, res in modes.items():
                _finish_mode(res, peak, useful)
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
                        ratios=_ratios(modes, grid["n_variants"], borrowed),
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
    _log(f"wrote {out_path} and {md_path} in {report['total_seconds']:.0f} s")
    failed = [(g["name"], m) for g in report["grids"] for m, r in g["modes"].items() if r.get("status") == "failed"]
    mismatched = [(g["name"], m) for g in report["grids"] for m, r in g["modes"].items()
                  if r.get("matches_reference") is False]
    if failed or mismatched:
        _log(f"failed: {failed}; embeddings differing from the reference: {mismatched}")
        return 1
    return 0


def _mean_len(texts, kinds, kind) -> float | None:
    xs = [len(t) for t, k in zip(texts, kinds) if k == kind]
    return sum(xs) / len(xs) if xs else None


def _batch_tokens(st, base, grid, work, timeout) -> dict:
    """strata-encoder at each budget of the sweep, on the first grid."""
    if not st["batch_tokens_sweep"]:
        return {"status": "skipped", "reason": "no --batch-tokens sweep"}
    if "strata-encoder" not in st["modes"]:
        return {"status": "skipped", "reason": "strata-encoder not among --modes"}
    _log(f"batch token budgets {st['batch_tokens_sweep']}: strata-encoder on grid {grid['name']}")
    res = _spawn(dict(base, mode="batch-tokens", variants=grid["variants"], budgets=st["batch_tokens_sweep"]),
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
    _log("memory scaling: Ray path on 4x the corpus")
    four = _spawn(dict(base, mode="strata-ray", variants=grid["variants"], scale=4, work_dir=str(work / "ray-4x")),
                  work, "ray-4x", timeout)
    four.pop("_embeddings_path", None)
    _finish_mode(four, None, None)
    keys = ("rows", "tokens", "seconds", "tokens_per_second", "startup_seconds", "steady_tokens_per_second",
            "peak_rss_bytes", "peak_tree_rss_bytes", "peak_tree_pss_bytes", "status", "error")
    out = {"status": "ok" if four.get("status") == "ok" else "failed", "grid": grid["name"],
           "1x": {k: one.get(k) for k in keys if k in one}, "4x": {k: four.get(k) for k in keys if k in four}}
    if four.get("status") == "ok":
        enc = grid_modes.get("strata-encoder", {})
        out["ratios"] = {
            "driver peak RSS 4x/1x": _ratio(four.get("peak_rss_bytes"), one.get("peak_rss_bytes")),
            "tree peak PSS 4x/1x": _ratio(four.get("peak_tree_pss_bytes"), one.get("peak_tree_pss_bytes")),
            # the longest Ray run of the benchmark: the one where a steady state is best seen
            "ray 4x steady/encoder": _ratio(four.get("steady_tokens_per_second"),
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


# ============================================================================ Markdown
def _fmt(x, digits=1, unit=""):
    if x is None:
        return "-"
    if isinstance(x, float) and (abs(x) >= 1e4 or (abs(x) < 1e-2 and x != 0)):
        for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(x) >= div:
                return f"{x / div:.{digits}f} {suffix}{unit}".strip()
        return f"{x:.2e}{unit}"
    return f"{x:.{digits}f}{unit}" if isinstance(x, float) else f"{x}{unit}"


def _mib(x):
    return f"{x / 2**20:.0f}" if x else "-"


def to_markdown(report: dict) -> str:
    m, v, st = report["machine"], report["versions"], report["settings"]
    lines = [f"# Strata benchmark{' (quick)' if st['quick'] else ''}", ""]
    lines.append(f"- date: {report['date']}")
    lines.append(f"- machine: {m.get('cpu')}, {m.get('usable_cpus', m.get('logical_cpus'))} usable CPU cores"
                 + (f", {m['memory_bytes'] / 2**30:.0f} GiB RAM" if m.get("memory_bytes") else "")
                 + (f", GPU {report['hardware'].get('gpu')}" if report.get("hardware", {}).get("gpu") else ""))
    lines.append("- versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "transformers", "ray") if v.get(k))
                 + (f", commit {v['git_commit']}" if v.get("git_commit") else ""))
    d = report.get("data", {})
    lines.append(f"- model: {st['model']} ({st['model_dtype']} on {st['device']}), max length {st['max_length']}; "
                 f"data: {d.get('docs')} SciFact abstracts + {d.get('sentences')} STS-B sentences, shuffled; "
                 f"repeats {st['repeats']} (median), naive/hf batches of {st['batch_size']} in input order")
    hw = report.get("hardware")
    if hw and hw.get("status") == "ok":
        mm = ", ".join(f"{k} {_fmt(x['flops_per_second'], 1, 'FLOP/s')} ({x['size']}^2)" for k, x in hw["matmul"].items())
        lines.append(f"- dense matmul peak (torch.matmul, median): {mm}; {hw['threads']} torch threads")
    loads = [r[k] for g in report["grids"] for r in g["modes"].values()
             for k in ("load_average_before", "load_average_after") if r.get(k) is not None]
    if loads:
        lines.append(f"- 1-minute load average around the runs: {min(loads):.1f} to {max(loads):.1f} "
                     f"(other work on the machine slows every mode; CPU seconds per mode are in the JSON)")
    lines.append("")
    for g in report["grids"]:
        dd = g.get("data", {})
        lines.append(f"## Grid `{g['name']}`: layers {','.join(map(str, g['layers']))} x "
                     f"{','.join(g['poolings'])} = {g['n_variants']} variants (deepest {g['deepest']}, "
                     f"{g['depth_fraction']:.0%} of depth)")
        lines.append("")
        if dd:
            lp = dd["length_percentiles"]
            lines.append(f"{dd['rows']} texts, {dd['tokens']} tokens; length p0/p10/p50/p90/p100 = "
                         f"{lp['p0']}/{lp['p10']}/{lp['p50']}/{lp['p90']}/{lp['p100']}, {dd['at_max_length']} at max length.")
            lines.append("")
        lines.append("| mode | passes | seconds | tokens/s | rows/s | padding eff. | peak RSS MiB | load s "
                     "| executed FLOP/s (% peak) | useful FLOP/s (% peak) | CPU s / s | max rel. err vs ref |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for mode, r in g["modes"].items():
            if r.get("status") != "ok":
                why = r.get("reason") or r.get("error") or ""
                lines.append(f"| {mode} | {r.get('status')}: {why} |  |  |  |  |  |  |  |  |  |  |")
                continue
            passes = str(r["passes"])
            if r.get("extrapolated"):
                passes += f" ({r['variants_measured']} timed)"
            ex = (f"{_fmt(r['executed_flops_per_second'], 1)} ({r['fraction_of_peak']:.0%})"
                  if r.get("fraction_of_peak") is not None else _fmt(r.get("executed_flops_per_second")))
            us = (f"{_fmt(r['useful_flops_per_second'], 1)} ({r['useful_fraction_of_peak']:.0%})"
                  if r.get("useful_fraction_of_peak") is not None else _fmt(r.get("useful_flops_per_second")))
            err = r.get("max_rel_err")
            errs = "ref" if mode == g.get("reference") else (f"{err:.1e}" if err is not None else "-")
            rss = _mib(r.get("peak_rss_bytes"))
            busy = f"{r['cpu_seconds'] / r['seconds']:.2f}" if r.get("cpu_seconds") and r["seconds"] else "-"
            if r.get("peak_tree_pss_bytes"):
                rss += f" (all Ray processes: {_mib(r['peak_tree_pss_bytes'])} PSS)"
            lines.append(f"| {mode} | {passes} | {r['seconds']:.2f} | {r['tokens_per_second']:.0f} "
                         f"| {r['rows_per_second']:.2f} | {_fmt(r.get('padding_efficiency'), 2)} "
                         f"| {rss} | {_fmt(r.get('load_seconds'), 1)} | {ex} | {us} | {busy} | {errs} |")
        lines.append("")
        rat = ", ".join(f"{k} = {x:.2f}x" for k, x in g["ratios"].items() if x is not None)
        lines.append(f"Ratios (tokens/s): {rat or '-'}."
                     + (f" ({', '.join(g['ratios_borrow'])} as timed on grid `{report['grids'][0]['name']}`.)"
                        if g.get("ratios_borrow") else ""))
        ray = g["modes"].get("strata-ray", {})
        if ray.get("status") == "ok":
            lines.append(f"Ray: {ray.get('shards')} Parquet shard(s); start-up {_fmt(ray.get('startup_seconds'), 1)} s "
                         f"of {ray['seconds']:.1f} s; steady {_fmt(ray.get('steady_tokens_per_second'), 0)} tokens/s "
                         "('-': too few blocks for a steady state).")
        lines.append(f"Reference: {g.get('reference')}; tolerance {g['tolerance']:g} (relative L2 per row).")
        lines.append("")
    bt = report.get("batch_tokens", {})
    if bt.get("status") == "ok":
        default = next((r for r in bt["budgets"] if r["batch_tokens"] == bt["default"]), None)
        lines.append(f"## Batch token budget (strata-encoder, grid `{bt['grid']}`)")
        lines.append("")
        lines.append(f"Padded tokens per forward pass; all budgets interleaved in one process, median of "
                     f"{len(bt['budgets'][0]['seconds_samples'])}. Default {bt['default']}; fastest here {bt['best']}.")
        lines.append("")
        lines.append("| batch tokens | batches | padding eff. | seconds | tokens/s | vs default | peak GPU memory MiB |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in bt["budgets"]:
            rel = _ratio(r["tokens_per_second"], default["tokens_per_second"]) if default else None
            lines.append(f"| {r['batch_tokens']} | {r['batches']} | {r['padding_efficiency']:.2f} | {r['seconds']:.2f} "
                         f"| {r['tokens_per_second']:.0f} | {_fmt(rel, 2)}{'x' if rel else ''} "
                         f"| {_mib(r.get('peak_gpu_memory_bytes'))} |")
        lines.append("")
    ms = report.get("memory_scaling", {})
    lines.append("## Memory scaling (strata-ray)")
    lines.append("")
    if ms.get("status") in ("ok", "failed") and "1x" in ms:
        lines.append("| corpus | rows | seconds | tokens/s | start-up s | steady tokens/s | driver peak RSS MiB "
                     "| tree peak RSS MiB | tree peak PSS MiB |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for k in ("1x", "4x"):
            r = ms[k]
            lines.append(f"| {k} | {r.get('rows', '-')} | {_fmt(r.get('seconds'), 1)} | {_fmt(r.get('tokens_per_second'), 0)} "
                         f"| {_fmt(r.get('startup_seconds'), 1)} | {_fmt(r.get('steady_tokens_per_second'), 0)} "
                         f"| {_mib(r.get('peak_rss_bytes'))} | {_mib(r.get('peak_tree_rss_bytes'))} "
                         f"| {_mib(r.get('peak_tree_pss_bytes'))} |")
        rat = ", ".join(f"{k} = {x:.2f}x" for k, x in ms.get("ratios", {}).items() if x is not None)
        if rat:
            lines.append("")
            lines.append(f"Ratios: {rat}. The driver's peak is taken when `embed` returns, before the benchmark "
                         "reads the output back to check it.")
    else:
        lines.append(f"{ms.get('status')}: {ms.get('reason', '')}")
    lines.append("")
    if report["notes"]:
        lines.append("Notes:")
        lines.extend(f"- {n}" for n in report["notes"])
        lines.append("")
    return "\n".join(lines)


# ============================================================================ entry points
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child_main(argv[1])
    for k, val in CHILD_ENV.items():
        os.environ.setdefault(k, val)
    parser = argparse.ArgumentParser(prog="strata bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

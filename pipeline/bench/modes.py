"""What runs in each child process: one mode (or the hardware probe, or the batch-token sweep).

The parent (``driver``) writes a JSON spec and starts ``python -m pipeline.bench --child
SPEC``; ``child_main`` runs the spec's mode and writes a JSON result and the embeddings
(``.npz``, one array per ``Variant.name``) next to it. A fresh process per mode keeps each
peak RSS its own. Every mode pools with ``pipeline.pooling.pool`` so only the pass structure
differs:

- ``naive``: one full-model pass per variant (``AutoModel``, ``output_hidden_states=True``,
  fixed batches in input order, right padding by the tokenizer), pooling that variant;
- ``hf-single-pass``: the same batches, one full pass per batch, every variant pooled;
- ``strata-encoder``: ``Encoder.encode`` (token-budget batches, truncated pass);
- ``strata-ray``: ``pipeline.runner.embed`` on Parquet shards, end to end;
- ``hardware``: the dense-matmul FLOP/s the model FLOP/s are set against;
- ``batch-tokens``: ``strata-encoder`` at several batch budgets, interleaved.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from ..variants import Variant
from .measure import current_rss_bytes, keep_going, median, model_info, pass_flops, peak_rss_bytes, timed, TreeMemory


def _variants(spec: dict) -> list[Variant]:
    return [Variant.parse(name) for name in spec["variants"]]


def _texts(spec: dict) -> list[str]:
    return json.loads(Path(spec["texts_path"]).read_text())


def _grid_spec(variants: Sequence[Variant]) -> tuple[list[int], list[str]]:
    """(layers, poolings) whose product is the grid (the bench's grids are always full products)."""
    return sorted({v.layer for v in variants}), list(dict.fromkeys(v.pooling for v in variants))


def save_embeddings(path: str, emb: dict[Variant, Any]) -> None:
    import numpy as np

    np.savez(path, **{v.name: np.ascontiguousarray(a, dtype=np.float32) for v, a in emb.items()})


# ---------------------------------------------------------------------------- naive and hf-single-pass
def _load_hf(spec: dict):
    """The plain HF model for the naive and hf-single-pass modes: same weights and dtype as Strata."""
    import torch

    from .. import models
    from ..encoder import find_blocks, pick_device

    device = pick_device(spec["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok, _ = models.load(spec["model"], torch_dtype=dtype)
    model.to(device).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return model, tok, device, find_blocks(model)


def _hf_pass(model, tok, device, texts: list[str], max_length: int, batch_size: int,
             variants: Sequence[Variant], out: dict[Variant, Any]):
    """One pass over the texts in fixed batches (input order), pooling ``variants`` into ``out``;
    returns (batch shapes, token counts)."""
    import torch

    from ..pooling import pool

    by_layer: dict[int, list[str]] = {}
    for v in variants:
        by_layer.setdefault(v.layer, []).append(v.pooling)
    shapes, lengths = [], []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            enc = tok(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            ids = enc["input_ids"].to(device)
            mask = enc["attention_mask"].to(device)
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
            for layer, poolings in by_layer.items():
                for pooling, vec in pool(hs[layer], mask, poolings).items():
                    out[Variant(layer, pooling)][start:start + len(chunk)] = vec.float().cpu().numpy()
            shapes.append((int(ids.shape[0]), int(ids.shape[1])))
            lengths.extend(int(n) for n in enc["attention_mask"].sum(dim=1).tolist())
    return shapes, lengths


def run_hf_modes(spec: dict) -> dict:
    import numpy as np

    model, tok, device, blocks = _load_hf(spec)
    info = model_info(model, blocks)
    texts = _texts(spec)
    variants = _variants(spec)
    n, dim = len(texts), info["hidden"]
    load_seconds = time.perf_counter() - spec["_t_start"]
    rss_loaded = current_rss_bytes()
    scratch = {v: np.empty((2, dim), np.float32) for v in variants}
    _hf_pass(model, tok, device, texts[:2], spec["max_length"], 2, variants, scratch)  # warm-up
    emb = {v: np.empty((n, dim), np.float32) for v in variants}
    times: list[float] = []
    cpu0 = time.process_time()
    if spec["mode"] == "hf-single-pass":  # every variant from each pass; repeated for a median
        while keep_going(times, spec["budget_seconds"], spec["repeats"]):
            (shapes, lengths), secs = timed(device, lambda: _hf_pass(
                model, tok, device, texts, spec["max_length"], spec["batch_size"], variants, emb))
            times.append(secs)
        seconds, passes_per_run = median(times), 1
    else:  # naive: one pass per variant, in a fixed shuffled order so a partial run spans the grid
        order = list(variants)
        random.Random(1).shuffle(order)
        wanted = len(order) if spec["naive_variants"] in (None, "all") else min(int(spec["naive_variants"]), len(order))
        for variant in order:
            if not keep_going(times, spec["budget_seconds"], wanted):
                break
            (shapes, lengths), secs = timed(device, lambda: _hf_pass(
                model, tok, device, texts, spec["max_length"], spec["batch_size"], [variant], emb))
            times.append(secs)
        measured = len(times)
        emb = {v: emb[v] for v in order[:measured]}
        # every naive pass is the same full-model computation; unmeasured passes cost the median
        seconds = sum(times) if measured == len(variants) else median(times) * len(variants)
        passes_per_run = len(variants)
    cpu_seconds = (time.process_time() - cpu0) / len(times) * (len(variants) if spec["mode"] == "naive" else 1)
    save_embeddings(spec["embeddings_path"], emb)
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
                      extrapolated=measured < len(variants), seconds_per_pass=median(times))
    return result


# ---------------------------------------------------------------------------- strata-encoder
def _load_encoder(spec: dict):
    from ..encoder import Encoder

    variants = _variants(spec)
    layers, poolings = _grid_spec(variants)
    enc = Encoder.load(spec["model"], layers=layers, poolings=poolings, device=spec["device"],
                       max_length=spec["max_length"])
    if set(enc.variants) != set(variants):
        raise ValueError("encoder variants differ from the grid's")
    return enc


def run_encoder(spec: dict) -> dict:
    from ..batching import plan_batches

    enc = _load_encoder(spec)
    info = model_info(enc.model, enc.blocks)
    texts = _texts(spec)
    load_seconds = time.perf_counter() - spec["_t_start"]
    rss_loaded = current_rss_bytes()
    enc.encode(texts[:2])  # warm-up
    ids, _ = enc.tokenize(texts)
    lengths = [len(x) for x in ids]
    plan = plan_batches(lengths, batch_tokens=enc.settings.batch_tokens, max_rows=enc.settings.max_batch_rows,
                        pad_multiple=enc.pad_multiple)
    times: list[float] = []
    res = None
    cpu0 = time.process_time()
    while keep_going(times, spec["budget_seconds"], spec["repeats"]):
        res, secs = timed(enc.device, lambda: enc.encode(texts))
        times.append(secs)
    cpu_seconds = (time.process_time() - cpu0) / len(times)
    save_embeddings(spec["embeddings_path"], {v: res[v] for v in enc.variants})
    shapes = [(len(b.indices), b.padded_len) for b in plan]
    depth = max(enc.layers)  # blocks actually run (the final norm, when layer N is asked, is negligible)
    if res.stats.padded_tokens != sum(r * t for r, t in shapes) or res.stats.tokens != sum(lengths):
        raise RuntimeError("the encoder's batches differ from the benchmark's plan of them")
    return {
        "rows": res.stats.rows, "tokens": res.stats.tokens, "padded_tokens": res.stats.padded_tokens,
        "batches": res.stats.batches, "seconds": median(times), "seconds_samples": times, "passes": 1,
        "depth_run": depth, "executed_flops": pass_flops(info["block_params"], info["hidden"], depth, shapes),
        "model": info, "lengths": lengths, "load_seconds": load_seconds, "rss_after_load_bytes": rss_loaded,
        "batch_tokens": enc.settings.batch_tokens, "cpu_seconds": cpu_seconds,
    }


def run_batch_tokens(spec: dict) -> dict:
    """strata-encoder at several padded-token budgets per forward pass, interleaved, median of repeats."""
    import dataclasses

    import torch

    enc = _load_encoder(spec)
    ids, _ = enc.tokenize(_texts(spec))
    enc.encode_ids(ids[:2])  # warm-up
    budgets = spec["budgets"]
    times: dict[int, list[float]] = {b: [] for b in budgets}
    stats, gpu_peak = {}, {}
    for _ in range(spec["repeats"]):
        for b in budgets:  # interleaved, so drift in the machine's load touches every budget alike
            enc.settings = dataclasses.replace(enc.settings, batch_tokens=b)
            if enc.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(enc.device)
            res, secs = timed(enc.device, lambda: enc.encode_ids(ids))
            times[b].append(secs)
            stats[b] = res.stats
            if enc.device.type == "cuda":
                gpu_peak[b] = torch.cuda.max_memory_allocated(enc.device)
    rows = []
    for b in budgets:
        sec = median(times[b])
        rows.append({"batch_tokens": b, "batches": stats[b].batches, "padding_efficiency": stats[b].padding_efficiency,
                     "seconds": sec, "seconds_samples": times[b], "tokens_per_second": stats[b].tokens / sec,
                     "peak_gpu_memory_bytes": gpu_peak.get(b)})
    return {"rows": len(ids), "tokens": stats[budgets[0]].tokens, "budgets": rows}


# ---------------------------------------------------------------------------- strata-ray
def _read_ray_output(out_dir: Path, n: int, variants: Sequence[Variant], scale: int) -> dict[Variant, Any]:
    """Embeddings the runner committed, as {variant: (n, dim)} in input order (the first copy when scaled)."""
    import numpy as np

    from ..runner import read_embeddings

    table = read_embeddings(str(out_dir), ["id"] + [v.column for v in variants])
    ids = np.asarray([int(x) for x in table.column("id").to_pylist()])
    if len(ids) != n * scale or len(np.unique(ids)) != len(ids):
        raise RuntimeError(f"the runner wrote {len(ids)} rows ({len(np.unique(ids))} distinct ids), expected {n * scale}")
    keep = ids < n
    emb = {}
    for v in variants:
        col = table.column(v.column).combine_chunks()
        arr = np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ids), -1)[keep]
        out = np.empty_like(arr)
        out[ids[keep]] = arr
        emb[v] = out
    return emb


def run_ray(spec: dict) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..request import resolve
    from ..runner import embed

    texts = _texts(spec)
    variants = _variants(spec)
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
    layers, poolings = _grid_spec(variants)
    with TreeMemory() as mem:
        t0 = time.perf_counter()
        request = resolve(spec["model"], layers=layers, poolings=poolings, max_length=spec["max_length"],
                          dtype="float32", normalize=False, device=spec["device"])
        resolve_seconds = time.perf_counter() - t0
        if set(request.variants) != set(variants):
            raise ValueError("request variants differ from the grid's")
        summary = embed(request, str(in_dir), str(out_dir), text_column="text", id_column="id", force=True,
                        progress=False)
        wall = time.perf_counter() - t0
    # The driver's peak during the run, before the check below reads every output row back.
    driver_peak = peak_rss_bytes()
    emb = _read_ray_output(out_dir, len(texts), variants, scale)
    save_embeddings(spec["embeddings_path"], emb)
    # the runner's own clock (start-up included) plus resolving the request, which embed once did itself
    seconds = resolve_seconds + float(summary.seconds or wall - resolve_seconds)
    result = {
        "rows": int(summary.rows), "tokens": int(summary.tokens),
        "padded_tokens": int(summary.padded_tokens) or None,
        "seconds": seconds, "seconds_samples": [seconds], "wall_seconds": wall, "passes": 1, "scale": scale,
        "startup_seconds": summary.startup_seconds,
        # 0 when everything fits in one batch (no steady state to measure)
        "steady_tokens_per_second": summary.steady_tokens_per_second or None,
        "peak_rss_bytes": driver_peak, "peak_tree_rss_bytes": mem.peak_rss, "peak_tree_pss_bytes": mem.peak_pss,
        "shards": n_shards,
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------- hardware
def run_hardware(spec: dict) -> dict:
    """Attainable dense matmul FLOP/s: fp32 on CPU; bf16, fp16 and fp32 on GPU. Median of several."""
    import torch

    from ..encoder import pick_device

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
            samples.append(timed(device, lambda: torch.matmul(a, b))[1])
        secs = median(samples)
        out["matmul"][name] = {"size": size, "seconds": secs, "flops_per_second": 2.0 * size ** 3 / secs,
                               "samples": len(samples)}
    out["peak_dtype"] = "bfloat16" if device.type == "cuda" else "float32"  # the dtype the model runs in
    out["peak_flops_per_second"] = out["matmul"][out["peak_dtype"]]["flops_per_second"]
    return out


# ---------------------------------------------------------------------------- the child's entry point
CHILD_MODES = {"naive": run_hf_modes, "hf-single-pass": run_hf_modes, "strata-encoder": run_encoder,
               "strata-ray": run_ray, "hardware": run_hardware, "batch-tokens": run_batch_tokens}


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    spec["_t_start"] = time.perf_counter()
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    result = CHILD_MODES[spec["mode"]](spec)
    result["status"] = "ok"
    result.setdefault("peak_rss_bytes", peak_rss_bytes())
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

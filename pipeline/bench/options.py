"""What a ``strata bench`` run is asked to do: its options, the settings resolved from them, its grids.

``add_arguments`` declares the command line; ``settings`` turns parsed arguments into the
plain dict recorded in the report (device, dtype, sample size, modes, repeats, budgets);
``resolve_grid`` turns a layer and pooling spec into a grid of ``Variant`` for the model.
"""

from __future__ import annotations

import argparse

# Naive and hf-single-pass run every block whatever the grid asks (so --quick times them once).
MODES = ("naive", "hf-single-pass", "strata-encoder", "strata-ray")
FULL_MODEL_MODES = ("naive", "hf-single-pass")
NAIVE_BATCH_SIZE = 32
# Grid "truncated": deepest layer at 60% of depth (18 of SmolLM2's 30), the depth range where
# intermediate-layer embeddings are usually best. Grid "full-depth" includes the last layer,
# where truncation cannot save anything. Percentages keep the grids meaningful for any model.
DEFAULT_LAYERS = "10%,20%,30%,40%,50%,60%"  # SmolLM2-135M: 3,6,9,12,15,18
DEFAULT_LAYERS_FULL = "17%,33%,50%,67%,83%,100%"  # SmolLM2-135M: 5,10,15,20,25,30
DEFAULT_POOLINGS = "last,mean,wmean,mean_nosink"
BATCH_TOKENS_SWEEP = (4096, 8192, 16384, 32768)  # padded tokens per forward pass, compared on strata-encoder
SAMPLE_SIZES = {  # (SciFact documents, STS-B sentences)
    "quick": (4, 12),
    "cpu": (64, 192),
    "cuda": (1024, 3072),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``strata bench``."""
    from ..models import DEFAULT_MODEL

    parser.add_argument("--embed-vs-encoder", action="store_true",
                        help="instead of the modes: strata embed (Ray) against the bare Encoder on short texts and the "
                        "mixed sample, 1 and 155 variants, steady state (pipeline/bench/overhead.py; 37 to 56 "
                        "minutes on 2 CPU cores; with --batch-tokens also encoder batch shapes)")
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


def settings(args) -> dict:
    """The run's settings from parsed ``args``: CUDA (when present) means bf16 and the large sample."""
    import torch

    from ..request import DEFAULT_BATCH_TOKENS

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
        "batch_tokens_sweep": batch_tokens_sweep(args.batch_tokens, args.quick),
    }


def batch_tokens_sweep(value: str | None, quick: bool) -> list[int]:
    """The budgets of ``--batch-tokens``: sorted, distinct; none by default with ``--quick``."""
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


def resolve_grid(name: str, layers_spec: str, poolings_spec: str, n_layers: int) -> dict:
    """A grid as the report records it; ``variants`` holds ``Variant.name`` strings (``Variant.parse`` reads them)."""
    from ..variants import make_variants

    variants = make_variants(layers_spec, poolings_spec, n_layers)
    layers = sorted({v.layer for v in variants})
    return {"name": name, "layers_spec": layers_spec, "layers": layers,
            "poolings": list(dict.fromkeys(v.pooling for v in variants)),
            "variants": [v.name for v in variants], "n_variants": len(variants),
            "deepest": max(layers), "depth_fraction": max(layers) / n_layers}


def model_layers(model_spec: str) -> int:
    """The model's block count, from its config alone (no weights)."""
    from .. import models

    return models.depth(model_spec)

"""The first-token massive activation and the mean collapse, measured per layer.

``python studies/activations.py --model smollm2-135m --model gemma3-270m`` prints, and
writes as markdown, per layer of each model, over the first N sentences of STS-B test (the
demo's vendored copy):

- **first/other norm**: the median over texts of ‖h₁‖ / median(‖h₂‖..‖hₙ‖), the first token's
  norm against the text's other tokens (≫ 1: a massive activation);
- **first's share of the mean**: the median of ‖h₁/n‖ / ‖mean(h)‖, how much of the mean-pooled
  vector the first token alone makes;
- **cos mean / cos mean_nosink**: the mean pairwise cosine similarity of the texts' `mean` and
  `mean_nosink` vectors (near 1: every text gets nearly the same vector, the collapse).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: this checkout's pipeline, not another installed one
    sys.path.insert(0, str(ROOT))


def _sentences(n: int) -> list[str]:
    from pipeline.demo import DEMO_DATA
    from pipeline.evaldata import load_sts

    pairs = load_sts(DEMO_DATA / "stsb" / "sts-test.csv")
    return list(dict.fromkeys([*pairs.sentence1, *pairs.sentence2]))[:n]


def _mean_cos(x: np.ndarray) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    return float((np.square(x.sum(0)).sum() - n) / (n * (n - 1)))


@torch.inference_mode()
def measure(model: str, texts: list[str], max_length: int = 128) -> list[dict]:
    from pipeline.encoder import Encoder

    enc = Encoder.load(model, layers="all", poolings="mean", max_length=max_length, device="cpu")
    ids, _ = enc.tokenize(texts)
    layers = list(range(enc.n_layers + 1))
    ratio = {i: [] for i in layers}
    share = {i: [] for i in layers}
    means = {i: [] for i in layers}
    nosink = {i: [] for i in layers}
    for row in ids:  # one text at a time: no padding anywhere
        x = torch.tensor([row])
        hidden = enc.hidden_states(x, torch.ones_like(x), layers)
        for i in layers:
            h = hidden[i][0].double()
            norms = h.norm(dim=-1)
            mean = h.mean(0)
            if len(row) > 1:
                ratio[i].append(float(norms[0] / norms[1:].median()))
                nosink[i].append(h[1:].mean(0).numpy())
            share[i].append(float(norms[0] / len(row) / mean.norm()))
            means[i].append(mean.numpy())
    return [{"layer": i, "first_over_other": float(np.median(ratio[i])), "first_share_of_mean": float(np.median(share[i])),
             "cos_mean": _mean_cos(np.stack(means[i])), "cos_mean_nosink": _mean_cos(np.stack(nosink[i]))}
            for i in layers]


def markdown(model: str, rows: list[dict], n_texts: int) -> str:
    lines = [f"#### {model} ({n_texts} STS-B test sentences, one at a time)", "",
             "| layer | first/other norm | first's share of the mean | cos `mean` | cos `mean_nosink` |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['first_over_other']:.1f} | {r['first_share_of_mean']:.2f} | {r['cos_mean']:.3f} "
              f"| {r['cos_mean_nosink']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python studies/activations.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", help="model spec (repeatable; default smollm2-135m and gemma3-270m)")
    p.add_argument("--texts", type=int, default=200)
    p.add_argument("--out", default="bench-activations")
    args = p.parse_args(argv)
    texts = _sentences(args.texts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report, md = {}, []
    for model in args.model or ["smollm2-135m", "gemma3-270m"]:
        t0 = time.perf_counter()
        report[model] = measure(model, texts)
        md.append(markdown(model, report[model], len(texts)))
        print(md[-1], f"({time.perf_counter() - t0:.0f}s)\n", flush=True)
    (out / "activations.json").write_text(json.dumps(report, indent=1))
    (out / "activations.md").write_text("\n".join(md))
    print(f"written: {out / 'activations.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python studies/probe_curve.py --labels DATA --out DIR``: how big must a probe sample be?

Embeds the whole labelled set once (every template x layer x pooling), then draws seeded
subsamples of 100 / 300 / 500 / 1,000 labelled items (STS pairs or queries; retrieval keeps the
whole sampled corpus) and, per size, chooses on the subsample and scores the choice on the
**held-out complement** (the items the subsample did not draw; a subsample is never scored against
data that contains it):

- how often the subsample's winner is the complement's own winner;
- Kendall's tau between the subsample's ranking of every variant and the complement's;
- the regret: the complement's best score minus the complement's score of the subsample's winner.

The complement shrinks as the subsample grows (500 items left at 1,000 of 1,500), so its own winner is
noisier there: the regret is the column to read. Sizes are those that leave at least 100 items out.

The variants are the raw cells and the uniform mixes: nothing fitted, so a subsample's scores
are the per-item scores of the full pass restricted to it (fitted variants would need a refit
per draw). The probe's default sample size (``probe.DEFAULT_ITEMS``) is read off this curve.

Writes ``{out}/curve-{data}-{split}.json|md`` and prints the table (docs/probe.md quotes it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: this checkout's pipeline, not another installed one
    sys.path.insert(0, str(ROOT))

from pipeline import stats  # noqa: E402
from pipeline.bench.measure import write_study  # noqa: E402
from pipeline.encoder import Encoder  # noqa: E402
from pipeline.evaldata import load_beir, load_sts  # noqa: E402
from pipeline.mixes import apply_mix  # noqa: E402
from pipeline.probe import (POOLINGS, TEMPLATES, choose, encode_with_progress, make_task, sample_labels,  # noqa: E402
                            score_variants)
from pipeline.request import resolve  # noqa: E402

SIZES = (100, 300, 500, 1000)  # 500: the probe's default


HELD_OUT_MIN = 100  # items the complement keeps at least


def curve(task, per_item: dict, draws: int, seed: int = 0, held_out_min: int = HELD_OUT_MIN) -> list[dict]:
    names = list(per_item)
    rows = []
    rng = np.random.default_rng(seed)
    for size in [s for s in SIZES if s <= task.n - held_out_min]:
        same, taus, regrets = [], [], []
        for _ in range(draws):
            idx = np.sort(rng.choice(task.n, size=size, replace=False))
            rest = np.setdiff1d(np.arange(task.n), idx)
            sub = np.array([task.score(per_item[v], idx) for v in names])
            held = np.array([task.score(per_item[v], rest) for v in names])
            win = names[int(np.nanargmax(sub))]  # undefined (constant) scores are NaN
            same.append(win == names[int(np.nanargmax(held))])
            ok = np.isfinite(sub) & np.isfinite(held)
            taus.append(st.kendalltau(sub[ok], held[ok]).statistic)
            regrets.append(np.nanmax(held) - held[names.index(win)])
        rows.append({"items": size, "held_out": task.n - size, "draws": len(same), "same_winner": float(np.mean(same)),
                     "kendall_tau_median": float(np.median(taus)), "kendall_tau_p10": float(np.quantile(taus, 0.1)),
                     "regret_median": float(np.median(regrets)), "regret_p90": float(np.quantile(regrets, 0.9))})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python studies/probe_curve.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--labels", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--templates", default=",".join(TEMPLATES))
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-docs", type=int, default=1000)
    p.add_argument("--draws", type=int, default=50)
    p.add_argument("--held-out-min", type=int, default=HELD_OUT_MIN, help="items a draw leaves out at least")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    labels = load_beir(args.labels, split=args.split) if Path(args.labels).is_dir() else load_sts(args.labels)
    n_all = len(labels) if hasattr(labels, "scores") else len(labels.qrels)
    data = sample_labels(labels, n_all, args.max_docs)
    task = make_task(data)
    request = resolve(args.model, layers="all", poolings=POOLINGS, templates=args.templates.split(","),
                      max_length=args.max_length, digest=False)
    encoder = Encoder.from_request(request)
    n_layers = request.model.n_layers
    vectors = encode_with_progress(encoder, task.texts, f"{data.name}/{data.split}")
    scored = score_variants(task, vectors, n_layers=n_layers, mixes="all,50%:100%", transforms=(), say=print)
    choice = choose(scored, n_layers)
    all_items = np.arange(task.n)
    per_item = {}
    for s in scored:
        v = s.variant
        m = vectors[v] if v.is_raw else apply_mix([vectors[x] for x in v.sources], np.full(len(v.sources),
                                                                                          1 / len(v.sources)))
        per_item[v.name] = task.per_item(m, all_items)
    rows = curve(task, per_item, args.draws, held_out_min=args.held_out_min)
    result = {"model": request.model.name, "data": data.name, "split": data.split, "items": task.n,
              "texts": len(task.texts), "subset": getattr(data, "subset_note", None), "variants": len(per_item),
              "full_winner": choice.top.variant.name, "full_tied": len(choice.tied), "curve": rows,
              "resamples": stats.RESAMPLES, "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    lines = [f"{data.name}/{data.split}: {task.n} labelled items, {len(per_item)} variants; full-set winner "
             f"{result['full_winner']} ({result['full_tied']} tied with it)", "",
             "| items | held out | draws | same winner as the held-out's | Kendall tau vs held-out (median, p10) | "
             "regret on held-out (median, p90) |",
             "|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['items']} | {r['held_out']} | {r['draws']} | {r['same_winner']:.2f} | "
                     f"{r['kendall_tau_median']:.3f}, {r['kendall_tau_p10']:.3f} | {r['regret_median']:.2f}, "
                     f"{r['regret_p90']:.2f} |")
    write_study(out, f"curve-{data.name}-{data.split}", result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

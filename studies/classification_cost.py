"""``python studies/classification_cost.py``: where the time of MTEB's classification protocol goes.

Scoring one variant on Banking77 is 10 logistic regressions (``pipeline/tasks/classification.py``:
scikit-learn's ``LogisticRegression(random_state=42, max_iter=100)``, lbfgs, float64) on 8 texts per
label, each predicting the 3,080 test texts. This study embeds the task's texts once at a few layers,
then scores each variant on one thread (as each of ``evaluate_prepared``'s worker processes does) under
cProfile and splits its seconds into:

- ``lbfgs``: scipy's L-BFGS-B routine (``setulb``), the optimiser's own work on the 77 x (d + 1)
  coefficients;
- ``loss``: scikit-learn's loss and gradient (the two float64 matrix products per evaluation, the
  softmax);
- ``rest``: everything else (validation, prediction, metrics).

It also counts the fits that stop at ``max_iter`` (the first experiment of each variant), and writes
the embedding seconds of the same texts beside the scoring seconds. Both splits are what any faster
scoring would have to beat without changing a score: the optimiser and its loss are MTEB's, fixed.

Writes ``{out}/classification_cost.json`` and ``.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: this checkout's pipeline, not another installed one
    sys.path.insert(0, str(ROOT))

from pipeline.bench.measure import git_commit, write_study  # noqa: E402
from pipeline.encoder import Encoder  # noqa: E402
from pipeline.evaldata import default_data_dir  # noqa: E402
from pipeline.probe import encode_with_progress  # noqa: E402
from pipeline.request import resolve  # noqa: E402
from pipeline.tasks import classification  # noqa: E402


def split_seconds(stats: pstats.Stats) -> dict[str, float]:
    """A profile's own seconds in the optimiser, in scikit-learn's loss, and the rest."""
    out = {"lbfgs": 0.0, "loss": 0.0, "total": 0.0}
    for (file, _, func), (_, _, own, _, _) in stats.stats.items():
        out["total"] += own
        if "setulb" in func:
            out["lbfgs"] += own
        elif file.replace("\\", "/").endswith(("linear_model/_linear_loss.py", "_loss/loss.py")):
            out["loss"] += own
    out["rest"] = out["total"] - out["lbfgs"] - out["loss"]
    return out


def score_variant(prepared: classification.Prepared, m: np.ndarray) -> dict:
    """One variant's scoring, profiled on one thread, and whether its first fit ran out of iterations."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        scores = prepared.score(m)
        prof.disable()
        wall = time.perf_counter() - t0
        first = classification.fit_classifier(m[prepared.sample_rows[0]],
                                              prepared.data.train_labels[prepared.samples[0]])
    split = split_seconds(pstats.Stats(prof))
    return {"seconds": wall, **{k: split[k] / split["total"] * wall for k in ("lbfgs", "loss", "rest")},
            "accuracy": scores["accuracy"], "max_iter_reached": bool(first.n_iter_.max() >= classification.MAX_ITER)}


def markdown(report: dict) -> str:
    lines = [f"{report['model']}, {report['data']} ({report['texts']:,} texts embedded in {report['embed_s']:.1f} s, "
             f"layers {report['layers']}), one thread per variant, commit {report['git_commit']}", "",
             "| variant | accuracy | seconds | lbfgs | loss | rest | 100 iterations |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in report["variants"].items():
        lines.append(f"| {name} | {r['accuracy']:.2f} | {r['seconds']:.2f} | {r['lbfgs']:.2f} | {r['loss']:.2f} | "
                     f"{r['rest']:.2f} | {'yes' if r['max_iter_reached'] else 'no'} |")
    med = report["median"]
    lines += ["", f"Median per variant: {med['seconds']:.2f} s ({med['lbfgs'] / med['seconds']:.0%} L-BFGS-B, "
              f"{med['loss'] / med['seconds']:.0%} loss and gradient, {med['rest'] / med['seconds']:.0%} the rest).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python studies/classification_cost.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="1,15,30")
    ap.add_argument("--poolings", default="last,mean")
    ap.add_argument("--data", type=Path, default=None,
                    help="a classification folder (default: ../shared/data/banking77; smoke runs: a tiny one)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args(argv)
    data = classification.load(args.data or default_data_dir() / "banking77")
    prepared = classification.Prepared(data)
    encoder = Encoder.from_request(resolve(args.model, layers=args.layers, poolings=args.poolings,
                                           max_length=args.max_length))
    t0 = time.perf_counter()
    vectors = encode_with_progress(encoder, prepared.texts, f"{args.model}: {len(prepared.texts):,} texts")
    embed_s = time.perf_counter() - t0
    del encoder
    classification.fit_classifier(np.eye(4), np.arange(4) % 2)  # imports outside the first profile
    variants = {}
    for v, m in vectors.items():
        variants[v.name] = score_variant(prepared, m)
        print(f"  {v.name}: {variants[v.name]['seconds']:.2f} s", flush=True)
    median = {k: float(np.median([r[k] for r in variants.values()])) for k in ("seconds", "lbfgs", "loss", "rest")}
    report = {"model": args.model, "data": data.name, "texts": len(prepared.texts), "layers": args.layers,
              "embed_s": embed_s, "variants": variants, "median": median, "git_commit": git_commit()}
    write_study(args.out, "classification_cost", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

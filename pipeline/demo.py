"""``strata demo``: the default model through the local Ray pipeline on STS-B test and a
SciFact subset, then the report and heatmaps. Sized to finish within minutes on a 2-core CPU;
the full-size comparison is ``jobs/pooling-sweep.yaml``.
"""

from __future__ import annotations

import time
from pathlib import Path

from .evaluate import eval_retrieval, eval_sts
from .report import best_variants, write_report

# Every layer, the poolings that matter most for decoder models (max rarely wins and is skipped).
DEMO_OPTIONS = dict(model="smollm2-135m", layers="all", poolings="last,mean,wmean,mean_nosink,wmean_nosink",
                    max_length=128, dtype="float16")
SCIFACT_SUBSET = dict(max_queries=60, max_docs=400)  # a subset: scores are not comparable to published ones


def run_demo(output: str | Path, *, quick: bool, data: Path) -> int:
    output = Path(output)
    if not (data / "stsb" / "sts-test.csv").exists():
        raise FileNotFoundError(f"evaluation data not found under {data} (expected stsb/ and scifact/)")
    t0 = time.perf_counter()
    sts = eval_sts(data / "stsb" / "sts-test.csv", output, **DEMO_OPTIONS) if not quick else None
    if quick:
        from .evaldata import load_sts

        d = load_sts(data / "stsb" / "sts-test.csv")
        d.sentence1, d.sentence2, d.scores = d.sentence1[:100], d.sentence2[:100], d.scores[:100]
        sts = eval_sts(d, output, **DEMO_OPTIONS)
    subset = dict(max_queries=20, max_docs=200) if quick else SCIFACT_SUBSET
    ret = eval_retrieval(data / "scifact", output, **subset, **DEMO_OPTIONS)
    written = write_report(sts + ret, output, n_layers=30)
    print(f"\nStrata demo finished in {time.perf_counter() - t0:.0f}s")
    for dataset, best in best_variants(sts + ret, n_layers=30).items():
        default = f" (L30.last: {best['default_score']:.2f})" if best.get("default_score") is not None else ""
        print(f"  {dataset}: best {best['variant']} {best['metric']} = {best['score']:.2f}{default}")
    print(f"  report:   {written['report']}")
    for png in written["heatmaps"]:
        print(f"  heatmap:  {png}")
    print("  SciFact here is a subset (fewer distractors): its scores are not comparable to published numbers.")
    return 0

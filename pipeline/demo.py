"""``strata demo``: the default model through the local Ray pipeline on STS-B test and a
SciFact subset, then the report and heatmaps. Sized to finish within minutes on a 2-core CPU;
the full-size comparison is ``jobs/pooling-sweep.yaml``.
"""

from __future__ import annotations

import time
from pathlib import Path

from .evaldata import load_sts
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
    pairs = load_sts(data / "stsb" / "sts-test.csv")
    if quick:
        pairs.sentence1, pairs.sentence2, pairs.scores = pairs.sentence1[:100], pairs.sentence2[:100], pairs.scores[:100]
    sts = eval_sts(pairs, output, **DEMO_OPTIONS)
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

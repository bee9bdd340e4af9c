"""``strata demo``: the default model through the local Ray pipeline on STS-B test and a
SciFact subset, then the report and heatmaps. Sized to finish within minutes on a 2-core CPU;
the full-size comparison is ``jobs/pooling-sweep.yaml``.
"""

from __future__ import annotations

import time
from pathlib import Path

from .evaldata import load_sts
from .evaluate import RayEncoder, eval_retrieval, eval_sts, load_retrieval, texts_of
from .report import best_variants, write_report
from .request import resolve
from .variants import Variant

# Every layer, the poolings that matter most for decoder models (max rarely wins and is skipped).
DEMO_OPTIONS = dict(layers="all", poolings="last,mean,wmean,mean_nosink,wmean_nosink", max_length=128,
                    dtype="float16")
DEMO_MODEL = "smollm2-135m"
SCIFACT_SUBSET = dict(max_queries=60, max_docs=400)  # a subset: scores are not comparable to published ones
# STS-B test and exactly that SciFact subset, vendored with their licences (demo_data/README.md)
DEMO_DATA = Path(__file__).resolve().parent / "demo_data"


def run_demo(output: str | Path, *, quick: bool, data: Path, model: str = DEMO_MODEL) -> int:
    output = Path(output)
    if not (data / "stsb" / "sts-test.csv").exists():
        raise FileNotFoundError(f"evaluation data not found under {data} (expected stsb/ and scifact/)")
    t0 = time.perf_counter()
    pairs = load_sts(data / "stsb" / "sts-test.csv")
    if quick:
        pairs.sentence1, pairs.sentence2, pairs.scores = pairs.sentence1[:100], pairs.sentence2[:100], pairs.scores[:100]
    request = resolve(model, **DEMO_OPTIONS)
    n_layers = request.model.n_layers
    encoder = RayEncoder(request, output)  # the local Ray pipeline, embeddings cached in the output
    scifact = load_retrieval(data / "scifact", **(dict(max_queries=20, max_docs=200) if quick else SCIFACT_SUBSET))
    encoder.prefetch(texts_of(pairs) + texts_of(scifact))  # both sets in one run: the model is loaded once
    sts = eval_sts(pairs, output, encoder)
    ret = eval_retrieval(scifact, output, encoder)
    written = write_report(sts + ret, output, n_layers=n_layers)
    print(f"\nStrata demo finished in {time.perf_counter() - t0:.0f}s")
    default_name = Variant(n_layers, "last").name
    for dataset, best in best_variants(sts + ret, n_layers=n_layers).items():
        default = f" ({default_name}: {best['default_score']:.2f})" if best.get("default_score") is not None else ""
        print(f"  {dataset}: best {best['variant']} {best['metric']} = {best['score']:.2f}{default}")
    print(f"  report:   {written['report']}")
    for png in written["heatmaps"]:
        print(f"  heatmap:  {png}")
    print("  SciFact here is a subset (fewer distractors): its scores are not comparable to published numbers.")
    return 0

"""How much float16 output moves the scores (issue #18): every variant of the full grid embedded once
in float32, scored as stored in float32 and as stored in float16 (``--dtype float16`` casts the
float32 vectors: ``quantize.quantize``), on STS-B test and on SciFact.

    python studies/float16.py [--scifact-queries N --scifact-docs M] [--out bench-float16]

Prints the largest absolute change of Spearman x 100 (STS-B) and nDCG@10 x 100 (SciFact) over
the grid, and whether the best variant changes, and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: this checkout's pipeline, not another installed one
    sys.path.insert(0, str(ROOT))

from pipeline.demo import DEMO_DATA as DEMO  # noqa: E402

POOLINGS = "last,mean,wmean,mean_nosink,wmean_nosink"  # the full grid: every layer x these


def changes(name: str, scores32: dict, scores16: dict) -> dict:
    """Largest and median absolute change over the variants whose score is defined in both (a variant
    that gives every text one vector has no correlation: it is counted apart, as undefined)."""
    diffs = {v: abs(scores16[v] - scores32[v]) for v in scores32 if np.isfinite(scores16[v] - scores32[v])}
    worst = max(diffs, key=diffs.get)
    defined32 = {v: s for v, s in scores32.items() if np.isfinite(s)}
    defined16 = {v: s for v, s in scores16.items() if np.isfinite(s)}
    best32, best16 = max(defined32, key=defined32.get), max(defined16, key=defined16.get)
    out = {"variants": len(scores32), "undefined": len(scores32) - len(diffs), "largest_change": diffs[worst],
           "at": worst, "median_change": float(np.median(list(diffs.values()))),
           "best_float32": best32, "best_float16": best16}
    undefined = f" ({out['undefined']} undefined)" if out["undefined"] else ""
    print(f"{name}: largest change {diffs[worst]:.4f} points at {worst} over {len(diffs)} variants{undefined}; "
          f"best {best32} (float32) / {best16} (float16)")
    return out


def main(argv: list[str] | None = None) -> int:
    from pipeline.encoder import Encoder
    from pipeline.evaldata import load_beir, load_sts
    from pipeline.metrics import retrieval_scores, sts_scores
    from pipeline.quantize import quantize
    from pipeline.request import resolve

    p = argparse.ArgumentParser(prog="python studies/float16.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--stsb", default=str(DEMO / "stsb" / "sts-test.csv"))
    p.add_argument("--scifact", default=str(DEMO / "scifact"))
    p.add_argument("--scifact-queries", type=int, default=None)
    p.add_argument("--scifact-docs", type=int, default=None)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--out", default="bench-float16")
    args = p.parse_args(argv)
    enc = Encoder.from_request(resolve(args.model, layers="all", poolings=POOLINGS, max_length=args.max_length,
                                       digest=False))
    results: dict = {"model": args.model, "max_length": args.max_length}
    t0 = time.perf_counter()
    sts = load_sts(args.stsb)
    texts = list(dict.fromkeys([*sts.sentence1, *sts.sentence2]))
    row = {t: i for i, t in enumerate(texts)}
    res = enc.encode(texts)
    a, b = [row[t] for t in sts.sentence1], [row[t] for t in sts.sentence2]
    s32, s16 = {}, {}
    for v, x in res.items():
        h = quantize("float16", x).astype(np.float32)
        s32[v.name] = sts_scores(x[a], x[b], sts.scores)["cosine_spearman"]
        s16[v.name] = sts_scores(h[a], h[b], sts.scores)["cosine_spearman"]
    results["stsb"] = {"pairs": len(sts.scores), **changes("STS-B test", s32, s16)}
    beir = load_beir(args.scifact)
    if args.scifact_queries or args.scifact_docs:
        beir = beir.subset(args.scifact_queries or len(beir.query_ids), args.scifact_docs)
    res_d, res_q = enc.encode(beir.doc_texts), enc.encode(beir.query_texts)
    r32, r16 = {}, {}
    for v in res_d:
        d, q = res_d[v], res_q[v]
        r32[v.name] = retrieval_scores(q, d, beir.query_ids, beir.doc_ids, beir.qrels)["ndcg_at_10"]
        r16[v.name] = retrieval_scores(quantize("float16", q).astype(np.float32), quantize("float16", d).astype(np.float32),
                                       beir.query_ids, beir.doc_ids, beir.qrels)["ndcg_at_10"]
    results["scifact"] = {"queries": len(beir.query_ids), "docs": len(beir.doc_ids), "name": beir.name,
                          **changes(f"{beir.name} ({len(beir.query_ids)} queries, {len(beir.doc_ids)} docs)", r32, r16)}
    results["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

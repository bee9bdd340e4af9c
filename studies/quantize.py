"""``python studies/quantize.py``: what int8 and binary outputs cost in retrieval quality, and save.

SciFact test over its full corpus (5,183 documents, 300 queries; ``evaldata.load_beir``), for
two variants: SmolLM2-135M's best raw cell on SciFact (``L1.mean``, docs/findings.md's families
table) and all-MiniLM-L6-v2 (last layer, mean pooling, L2-normalised as MTEB does); documents and
queries cut at 256 tokens (``--model``, ``--layers``, ``--pooling`` measure one other variant instead). The float32 vectors are embedded once with the in-process
``Encoder`` and cached (``--cache``), so a rerun only measures.

Per output dtype (float32, float16, int8, binary, binary + rescoring) the documents are stored
as ``strata embed`` stores them (one Parquet part, ``quantize.quantize``; int8 ranges calibrated
on the first 1,000 documents, as ``embed`` calibrates on its input's first rows), indexed with
``index.build_index`` (kind ``flat``) and searched with ``LoadedIndex.search`` (top 10, float
queries; binary: their sign bits; rescoring: ``rescore`` x 10 candidates re-scored with the
float query). Reported: nDCG@10 (x100, ``metrics``; the top 10 is all nDCG@10 reads), recall@10
against float32's top 10, bytes per stored vector and per vector of the index file, the index
build time and the search time for all queries (median of ``--repeats``; every dtype is timed
in each repeat, side by side, FAISS on one thread). Timings on a shared machine are noisy:
read the medians and the ratios, not the milliseconds. Writes ``{out}/quantize.json|md`` (docs/indexes.md
quotes the table).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: this checkout's pipeline, not another installed one
    sys.path.insert(0, str(ROOT))

from pipeline import quantize as qz  # noqa: E402
from pipeline.bench.measure import write_study  # noqa: E402
from pipeline.evaldata import default_data_dir, load_beir  # noqa: E402
from pipeline.metrics import retrieval_scores_from_run  # noqa: E402

VARIANTS = [
    {"label": "SmolLM2-135M `L1.mean`", "model": "smollm2-135m", "layers": "1", "pooling": "mean", "normalize": False},
    {"label": "all-MiniLM-L6-v2 `L6.mean`", "model": "all-minilm-l6-v2", "layers": "-1", "pooling": "mean",
     "normalize": True},
]
DTYPES = [("float32", 0), ("float16", 0), ("int8", 0), ("binary", 0), ("binary", None)]  # None: --rescore
MAX_LENGTH = 256
K = 10


def embed_cached(spec: dict, data, cache: Path, max_length: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(documents, queries) float32 vectors of one variant, from the cache or embedded now."""
    from pipeline.encoder import Encoder
    from pipeline.request import resolve

    model = re.sub(r"[^A-Za-z0-9_.-]", "_", spec["model"])  # a model directory's path, flattened
    key = f"{model}-L{spec['layers']}.{spec['pooling']}-{max_length}-{'norm' if spec['normalize'] else 'raw'}"
    path = cache / f"scifact-{data.split}-{len(data.doc_ids)}-{len(data.query_ids)}-{key}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        if list(z["doc_ids"]) == list(data.doc_ids):
            return z["docs"], z["queries"], float(z["seconds"])
    request = resolve(spec["model"], layers=spec["layers"], poolings=spec["pooling"], max_length=max_length,
                      normalize=spec["normalize"], digest=False)
    encoder = Encoder.from_request(request)
    t0 = time.perf_counter()
    res = encoder.encode(list(data.doc_texts) + list(data.query_texts))
    seconds = time.perf_counter() - t0
    (v,) = request.variants
    x = np.asarray(res[v], dtype=np.float32)
    docs, queries = x[: len(data.doc_ids)], x[len(data.doc_ids):]
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, docs=docs, queries=queries, doc_ids=np.array(data.doc_ids), seconds=seconds)
    print(f"  embedded {len(x):,} texts in {seconds:.0f}s -> {path}", flush=True)
    return docs, queries, seconds


def measure(docs: np.ndarray, queries: np.ndarray, data, work: Path, repeats: int, rescore: int) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.index import build_index, load_index, recall_at_k

    ranges = qz.calibrate(docs[:qz.DEFAULT_CALIBRATION_ROWS])
    cases = []
    for dtype, mult in DTYPES:
        mult = rescore if mult is None else mult
        name = dtype + (f" + rescore x{mult}" if mult else "")
        folder = work / name.replace(" ", "").replace("+", "_")
        folder.mkdir(parents=True, exist_ok=True)
        stored = qz.quantize(dtype, docs, ranges)
        part = folder / "part-0.parquet"
        pq.write_table(pa.table({"id": list(data.doc_ids), "emb": qz.to_arrow(stored)}), part)
        cases.append({"name": name, "dtype": dtype, "rescore": mult, "part": part, "index": folder / "emb.faiss",
                      "bytes_stored": qz.bytes_per_vector(dtype, docs.shape[1]), "build": [], "search": []})

    def build(c):
        return build_index([c["part"]], "emb", c["index"], "flat", dtype=c["dtype"],
                           ranges=ranges if c["dtype"] == "int8" else None, rescore=c["rescore"])

    for r in range(repeats + 1):  # repeat 0 warms up (file cache, FAISS), and is not counted
        for c in cases:
            t0 = time.perf_counter()
            build(c)
            t1 = time.perf_counter()
            loaded = load_index(c["index"])
            t2 = time.perf_counter()
            scores, ids = loaded.search(queries, K)
            t3 = time.perf_counter()
            if r:
                c["build"].append(t1 - t0)
                c["search"].append(t3 - t2)
            c["ids"], c["scores"] = ids, scores
    exact = cases[0]["ids"]
    rows = []
    for c in cases:
        run = {q: {d: float(s) for d, s in zip(row_ids, row_s) if d is not None}
               for q, row_s, row_ids in zip(data.query_ids, c["scores"], c["ids"])}
        ndcg = retrieval_scores_from_run(run, data.qrels)["ndcg_at_10"]
        rows.append({"dtype": c["name"], "ndcg_at_10": ndcg, "recall_at_10_vs_float32": recall_at_k(c["ids"], exact, K),
                     "bytes_stored": c["bytes_stored"],
                     "bytes_index": c["index"].stat().st_size / len(docs),
                     "build_ms": 1000 * statistics.median(c["build"]),
                     "search_ms": 1000 * statistics.median(c["search"]),
                     "build_ms_all": [round(1000 * t, 2) for t in c["build"]],
                     "search_ms_all": [round(1000 * t, 2) for t in c["search"]]})
    return rows


def to_markdown(result: dict) -> str:
    lines = [f"SciFact test, full corpus ({result['docs']:,} documents, {result['queries']} queries), max length "
             f"{result['max_length']}; flat indexes, top {K}; times are medians of {result['repeats']} repeats, "
             f"FAISS on one thread, on {result['machine']}.", ""]
    for v in result["variants"]:
        base = v["rows"][0]
        lines += [f"**{v['label']}** (dim {v['dim']})", "",
                  "| output | nDCG@10 | recall@10 vs float32 | bytes/vector stored | bytes/vector index "
                  "| index build ms | search ms (all queries) | search vs float32 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in v["rows"]:
            lines.append(f"| {r['dtype']} | {r['ndcg_at_10']:.2f} | {r['recall_at_10_vs_float32']:.3f} | "
                         f"{r['bytes_stored']:,} | {r['bytes_index']:,.0f} | {r['build_ms']:.1f} | "
                         f"{r['search_ms']:.1f} | {base['search_ms'] / r['search_ms']:.1f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python studies/quantize.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(default_data_dir()), help="folder with scifact/ (default: %(default)s)")
    p.add_argument("--out", default="bench-quantize", help="writes quantize.json and quantize.md here")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "strata-quantize-cache"),
                   help="float32 embeddings are cached here (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rescore", type=int, default=4, help="rescore multiplier of the last row (default: %(default)s)")
    p.add_argument("--only", choices=["smollm2", "minilm"], default=None)
    p.add_argument("--model", default=None, help="measure this model's one variant instead of the two above")
    p.add_argument("--layers", default="-1", help="with --model: its layer (default: %(default)s)")
    p.add_argument("--pooling", default="mean", help="with --model: its pooling (default: %(default)s)")
    p.add_argument("--normalize", action="store_true", help="with --model: L2-normalise its vectors")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH)
    args = p.parse_args(argv)

    import os
    import platform

    import faiss

    faiss.omp_set_num_threads(1)
    data = load_beir(Path(args.data) / "scifact", split="test")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"docs": len(data.doc_ids), "queries": len(data.query_ids), "max_length": args.max_length,
              "repeats": args.repeats, "rescore": args.rescore,
              "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), shared", "variants": []}
    specs = VARIANTS if not args.model else [
        {"label": f"{Path(args.model).name} `L{args.layers}.{args.pooling}`", "model": args.model,
         "layers": args.layers, "pooling": args.pooling, "normalize": args.normalize}]
    for spec in specs:
        if args.only and args.only not in spec["model"]:
            continue
        print(f"{spec['label']}:", flush=True)
        docs, queries, seconds = embed_cached(spec, data, Path(args.cache), args.max_length)
        with tempfile.TemporaryDirectory() as work:
            rows = measure(docs, queries, data, Path(work), args.repeats, args.rescore)
        result["variants"].append({**spec, "dim": int(docs.shape[1]), "embed_seconds": seconds, "rows": rows})
        for r in rows:
            print(f"  {r['dtype']:>20}: nDCG@10 {r['ndcg_at_10']:.2f}, recall@10 {r['recall_at_10_vs_float32']:.3f}, "
                  f"build {r['build_ms']:.1f} ms, search {r['search_ms']:.1f} ms", flush=True)
    write_study(out, "quantize", result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

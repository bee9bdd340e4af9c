"""``python studies/index_recall.py``: recall@10 of each approximate index against an exact flat one,
and IVF-PQ's recall/latency curve over nprobe x rerank (the measurement behind the defaults in
``pipeline/index/params.py``).

The measurement behind docs/indexes.md's recall figures. SciFact's corpus (5,183 documents; the
300 test queries), all-MiniLM-L6-v2 (last layer, mean pooling, its own max length 256) unless
``--model``/``--layers``/``--pooling`` say otherwise. What ``strata index`` does, through the
library it calls:

1. the documents and the queries are embedded in-process with one request (``Encoder.from_request``:
   the engine ``strata embed``'s actors run) and the documents written as a Strata output of
   ``--parts`` committed parts (corpus order; the on-disk contract of ARCHITECTURE.md: ``manifest.json``,
   ``embeddings/{shard}/part-0.parquet`` with ``id`` and the variant's column);
2. the local engine (``index.build_index`` over the committed parts, as ``strata index --kind K``)
   builds ``flat`` (exact: the reference), ``hnsw`` and ``ivfpq`` (with its exact re-ranking) with
   their default parameters; the Ray engine (``index.ray.build_ivfpq_ray``, as ``strata index
   --engine ray``) builds the on-disk IVF-PQ, one encode task per part;
3. the queries are searched through each index (``index.load_index``; IVF-PQ at every
   ``--nprobe`` x ``--rerank``, with the median wall time per query of ``--repeats`` searches on
   one FAISS thread); recall@k is ``index.recall_at_k`` of its top k against flat's.

``--synthetic N`` replaces the model and SciFact with N vectors of a seeded Gaussian mixture
(``--dim``, 1 centre per 1,000 vectors, unequal spreads) and 1,000 queries drawn from the same
mixture but not indexed; ``--no-ray`` skips the Ray engine (its index is the local engine's, same
sample and seed, so its curve is the same; the tests assert it).

Prints the table and writes ``{out}/index_recall.json|md``. Each index's parameters are read back
from the JSON written beside it, so the table says what was built (nlist, m, nbits, efSearch, ...).
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

from pipeline.bench.measure import git_commit, write_study  # noqa: E402
from pipeline.evaldata import default_data_dir, load_beir  # noqa: E402

K = 10


def write_output(folder: Path, variant, ids: list[str], x: np.ndarray, parts: int) -> Path:
    """A Strata output of one float32 column, ``parts`` committed parts of (nearly) equal size, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bounds = np.linspace(0, len(ids), parts + 1).astype(int)
    shards = []
    for p, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = folder / "embeddings" / f"d{p:05d}" / "part-0.parquet"
        part.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": pa.array(ids[lo:hi], pa.string()), variant.column:
                                 pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].ravel(), pa.float32()),
                                                                   x.shape[1])}), part)
        shards.append({"path": f"documents/{p:05d}", "output": f"embeddings/d{p:05d}", "files": ["part-0.parquet"],
                       "rows": int(hi - lo)})
    manifest = {"signature": {"dtype": "float32"}, "shards": shards,
                "variants": [{"name": variant.name, "column": variant.column, "layer": variant.layer,
                              "pooling": variant.pooling, "template": variant.template, "dim": int(x.shape[1]),
                              "dtype": "float32"}]}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return folder


def describe(params: dict) -> str:
    """An index's parameters as its JSON records them (those its kind uses)."""
    keys = {"hnsw": ("hnsw_M", "efConstruction", "efSearch"), "ivfpq": ("nlist", "m", "nbits", "rerank", "train_rows")}
    return ", ".join(f"{k} {params[k]}" for k in keys.get(params["kind"], ()) if params.get(k) is not None) or "exact"


def synthetic(n: int, dim: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` indexed vectors and ``queries`` held-out ones from one seeded Gaussian mixture (module doc)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 1000), dim)).astype(np.float32)
    spread = rng.uniform(0.5, 2.0, len(centres)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for lo in range(0, m, 100_000):
            c = rng.integers(0, len(centres), min(100_000, m - lo))
            out[lo:lo + len(c)] = centres[c] + spread[c, None] * rng.standard_normal((len(c), dim), dtype=np.float32)
        return out

    return draw(n), draw(queries)


def vectors(args):
    """(variant, doc ids, docs, queries, (query ids, qrels) or None, details): the model on SciFact, or synthetic."""
    from pipeline.variants import Variant

    if args.synthetic:
        docs, queries = synthetic(args.synthetic, args.dim, args.queries)
        return (Variant(1, "mean"), [f"v{i}" for i in range(len(docs))], docs, queries, None,
                {"model": "synthetic", "data": "Gaussian mixture, seed 0", "max_length": None, "embed_seconds": 0})
    from pipeline.encoder import Encoder
    from pipeline.request import resolve

    data = load_beir(Path(args.data) / "scifact", split=args.split)
    request = resolve(args.model, layers=args.layers, poolings=args.pooling, max_length=args.max_length)
    (variant,) = request.variants
    t0 = time.perf_counter()
    res = Encoder.from_request(request).encode([*data.doc_texts, *data.query_texts])
    x = np.asarray(res[variant], dtype=np.float32)
    embed_s = time.perf_counter() - t0
    print(f"  embedded {len(x):,} texts ({res.stats.tokens:,} tokens) in {embed_s:.0f}s", flush=True)
    return (variant, list(data.doc_ids), x[:len(data.doc_ids)], x[len(data.doc_ids):],
            (list(data.query_ids), data.qrels), {"model": request.model.name, "data": f"{data.name}/{data.split}",
             "max_length": request.settings.max_length, "embed_seconds": round(embed_s, 1)})


def measure(args) -> dict:
    import shutil

    import faiss

    from pipeline.index import build_index, committed_files, index_path, load_index, recall_at_k
    from pipeline.index.ray import build_ivfpq_ray
    from pipeline.raystart import connect

    faiss.omp_set_num_threads(args.threads)  # builds; every timed search runs on one thread
    work = Path(args.work)
    from pipeline.metrics import retrieval_scores_from_run

    variant, doc_ids, docs, queries, judged, details = vectors(args)

    def ndcg(found) -> float | None:
        """nDCG@10 (x100) of a top-10 run against SciFact's qrels (ranks as scores); None when synthetic."""
        if judged is None:
            return None
        run = {str(q): {d: -r for r, d in enumerate(row) if d is not None} for q, row in zip(judged[0], found)}
        return retrieval_scores_from_run(run, judged[1])["ndcg_at_10"]
    out = work / "output"
    shutil.rmtree(work, ignore_errors=True)
    write_output(out, variant, doc_ids, docs, args.parts)
    files = [out / f for f in committed_files(json.loads((out / "manifest.json").read_text()))]

    def timed(path, **knobs):
        faiss.omp_set_num_threads(1)
        ix = load_index(path, **knobs)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            found = ix.search(queries, K)[1]
            times.append(time.perf_counter() - t0)
        return found, 1000 * float(np.median(times)) / len(queries)

    built, rows = {}, []
    kinds = ("flat", "ivfpq") if args.synthetic else ("flat", "hnsw", "ivfpq")
    for kind in kinds:
        faiss.omp_set_num_threads(args.threads)
        t0 = time.perf_counter()
        built[kind] = build_index(files, variant.column, work / "local" / f"{kind}.faiss", kind)
        print(f"  {kind}: built in {time.perf_counter() - t0:.1f}s ({describe(built[kind])})", flush=True)
    exact, exact_ms = timed(work / "local" / "flat.faiss")
    rows.append({"index": "flat", "engine": "local", "parameters": "exact", "nprobe": None, "rerank": None,
                 "recall": 1.0, "ms_per_query": exact_ms, "ndcg_at_10": ndcg(exact)})
    if "hnsw" in built:
        found, ms = timed(work / "local" / "hnsw.faiss")
        rows.append({"index": "hnsw", "engine": "local", "parameters": describe(built["hnsw"]), "nprobe": None,
                     "rerank": None, "recall": recall_at_k(found, exact, K), "ms_per_query": ms,
                     "ndcg_at_10": ndcg(found)})
    engines = [("local", work / "local" / "ivfpq.faiss", built["ivfpq"])]
    if not args.no_ray:
        started = not __import__("ray").is_initialized()  # a caller's Ray (a test's) is used as it is
        ray = connect(None)
        try:
            t0 = time.perf_counter()
            params = build_ivfpq_ray(out, [variant])[variant]
            print(f"  ivfpq on Ray: {len(files)} parts, built in {time.perf_counter() - t0:.1f}s ({describe(params)})",
                  flush=True)
        finally:
            if started:
                ray.shutdown()
        engines.append((f"ray ({len(files)} parts)", index_path(out, variant), params))
    nlist = built["ivfpq"]["nlist"]
    nprobes = [n for n in args.nprobe if n <= nlist] or [nlist]
    for engine, path, params in engines:  # first at the index's own defaults, then the grid
        found, ms = timed(path)
        rows.append({"index": "ivfpq", "engine": engine, "parameters": describe(params), "nprobe": params["nprobe"],
                     "rerank": params["rerank"], "recall": recall_at_k(found, exact, K), "ms_per_query": ms,
                     "ndcg_at_10": ndcg(found), "defaults": True})
        for nprobe in nprobes:
            for rerank in args.rerank:
                found, ms = timed(path, nprobe=nprobe, rerank=rerank)
                rows.append({"index": "ivfpq", "engine": engine, "parameters": describe(params), "nprobe": nprobe,
                             "rerank": rerank, "recall": recall_at_k(found, exact, K), "ms_per_query": ms,
                             "ndcg_at_10": ndcg(found)})
            print(f"  {engine} nprobe {nprobe}: " + ", ".join(f"r{r['rerank']} {r['recall']:.3f}" for r in rows[-len(args.rerank):]),
                  flush=True)
    return {**details, "variant": variant.name, "documents": len(doc_ids), "queries": len(queries),
            "dim": int(docs.shape[1]), "parts": len(files), "k": K, "nlist": nlist, "rows": rows}


def to_markdown(result: dict) -> str:
    lines = [f"{result['data']}: {result['documents']:,} documents, {result['queries']:,} queries; {result['model']} "
             f"`{result['variant']}` (dim {result['dim']}, max length {result['max_length']}); recall@{result['k']} "
             f"against the exact flat index; search time per query on one FAISS thread (median of "
             f"{result['repeats']}). Commit {result['commit']}.", "",
             f"| index | engine | parameters | nprobe | rerank | recall@{result['k']} | ms/query | nDCG@10 |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ndcg = "–" if r.get("ndcg_at_10") is None else f"{r['ndcg_at_10']:.2f}"
        lines.append(f"| {r['index']} | {r['engine']}{' (defaults)' if r.get('defaults') else ''} | {r['parameters']} | "
                     f"{r['nprobe'] or '–'} | {r['rerank'] or '–'} | {r['recall']:.3f} | {r['ms_per_query']:.3f} | "
                     f"{ndcg} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python studies/index_recall.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="all-minilm-l6-v2")
    p.add_argument("--layers", default="-1")
    p.add_argument("--pooling", default="mean")
    p.add_argument("--max-length", type=int, default=None, help="default: the model's own")
    p.add_argument("--data", default=str(default_data_dir()), help="folder with scifact/ (default: %(default)s)")
    p.add_argument("--split", default="test", help="whose judged queries are searched (default: %(default)s)")
    p.add_argument("--parts", type=int, default=4, help="shards, so committed parts and Ray encode tasks")
    p.add_argument("--nprobe", default="1,2,4,8,16,32,64,128,256",
                   help="IVF lists searched, comma-separated; those above nlist are skipped (default: %(default)s)")
    p.add_argument("--rerank", default="1,2,4,8,16", help="re-rank depths, comma-separated (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="searches timed per setting; the median is kept")
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="N synthetic vectors instead of SciFact")
    p.add_argument("--dim", type=int, default=384, help="--synthetic: the vectors' dim (default: %(default)s)")
    p.add_argument("--queries", type=int, default=1000, help="--synthetic: held-out queries (default: %(default)s)")
    p.add_argument("--no-ray", action="store_true", help="the local engine only")
    p.add_argument("--threads", type=int, default=1, help="FAISS threads for the builds (searches: 1)")
    p.add_argument("--work", default="bench-index-recall/work", help="the output and its indexes (replaced)")
    p.add_argument("--out", default="bench-index-recall", help="writes index_recall.json and index_recall.md here")
    args = p.parse_args(argv)
    args.nprobe = [int(n) for n in args.nprobe.split(",")]
    args.rerank = [int(n) for n in args.rerank.split(",")]
    t0 = time.perf_counter()
    result = {**measure(args), "commit": git_commit(__file__) or "-", "repeats": args.repeats,
              "argv": sys.argv[1:] if argv is None else list(argv)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    written = write_study(args.out, "index_recall", result, to_markdown(result))
    print(f"{result['seconds']:.0f}s; written: {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

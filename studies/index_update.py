"""``python studies/index_update.py``: an index updated as its output changes, against a fresh build.

SciFact's corpus (5,183 documents) embedded by ``strata embed`` (all-MiniLM-L6-v2, last layer, mean
pooling, on the local Ray) from ``--shards`` Parquet shards, and indexed (``index.build_indexes``,
kind ``--kind``). Then, as a scheduled job would see it:

1. ``--share`` of the documents (seeded) deleted upstream: embed again (the changed shards' other rows
   are copied), index again: the index is *updated* (their labels deleted);
2. the same documents added back in a new shard under new ids: embed again (embedded anew: their
   texts left the output with the replaced shards), index again: updated (added at the end).

The updated index is then compared, on SciFact's 300 test queries (top 10), with two references
built from the output as it now is: a fresh build (``build_indexes`` in a copy with no index: for
IVF-PQ a newly trained quantiser) and the updated index's own trained quantiser refilled with every
current row (what the update promises to equal, up to ties). Per comparison: the share of queries
whose top-10 ids are identical (new ids mapped back to the documents'), recall@10, and each index's
nDCG@10 (trec_eval's, as ``strata eval`` reports it).

Prints the table and writes ``{out}/index_update.json|md``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: this checkout's pipeline, not another installed one
    sys.path.insert(0, str(ROOT))

from pipeline.bench.measure import git_commit, write_study  # noqa: E402
from pipeline.evaldata import default_data_dir, load_beir  # noqa: E402

K = 10


def write_shards(folder: Path, ids: list[str], texts: list[str], shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cut = np.linspace(0, len(ids), shards + 1).astype(int)
    for s in range(shards):
        pq.write_table(pa.table({"id": ids[cut[s]:cut[s + 1]], "text": texts[cut[s]:cut[s + 1]]}),
                       folder / f"shard-{s:02d}.parquet")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python studies/index_update.py", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(default_data_dir() / "scifact"))
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--kind", action="append", help="index kinds (default: flat and ivfpq)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--share", type=float, default=0.10, help="share of documents deleted, then added back")
    ap.add_argument("--max-docs", type=int, default=None, help="a corpus subset (smoke runs)")
    ap.add_argument("--out", default="studies/out")
    args = ap.parse_args(argv)
    kinds = args.kind or ["flat", "ivfpq"]

    import faiss

    from pipeline import Encoder
    from pipeline.index import build_indexes, load_index, recall_at_k
    from pipeline.metrics import retrieval_scores_from_run
    from pipeline.request import resolve
    from pipeline.runner import embed, read_embeddings

    data = load_beir(args.data, split="test")
    if args.max_docs:
        data = data.subset(len(data.query_ids), args.max_docs)
    request = resolve(args.model, layers="-1", poolings="mean", digest=False)
    (variant,) = request.variants
    work = Path(tempfile.mkdtemp(prefix="strata-index-update-"))
    src, out = work / "in", work / "out"
    write_shards(src, data.doc_ids, data.doc_texts, args.shards)

    def run_embed() -> dict:
        t0 = time.perf_counter()
        s = embed(request, str(src), str(out), id_column="id", progress=False)
        return {"rows_embedded": s.rows_embedded, "rows_reused": s.rows_reused, "seconds": round(time.perf_counter() - t0, 1)}

    steps = [{"step": "embed", **run_embed()}]
    rng = np.random.default_rng(0)
    gone = set(rng.choice(data.doc_ids, size=int(round(args.share * len(data.doc_ids))), replace=False).tolist())
    queries = Encoder.from_request(request).encode(data.query_texts)[variant]
    results = {"git_commit": None, "model": args.model, "variant": variant.name, "docs": len(data.doc_ids),
               "deleted_then_added": len(gone), "shards": args.shards, "kinds": {}}
    indexes = {}

    def index(kind: str) -> dict:
        """The output as it now is, beside the kind's own indexes (one folder per kind: a variant has one index)."""
        mine = work / f"out-{kind}"
        kept = mine / "indexes"
        if kept.exists():
            shutil.move(kept, work / "indexes-aside")
        shutil.rmtree(mine, ignore_errors=True)
        shutil.copytree(out, mine)
        if (work / "indexes-aside").exists():
            shutil.move(work / "indexes-aside", kept)
        return next(iter(build_indexes(mine, [variant], kind).values()))

    for kind in kinds:
        index(kind)
    # 1. delete: every shard rewritten without the chosen documents
    for f in sorted(src.glob("shard-*.parquet")):
        t = pq.read_table(f)
        keep = np.array([i not in gone for i in t.column("id").to_pylist()])
        pq.write_table(t.filter(pa.array(keep)), f)
    steps.append({"step": f"delete {len(gone):,}", **run_embed()})
    for kind in kinds:
        indexes.setdefault(kind, []).append(index(kind))
    # 2. add back under new ids, in a new shard
    back = [(i, t) for i, t in zip(data.doc_ids, data.doc_texts) if i in gone]
    pq.write_table(pa.table({"id": [f"re-{i}" for i, _ in back], "text": [t for _, t in back]}),
                   src / "shard-back.parquet")
    steps.append({"step": f"add back {len(back):,} under new ids", **run_embed()})
    for kind in kinds:
        indexes[kind].append(index(kind))

    def ndcg(ids: list[list[str]], scores) -> float:
        run = {q: {d: float(s) for d, s in zip(row, srow) if d} for q, row, srow in zip(data.query_ids, ids, scores)}
        return retrieval_scores_from_run(run, data.qrels)["ndcg_at_10"]

    for kind in kinds:
        updated = load_index(work / f"out-{kind}" / "indexes" / f"{variant.name}.faiss")
        fresh_dir = work / f"fresh-{kind}"
        shutil.copytree(out, fresh_dir, ignore=shutil.ignore_patterns("indexes"))
        build_indexes(fresh_dir, [variant], kind)
        fresh = load_index(fresh_dir / "indexes" / f"{variant.name}.faiss")
        refill = load_index(work / f"out-{kind}" / "indexes" / f"{variant.name}.faiss")
        stored = read_embeddings(str(out), ["id", variant.column])
        vec = dict(zip(stored.column("id").to_pylist(), stored.column(variant.column).to_numpy(zero_copy_only=False)))
        x = np.stack([vec[i] for i in refill.ids]).astype(np.float32)
        faiss.normalize_L2(x)
        refill.index.reset()
        refill.index.add(x)
        row = {"updates": [p.get("update") or {"rebuilt": p.get("rebuilt")} for p in indexes[kind]]}
        got = {}
        for name, loaded in (("updated", updated), ("fresh build", fresh), ("same quantiser, refilled", refill)):
            scores, ids = loaded.search(queries, K)
            ids = [[i[3:] if i and i.startswith("re-") else i for i in r] for r in ids]  # new ids -> the document
            got[name] = ids
            row[name] = {"ndcg_at_10": round(ndcg(ids, scores), 2)}
        for name in ("fresh build", "same quantiser, refilled"):
            same = np.mean([a == b for a, b in zip(got["updated"], got[name])])
            row[name] |= {"identical_top10": round(float(same), 4),
                          "recall_at_10_of_updated": round(recall_at_k(got["updated"], got[name], K), 4)}
        results["kinds"][kind] = row
    results["steps"] = steps
    results["git_commit"] = git_commit()
    lines = [f"Measured by `python studies/index_update.py` at {results['git_commit']}: SciFact, {args.model} "
             f"{variant.name}, {len(gone):,} of {len(data.doc_ids):,} documents deleted, then added back under new ids.",
             "", "| kind | updates | nDCG@10 updated | fresh build: nDCG@10, identical top-10, recall@10 | same "
                 "quantiser refilled: nDCG@10, identical top-10, recall@10 |", "|---|---|---|---|---|"]
    for kind, r in results["kinds"].items():
        ups = "; ".join(f"-{u['deleted']} +{u['added']}" if "deleted" in u else f"rebuilt ({u['rebuilt']})"
                        for u in r["updates"])
        f, s = r["fresh build"], r["same quantiser, refilled"]
        lines.append(f"| {kind} | {ups} | {r['updated']['ndcg_at_10']:.2f} | {f['ndcg_at_10']:.2f}, "
                     f"{f['identical_top10']:.1%}, {f['recall_at_10_of_updated']:.4f} | {s['ndcg_at_10']:.2f}, "
                     f"{s['identical_top10']:.1%}, {s['recall_at_10_of_updated']:.4f} |")
    lines += ["", "Embedding steps: " + "; ".join(f"{s['step']}: {s['rows_embedded']:,} embedded, "
                                                  f"{s['rows_reused']:,} copied, {s['seconds']} s" for s in steps)]
    write_study(args.out, "index_update", results, "\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

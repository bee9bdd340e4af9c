"""Evaluation through the pipeline: texts -> ``embed`` -> metrics -> tidy results rows.

Evaluation texts become Parquet shards under ``DIR/inputs/`` (one per dataset part, ids are
text digests, duplicates embedded once) and are embedded by the same Ray pipeline as any
corpus into ``DIR`` itself. A shard is rewritten only when its texts change, so evaluating the
same model and variants again re-embeds nothing; a new dataset embeds only its own texts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .evaldata import BeirData, StsData, load_beir, load_sts
from .metrics import retrieval_scores, sts_scores
from .runner import EmbedSummary, embed, read_embeddings
from .storage import safe_name
from .variants import Variant

RESULTS = Path("eval") / "results.json"


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:24]


def stage_texts(out_dir: Path, name: str, *parts: list[str]) -> list[list[str]]:
    """Write the unique texts of ``parts`` as ``inputs/{name}.parquet`` (unless already there).

    Returns the text ids of each part, in order. One shard per dataset, so a text shared by
    two parts (an STS sentence on both sides, say) is embedded once.
    """
    ids = [[text_id(t) for t in texts] for texts in parts]
    unique = {i: t for part_ids, texts in zip(ids, parts) for i, t in zip(part_ids, texts)}
    table = pa.table({"id": list(unique), "text": list(unique.values())})
    path = out_dir / "inputs" / f"{safe_name(name)}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or not pq.read_table(path).equals(table):
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
    return ids


def embed_staged(out_dir: Path, embed_options: dict) -> tuple[dict[str, dict[str, np.ndarray]], EmbedSummary]:
    """Embed everything under inputs/ (incremental) and load {variant: {id: vector}} back."""
    summary = embed(str(out_dir / "inputs"), str(out_dir), id_column="id", **embed_options)
    table = read_embeddings(str(out_dir))
    ids = table.column("id").to_pylist()
    vectors = {}
    for col in table.column_names:
        if col.startswith("emb_"):
            arr = table.column(col).combine_chunks()
            dim = arr.type.list_size
            mat = arr.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
            vectors[Variant.parse(col).name] = (ids, mat)
    return vectors, summary


def _lookup(vectors, variant: str, ids: list[str]) -> np.ndarray:
    all_ids, mat = vectors[variant]
    index = {i: k for k, i in enumerate(all_ids)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise RuntimeError(f"{len(missing)} evaluation text(s) have no embedding in {variant}")
    return mat[[index[i] for i in ids]]


def _rows(task: str, data_name: str, split: str, variant: str, scores: dict[str, float]) -> list[dict]:
    v = Variant.parse(variant)
    return [{"task": task, "dataset": data_name, "split": split, "metric": metric, "layer": v.layer,
             "pooling": v.pooling, "score": float(score)} for metric, score in scores.items()]


def eval_sts(data: StsData | str | Path, out_dir: str | Path, **embed_options) -> list[dict]:
    """Spearman and Pearson (x100) of cosine similarity vs gold, for every variant."""
    out_dir = Path(out_dir)
    data = data if isinstance(data, StsData) else load_sts(data)
    ids1, ids2 = stage_texts(out_dir, f"{data.name}-{data.split}", data.sentence1, data.sentence2)
    vectors, _ = embed_staged(out_dir, embed_options)
    rows = []
    for variant in vectors:
        scores = sts_scores(_lookup(vectors, variant, ids1), _lookup(vectors, variant, ids2), data.scores)
        rows += _rows("sts", data.name, data.split, variant, scores)
    merge_results(out_dir, rows)
    return rows


def eval_retrieval(data: BeirData | str | Path, out_dir: str | Path, *, split: str = "test",
                   max_queries: int | None = None, max_docs: int | None = None, **embed_options) -> list[dict]:
    """nDCG@10, Recall@100 and MRR@10 (x100) over the whole (or subset) corpus, for every variant."""
    out_dir = Path(out_dir)
    data = data if isinstance(data, BeirData) else load_beir(data, split=split)
    if max_queries or max_docs:
        data = data.subset(max_queries or len(data.query_ids), max_docs)
    doc_ids, q_ids = stage_texts(out_dir, f"{data.name}-{data.split}", data.doc_texts, data.query_texts)
    vectors, _ = embed_staged(out_dir, embed_options)
    rows = []
    for variant in vectors:
        scores = retrieval_scores(_lookup(vectors, variant, q_ids), _lookup(vectors, variant, doc_ids),
                                  data.query_ids, data.doc_ids, data.qrels)
        rows += _rows("retrieval", data.name, data.split, variant, scores)
    merge_results(out_dir, rows)
    return rows


def _key(r: dict) -> tuple:
    return (r["task"], r["dataset"], r["split"], r["metric"], r["layer"], r["pooling"])


def merge_results(out_dir: Path, rows: list[dict]) -> list[dict]:
    """Add rows to DIR/eval/results.json, replacing rows with the same key."""
    path = Path(out_dir) / RESULTS
    existing = json.loads(path.read_text()) if path.exists() else []
    merged = {_key(r): r for r in existing}
    merged.update({_key(r): r for r in rows})
    out = sorted(merged.values(), key=_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    return out


EVALUATORS: dict[str, Callable] = {"sts": eval_sts, "retrieval": eval_retrieval}

"""Evaluators with MTEB's shape: (an encoder, a dataset) -> tidy results rows.

An encoder is anything with ``encode(texts) -> {Variant: (n, dim) array}`` (``TextEncoder``).
Two implement it:

- ``Encoder`` (``pipeline.encoder``): in-process, no Ray; for small sets and probes;
- ``RayEncoder`` (below): the Ray pipeline over a cache directory. Texts become Parquet shards
  under ``DIR/inputs/`` (ids are text digests), are embedded by ``embed`` into ``DIR``, and
  are read back by id. Only texts the cache lacks are staged, so evaluating again re-embeds
  nothing and a new dataset embeds only its new texts. Each embedding run starts its actors and
  loads the model: ``prefetch(texts)`` embeds several evaluations' texts (``texts_of`` each
  one's data) in one run, as a job and the demo do.

``evaluate_sts`` / ``evaluate_retrieval`` take either, and a ``quantize.Quantized`` to score an
int8 or binary output as its index would (rows then carry ``quantization``; the encoders always
give floats, ``quantize.float_request``). ``eval_sts`` / ``eval_retrieval`` are
the command's entry points: they load the data, choose the engine (``auto``: in-process up to
``LOCAL_MAX_TEXTS`` unique texts, Ray above), and merge the rows into ``DIR/eval/results.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import quantize
from .derive import Derivations, check_held_out, derive, save_fitted
from .evaldata import BeirData, StsData, load_beir, load_sts
from .metrics import retrieval_scores, retrieval_scores_from_run, sts_scores
from .report import merge_results
from .request import Request, signature_difference
from .parts import write_part
from .storage import Output, write_json_atomic
from .variants import SpecError, Variant

log = logging.getLogger(__name__)

ENGINES = ("auto", "local", "ray")
# ``auto`` evaluates in-process up to this many unique texts (STS-B test has 2,552; SciFact
# 5,483 with its queries): no Ray start-up and no staging, and on one machine the same speed.
# Above it the Ray pipeline's cache (nothing embedded twice) and its scale-out pay off.
LOCAL_MAX_TEXTS = 10_000


class TextEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> Mapping[Variant, np.ndarray]: ...


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:24]


def unique_texts(*parts: Sequence[str]) -> tuple[list[str], list[np.ndarray]]:
    """The unique texts of ``parts`` and, per part, each text's row in that list."""
    where: dict[str, int] = {}
    for part in parts:
        for t in part:
            where.setdefault(t, len(where))
    return list(where), [np.fromiter((where[t] for t in part), dtype=np.int64, count=len(part)) for part in parts]


def _rows(task: str, dataset: str, split: str, variant: Variant, scores: dict[str, float],
          fitted: dict | None = None, quantized: quantize.Quantized | None = None,
          index: str | None = None) -> list[dict]:
    extra = {"fitted_on": fitted_on_text(fitted)} if fitted else {}
    if quantized is not None or index:  # scored through an index: a group of its own (``index:hnsw``, ...)
        extra["quantization"] = "+".join(([quantized.label(task)] if quantized is not None else [])
                                         + ([f"index:{index}"] if index else []))
    return [{"task": task, "dataset": dataset, "split": split, "metric": metric, **variant.row_fields,
             "score": float(score), **extra} for metric, score in scores.items()]


def fitted_on_text(record: dict) -> str:
    """One line saying what each fitted piece of a variant saw."""
    parts = []
    if "mix" in record:
        m = record["mix"]
        parts.append(f"mix weights fitted on {m['data']}/{m['split']} ({m['pairs']} labelled pairs)")
    if "transform" in record:
        t = record["transform"]
        parts.append(f"transform fitted on {t['source']} ({t['texts']} texts, no labels)")
    return "; ".join(parts)


def _scored(encoder: TextEncoder, vectors, derivations: Derivations | None, dataset: str,
            save_dir: str | Path | None, fit_rows=None, fit_label: str = "the evaluated texts"):
    """(variant, vectors, record) for every raw variant, then every derived one as it is made."""
    vectors = {v: np.asarray(m, dtype=np.float32) for v, m in vectors.items()}
    for v, m in vectors.items():
        yield v, m, None
    if derivations is None or derivations.empty:
        return
    for v, m, record, piece in derive(encoder, vectors, derivations, fit_rows=fit_rows, fit_label=fit_label):
        if save_dir is not None and piece is not None:
            save_fitted(save_dir, dataset, v, piece)
        yield v, m, record


def evaluate_sts(encoder: TextEncoder, data: StsData, derivations: Derivations | None = None, *,
                 save_dir: str | Path | None = None, quantized: quantize.Quantized | None = None) -> list[dict]:
    """Spearman and Pearson (x100) of cosine similarity vs gold, for every variant (and derived one).
    Fitted pieces (learned mix weights, transforms) are stored under ``save_dir`` when given.
    ``quantized``: every variant's vectors quantised and decoded first (``quantize.Quantized``)."""
    check_held_out(derivations, data)
    data, left_out = without_empty_sts(data)
    texts, (rows1, rows2) = unique_texts(data.sentence1, data.sentence2)
    out = []
    for variant, m, record in _scored(encoder, encoder.encode(texts), derivations, data.name, save_dir,
                                      fit_label=f"{data.name}/{data.split} sentences"):
        if quantized is not None:
            ranges = quantized.ranges(m)
            m = quantize.decode(quantized.dtype, quantize.quantize(quantized.dtype, m, ranges), ranges)
        out += _rows("sts", data.name, data.split, variant, sts_scores(m[rows1], m[rows2], data.scores), record,
                     quantized)
    return _note(out, left_out)


SCORE_BATCH = 16  # variants scored at once by the worker processes (their matrices are held together)


def evaluate_prepared(task: str, encoder: TextEncoder, prepared, derivations: Derivations | None = None, *,
                      save_dir: str | Path | None = None, quantized: quantize.Quantized | None = None,
                      workers: int | None = None) -> list[dict]:
    """Every variant (and derived one) scored by a registered task type's ``Prepared`` data
    (``pipeline.tasks``): its texts embedded once, its scores per variant. Rows carry the task's
    ``protocol`` where it has one (clustering: original or fast; classification: its sampling).

    A classifier or k-means per variant costs about as much as a forward pass, so variants are scored
    ``SCORE_BATCH`` at a time by ``workers`` processes (default: one per CPU; joblib, whose workers each
    get their share of the BLAS threads): the same scores as one at a time, in the same order."""
    import os

    from joblib import Parallel, delayed

    data = prepared.data
    workers = workers or len(os.sched_getaffinity(0))
    pool = Parallel(n_jobs=workers) if workers > 1 else None
    out, batch = [], []

    def flush():
        scores = pool(delayed(prepared.score)(m) for _, m, _ in batch) if pool is not None and len(batch) > 1 \
            else [prepared.score(m) for _, m, _ in batch]
        for (variant, _, record), got in zip(batch, scores):
            out.extend(_rows(task, data.name, data.split, variant, got, record, quantized))
        batch.clear()

    for variant, m, record in _scored(encoder, encoder.encode(prepared.texts), derivations, data.name, save_dir,
                                      fit_rows=prepared.fit_rows, fit_label=prepared.fit_label):
        if quantized is not None:
            ranges = quantized.ranges(m)
            m = quantize.decode(quantized.dtype, quantize.quantize(quantized.dtype, m, ranges), ranges)
        batch.append((variant, m, record))
        if len(batch) >= SCORE_BATCH:
            flush()
    flush()
    protocol = getattr(prepared, "protocol", None)
    for r in out:
        if protocol:
            r["protocol"] = protocol
    return _note(out, data.left_out)


def quantized_run(query_emb, doc_emb, query_ids, doc_ids, quantized: quantize.Quantized | None,
                  k_max: int = 100, kind: str = "flat", target_recall: float | None = None,
                  label: str = "", **options) -> dict[str, dict[str, float]]:
    """The run an index of ``quantized.dtype`` (None: float) and ``kind`` over the documents gives the
    float queries: query id -> {doc id: score} (``quantize.Quantized``; ``index.memory_index``, which
    takes ``options`` such as ``nlist``, ``nprobe`` and ``rerank``). ``target_recall`` (float IVF-PQ):
    nprobe and rerank tuned first on the documents' own vectors (``index.tune``), as ``strata index``
    does, and said on stderr."""
    from .index import memory_index

    doc_emb = np.asarray(doc_emb, dtype=np.float32)
    if target_recall is not None and (quantized is not None or kind != "ivfpq"):
        raise SpecError(f"--target-recall tunes float IVF-PQ indexes: use it with --index ivfpq"
                        f"{' and a float output' if quantized is not None else ''}")
    if quantized is None:
        index = memory_index([str(d) for d in doc_ids], doc_emb, "float32", kind=kind, **options)
        if target_recall is not None:
            from .index.tune import describe_tuned, tune_loaded

            tune_loaded(index, target_recall)
            print(f"{label}: index {describe_tuned(index.params)}", file=sys.stderr)
    else:
        ranges = quantized.ranges(doc_emb)
        index = memory_index([str(d) for d in doc_ids], quantize.quantize(quantized.dtype, doc_emb, ranges),
                             quantized.dtype, ranges, kind=kind, rescore=quantized.rescore, **options)
    return _run(index, query_emb, query_ids, k_max)


def _run(index, query_emb, query_ids, k_max: int) -> dict[str, dict[str, float]]:
    scores, ids = index.search(query_emb, k_max)
    return {str(q): {d: float(s) for d, s in zip(row_ids, row_s) if d is not None}
            for q, row_s, row_ids in zip(query_ids, scores, ids)}


INDEX_ENGINES = ("local", "ray")
RAY_INDEX_DIR = Path("eval") / "index-ray"  # under the Ray encoder's cache: one documents-only output per variant
RAY_INDEX_PART_ROWS = 100_000  # documents per part of that output (one Ray encode task each)


def ray_index_run(root: str | Path, dataset: str, variant: Variant, query_emb, doc_emb, query_ids, doc_ids,
                  k_max: int = 100, *, part_rows: int | None = None, nlist: int | None = None,
                  nprobe: int | None = None, seed: int = 0, ray_address: str | None = None,
                  target_recall: float | None = None, label: str = "", **build_options) -> dict[str, dict[str, float]]:
    """The run of the distributed IVF-PQ (``index.ray.build_ivfpq_ray``) over the documents: they are
    written as a documents-only Strata output (``root/eval/index-ray/{dataset}/{variant}``: parts of at
    most ``part_rows`` (``RAY_INDEX_PART_ROWS``) rows, ids = document ids; the queries the cache also
    holds are not indexed), built on Ray (trained on a seeded sample, parts encoded by Ray tasks, lists
    merged on disk) and searched through the merged index ``index.load_index`` memory-maps. The same
    documents again reuse the build (its record); different ones replace the folder."""
    import shutil

    from .index import index_path, load_index
    from .index.ray import build_ivfpq_ray
    from .storage import safe_name

    if not variant.is_raw:
        raise SpecError(f"--index-engine ray indexes stored columns only; {variant.name} is derived")
    part_rows = part_rows or RAY_INDEX_PART_ROWS
    doc_emb = np.ascontiguousarray(doc_emb, dtype=np.float32)
    doc_ids = [str(d) for d in doc_ids]
    folder = Path(root) / RAY_INDEX_DIR / safe_name(dataset) / safe_name(variant.name)
    digest = hashlib.sha256(doc_emb.tobytes() + "\n".join([*doc_ids, str(part_rows)]).encode()).hexdigest()
    stamp = folder / "documents.sha256"
    manifest = {"signature": {"dtype": "float32"}, "shards": [],
                "variants": [{"name": variant.name, "column": variant.column, "layer": variant.layer,
                              "pooling": variant.pooling, "template": variant.template, "dim": doc_emb.shape[1],
                              "dtype": "float32"}]}
    for p, start in enumerate(range(0, len(doc_ids), part_rows)):
        rows = slice(start, start + part_rows)
        manifest["shards"].append({"path": f"documents/{p:05d}", "output": f"embeddings/d{p:05d}",
                                   "files": ["part-0.parquet"], "rows": len(doc_ids[rows])})
    if not (stamp.is_file() and stamp.read_text().strip() == digest):
        shutil.rmtree(folder, ignore_errors=True)
        for p, start in enumerate(range(0, len(doc_ids), part_rows)):
            rows = slice(start, start + part_rows)
            part = folder / "embeddings" / f"d{p:05d}" / "part-0.parquet"
            part.parent.mkdir(parents=True, exist_ok=True)
            x = doc_emb[rows]
            pq.write_table(pa.table({"id": pa.array(doc_ids[rows], pa.string()),
                                     variant.column: pa.FixedSizeListArray.from_arrays(
                                         pa.array(x.ravel(), pa.float32()), x.shape[1])}), part)
        write_json_atomic(None, folder / "manifest.json", manifest)
        stamp.write_text(digest + "\n")
    params = build_ivfpq_ray(folder, [variant], manifest=manifest, nlist=nlist, nprobe=nprobe, seed=seed,
                             ray_address=ray_address, **build_options)[variant]
    log.info("%s %s: IVF-PQ on Ray, %d part(s), nlist %d, m %d, nprobe %d", dataset, variant.name,
             params["shards"], params["nlist"], params["m"], nprobe or params["nprobe"])
    if target_recall is not None:
        from .index.tune import describe_tuned, tune_index

        tune_index(index_path(folder, variant), target_recall)
        nprobe = None  # the tuned settings, now the index's defaults
    index = load_index(index_path(folder, variant), nprobe=nprobe)
    if target_recall is not None:
        print(f"{label}: index {describe_tuned(index.params)}", file=sys.stderr)
    return _run(index, query_emb, query_ids, k_max)


def evaluate_retrieval(encoder: TextEncoder, data: BeirData, derivations: Derivations | None = None, *,
                       query_template: str | None = None, doc_template: str | None = None,
                       save_dir: str | Path | None = None, quantized: quantize.Quantized | None = None,
                       index: str | None = None, index_engine: str = "local",
                       index_options: dict | None = None) -> list[dict]:
    """nDCG@10, Recall@100 and MRR@10 (x100) by exact cosine search, for every variant (and derived one).
    ``quantized``: the documents quantised and searched as their index would (``quantized_run``).
    ``index`` (flat, hnsw, ivfpq, auto): searched through that kind of index, built in memory as
    ``strata index`` would build it, instead of exactly (rows: ``quantization`` ``index:{kind}``).
    ``index_engine="ray"`` (``index`` ivfpq or auto; a ``RayEncoder``, float, raw variants): the
    documents are indexed by the distributed IVF-PQ build instead (``ray_index_run``, under the
    encoder's cache directory; rows: ``index:ivfpq@ray``). ``index_options``: ``nlist``, ``nprobe``
    (and, for ray, ``build_ivfpq_ray``'s options).

    With ``query_template`` and ``doc_template`` (template names of the encoder's variants),
    queries and documents are embedded under their own templates and every variant is the pair
    ``QUERY~DOC`` of the same layer and pooling (E5-Mistral / GTE-Qwen2 style instructions).
    """
    check_held_out(derivations, data)
    index_options = dict(index_options or {})
    if index_engine == "ray":
        check_ray_index(index, "ray" if isinstance(encoder, RayEncoder) else "local",
                        quantized.dtype if quantized is not None else None,
                        derivations is not None and not derivations.empty)
        index = "ivfpq@ray"
    elif index_engine != "local":
        raise SpecError(f"index engine {index_engine!r}: choose from {', '.join(INDEX_ENGINES)}")
    data, left_out = without_empty_beir(data)
    texts, (doc_rows, query_rows) = unique_texts(data.doc_texts, data.query_texts)
    q_t, d_t = query_template or "plain", doc_template or "plain"
    asymmetric = (query_template or doc_template) and q_t != d_t
    out, waiting = [], {}  # asymmetric: a variant's query side waits for its document side, or back
    for v, m, record in _scored(encoder, encoder.encode(texts), derivations, data.name, save_dir,
                                fit_rows=doc_rows, fit_label=f"{data.name} corpus documents"):
        if not asymmetric:
            q, d, name = m, m, v
        elif v.template not in (q_t, d_t):
            continue
        else:
            key = (v.layer, v.pooling, v.mix, v.transform)
            side = "q" if v.template == q_t else "d"
            other = waiting.pop((key, "d" if side == "q" else "q"), None)
            if other is None:
                waiting[(key, side)] = (m, record)
                continue
            q, d = (m, other[0]) if side == "q" else (other[0], m)
            record = record if side == "d" else other[1]
            name = Variant(v.layer, v.pooling, f"{q_t}~{d_t}", v.mix, v.transform)
        if quantized is None and not index:
            scores = retrieval_scores(q[query_rows], d[doc_rows], data.query_ids, data.doc_ids, data.qrels)
        elif index_engine == "ray":
            stored = v if not asymmetric else Variant(v.layer, v.pooling, d_t, v.mix, v.transform)
            scores = retrieval_scores_from_run(ray_index_run(encoder.dir, f"{data.name}-{data.split}", stored,
                                                             q[query_rows], d[doc_rows], data.query_ids,
                                                             data.doc_ids, label=f"{data.name} {name.name}",
                                                             **index_options), data.qrels)
        else:
            scores = retrieval_scores_from_run(quantized_run(q[query_rows], d[doc_rows], data.query_ids, data.doc_ids,
                                                             quantized, kind=index or "flat",
                                                             label=f"{data.name} {name.name}", **index_options),
                                               data.qrels)
        out += _rows("retrieval", data.name, data.split, name, scores, record, quantized, index)
    if asymmetric and waiting and not out:
        (key, side), _ = next(iter(waiting.items()))
        raise SpecError(f"no variant of template {q_t if side == 'd' else d_t!r} to pair with: embed both the query "
                        f"and the document template (--templates)")
    return _note(out, left_out)


def check_ray_index(index: str | None, engine: str | None, dtype: str | None, derived: bool) -> None:
    """``--index-engine ray``: what it can index (one-line errors otherwise). ``engine``: the eval
    engine (local, ray, auto); ``dtype``: the quantised scoring's (int8, binary) or a float one;
    ``derived``: mixes or transforms asked for. Needs no data or model: ``strata eval`` calls it
    before reading any."""
    if index not in ("ivfpq", "auto"):
        raise SpecError(f"--index-engine ray builds IVF-PQ indexes only: use --index ivfpq (or auto), not "
                        f"{'--index ' + index if index else 'exact search'}")
    if quantize.is_quantized(dtype):
        raise SpecError(f"--index-engine ray builds float IVF-PQ indexes only: not with --dtype {dtype}")
    if derived:
        raise SpecError("--index-engine ray indexes stored columns only: not with --mixes or --transforms")
    if engine == "local":
        raise SpecError("--index-engine ray indexes the document embeddings the ray engine caches in --output: "
                        "use --engine ray (or auto)")


def _note(rows: list[dict], left_out: str | None) -> list[dict]:
    if left_out:
        for r in rows:
            r["left_out"] = left_out
    return rows


def without_empty_beir(data: BeirData, *, warn: bool = True) -> tuple[BeirData, str | None]:
    """Documents and queries whose text is empty are not embedded (a model has no meaningful
    vector for nothing): empty documents are left out of the searched corpus, so a relevant
    empty document counts as a miss; an empty query retrieves nothing and scores 0. The rows
    say how many (``left_out``)."""
    docs = [i for i, t in enumerate(data.doc_texts) if t.strip()]
    queries = [i for i, t in enumerate(data.query_texts) if t.strip()]
    n_docs, n_queries = len(data.doc_texts) - len(docs), len(data.query_texts) - len(queries)
    in_corpus = set(data.doc_ids)
    absent = len({d for q in data.query_ids for d, rel in data.qrels[q].items() if rel > 0 and d not in in_corpus})
    if not n_docs and not n_queries and not absent:
        return data, None
    if not docs or not queries:
        raise SpecError(f"{data.name}: every {'document' if not docs else 'query'} is empty: nothing to evaluate")
    parts = ([f"{n_docs} empty document(s) left out of the corpus (relevant ones count as misses)"] if n_docs else []) \
        + ([f"{n_queries} empty quer(y/ies) not searched (scored 0)"] if n_queries else []) \
        + ([f"{absent} relevant document id(s) in the qrels are not in the corpus (count as misses)"] if absent else [])
    note = "; ".join(parts)
    if warn:
        log.warning("%s: %s", data.name, note)
    return dataclasses.replace(data, doc_ids=[data.doc_ids[i] for i in docs], doc_texts=[data.doc_texts[i] for i in docs],
                               query_ids=[data.query_ids[i] for i in queries],
                               query_texts=[data.query_texts[i] for i in queries]), note


def without_empty_sts(data: StsData, *, warn: bool = True) -> tuple[StsData, str | None]:
    """Pairs with an empty sentence have no similarity to score: they are skipped, and the
    rows say how many (``left_out``)."""
    keep = [i for i, (a, b) in enumerate(zip(data.sentence1, data.sentence2)) if a.strip() and b.strip()]
    if len(keep) == len(data.sentence1):
        return data, None
    if len(keep) < 2:
        raise SpecError(f"{data.name}: fewer than 2 pairs with two non-empty sentences: nothing to evaluate")
    if len(set(data.scores[keep].tolist())) == 1:
        raise SpecError(f"{data.name}: the pairs with two non-empty sentences all have the same score: a rank "
                        "correlation with constant gold scores is undefined")
    note = f"{len(data.sentence1) - len(keep)} pair(s) with an empty sentence skipped"
    if warn:
        log.warning("%s: %s", data.name, note)
    return dataclasses.replace(data, sentence1=[data.sentence1[i] for i in keep],
                               sentence2=[data.sentence2[i] for i in keep], scores=data.scores[keep]), note


class RayEncoder:
    """``encode(texts)`` through the Ray pipeline, cached in an output directory (see module doc)."""

    def __init__(self, request: Request, cache_dir: str | Path, *, force: bool = False, progress: bool = True):
        # the cache holds floats: quantised evaluations quantise at scoring time (``quantize.Quantized``)
        request = quantize.float_request(request)
        self.request, self.dir, self.force, self.progress = request, Path(cache_dir), force, progress
        self.variants = request.variants

    def cached_ids(self) -> set[str]:
        """Ids of the texts already embedded in the cache with this request's settings."""
        out = Output(str(self.dir))
        manifest = out.read_manifest()
        if not manifest or signature_difference(manifest.get("signature", {}), self.request.signature("text", "id")):
            return set()
        return set(out.read_table(["id"]).column("id").to_pylist()) if manifest.get("shards") else set()

    def stage(self, texts: Sequence[str]) -> tuple[list[str], int]:
        """Write the texts the cache lacks as one new input shard; returns every text's id and
        how many were missing."""
        ids = [text_id(t) for t in texts]
        have = self.cached_ids()
        missing = {i: t for i, t in zip(ids, texts) if i not in have}
        if missing:
            order = sorted(missing)
            name = hashlib.sha256("\n".join(order).encode()).hexdigest()[:16]
            path = self.dir / "inputs" / f"texts-{name}.parquet"
            if not path.exists():  # the same missing set after a crash: staged already
                path.parent.mkdir(parents=True, exist_ok=True)
                write_part(fsspec.filesystem("file"), str(path), pa.table({"id": order, "text": [missing[i] for i in order]}))
        return ids, len(missing)

    def prefetch(self, texts: Sequence[str]) -> int:
        """Embed every text of ``texts`` the cache lacks in one run of the pipeline, one model load,
        so that the ``encode`` calls of the evaluations that follow (``texts_of`` each one's data) read
        their vectors back and embed nothing; returns how many were embedded. With ``force`` it does
        nothing: each ``encode`` embeds again anyway."""
        if self.force:
            return 0
        _, missing = self.stage(texts)
        if missing:
            self._embed()
        return missing

    def encode(self, texts: Sequence[str]) -> dict[Variant, np.ndarray]:
        ids, missing = self.stage(texts)
        if missing or self.force:
            self._embed()
        table = Output(str(self.dir)).read_table(["id", *(v.column for v in self.variants)])
        row = {i: k for k, i in enumerate(table.column("id").to_pylist())}
        missing = [i for i in ids if i not in row]
        if missing:
            raise RuntimeError(f"{len(missing)} evaluation text(s) have no embedding in {self.dir}")
        take = np.fromiter((row[i] for i in ids), dtype=np.int64, count=len(ids))
        out = {}
        for v in self.variants:
            arr = table.column(v.column).combine_chunks()
            mat = arr.values.to_numpy(zero_copy_only=False).reshape(-1, arr.type.list_size)
            out[v] = mat[take].astype(np.float32)
        return out

    def _embed(self) -> None:
        """Commit whatever is staged (incremental: what is committed already is skipped)."""
        from .runner import embed

        embed(self.request, str(self.dir / "inputs"), str(self.dir), id_column="id", force=self.force,
              progress=self.progress)


def texts_of(data) -> list[str]:
    """The texts an evaluation of ``data`` embeds, once each: STS pairs' sentences and a BEIR set's
    documents and queries as their evaluators keep them (data left with nothing to score is refused
    here, before any embedding), or a task's ``Prepared`` texts (``pipeline.tasks``). What
    ``RayEncoder.prefetch`` takes to embed several evaluations' texts in one run."""
    if isinstance(data, StsData):
        data = without_empty_sts(data, warn=False)[0]
        return unique_texts(data.sentence1, data.sentence2)[0]
    if isinstance(data, BeirData):
        data = without_empty_beir(data, warn=False)[0]
        return unique_texts(data.doc_texts, data.query_texts)[0]
    return list(data.texts)


def choose_engine(engine: str, n_texts: int) -> str:
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose from {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    return "local" if n_texts <= LOCAL_MAX_TEXTS else "ray"


def make_encoder(request: Request, engine: str, out_dir: str | Path, *, force: bool = False,
                 progress: bool = True) -> TextEncoder:
    """The encoder of an engine ('local' or 'ray'; 'auto' is decided by ``choose_engine``)."""
    if engine == "local":
        from .encoder import Encoder

        return Encoder.from_request(quantize.float_request(request))
    return RayEncoder(request, out_dir, force=force, progress=progress)


def eval_sts(data: StsData | str | Path, out_dir: str | Path, encoder: TextEncoder,
             derivations: Derivations | None = None, *, quantized: quantize.Quantized | None = None) -> list[dict]:
    """Evaluate on STS pairs and merge the rows into ``out_dir/eval/results.json``."""
    data = data if isinstance(data, StsData) else load_sts(data)
    rows = evaluate_sts(encoder, data, derivations, save_dir=out_dir, quantized=quantized)
    merge_results(out_dir, rows)
    return rows


def eval_retrieval(data: BeirData | str | Path, out_dir: str | Path, encoder: TextEncoder,
                   derivations: Derivations | None = None, *, split: str = "test", max_queries: int | None = None,
                   max_docs: int | None = None, query_template: str | None = None,
                   doc_template: str | None = None, quantized: quantize.Quantized | None = None,
                   index: str | None = None, index_engine: str = "local",
                   index_options: dict | None = None) -> list[dict]:
    """Evaluate on a BEIR set (or a subset) and merge the rows into ``out_dir/eval/results.json``."""
    data = load_retrieval(data, split=split, max_queries=max_queries, max_docs=max_docs)
    rows = evaluate_retrieval(encoder, data, derivations, query_template=query_template, doc_template=doc_template,
                              save_dir=out_dir, quantized=quantized, index=index, index_engine=index_engine,
                              index_options=index_options)
    merge_results(out_dir, rows)
    return rows


def load_retrieval(data: BeirData | str | Path, *, split: str = "test", max_queries: int | None = None,
                   max_docs: int | None = None) -> BeirData:
    data = data if isinstance(data, BeirData) else load_beir(data, split=split)
    if max_queries or max_docs:
        data = data.subset(max_queries or len(data.query_ids), max_docs)
    return data

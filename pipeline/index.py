"""FAISS indexes per variant, built by streaming the embedding files in bounded chunks.

One idea despite its length: an index's life cycle (read the committed vectors in chunks, choose
and build the FAISS kind, record what it was built from, load and search it). Reading is here,
not in storage, because it is the index's own streaming and validation of vectors.

Every index searches by cosine similarity: vectors are L2-normalised and compared by inner
product, both when added and when queried, so scores are cosines whatever the index kind.
An index ``indexes/{variant}.faiss`` comes with ``{variant}.ids.parquet`` (the string ids
in index order: FAISS only knows row numbers) and ``{variant}.json`` (how it was built and
the search parameters to use). The JSON is written last, so its presence means the three
files belong together.

Choosing a kind (``kind="auto"``) follows the FAISS wiki page "Guidelines to choose an
index" (github.com/facebookresearch/faiss/wiki/Guidelines-to-choose-an-index):

- below 100k vectors: ``flat`` — exact search, and brute force is fast at that size;
- up to 1M vectors: ``hnsw`` (HNSW32) — the wiki's choice when memory is not the issue;
  it keeps the full vectors and answers in well under a millisecond;
- above 1M vectors: ``ivfpq`` — the wiki's route when memory matters: IVF with K = 4*sqrt(N)
  lists (its range is 4..16*sqrt(N), trained on 30..256*K vectors) and PQ codes of one
  byte per 4 dimensions (its preferred D = 4*M); FAISS ``IndexRefineFlat`` then re-scores
  ``rerank`` x k candidates exactly, which restores most of the recall PQ loses (at the
  cost of keeping the full vectors on disk next to the codes).

The 100k and 1M thresholds are this project's reading of the wiki, not numbers it states.

Quantised outputs (``--dtype int8|binary``, ``pipeline/quantize.py``) keep their compression in
the index:

- int8: a FAISS ``QT_8bit`` scalar quantiser given the output's own ranges (``flat``:
  ``IndexScalarQuantizer``, ``hnsw``: ``IndexHNSWSQ``, ``ivfpq``: ``IndexIVFScalarQuantizer``,
  no PQ on top). It stores the output's codes unchanged, 1 byte per dimension, and decodes them
  to the same bucket centres as ``quantize.dequantize_int8``; queries stay float (L2-normalised)
  and are scored by inner product against the decoded documents, which are unit vectors up to
  the quantisation error, so scores are (nearly) cosines. ``QT_8bit_direct_signed`` would store
  the same bytes but decode them to the bare codes: fine for a flat scan with rescaled queries,
  but an HNSW graph or IVF lists would then be built in the codes' distorted geometry.
- binary: ``IndexBinaryFlat`` / ``IndexBinaryHNSW`` / ``IndexBinaryIVF`` by Hamming distance;
  queries are binarised (``x > 0``); scores are ``1 - 2 * hamming / dim`` (the cosine of sign vectors).
- ``rescore`` (the JSON's default, or ``search(..., rescore=M)``): fetch ``M x k`` candidates,
  re-score them by the cosine of the float query with the stored document vectors (decoded
  int8, or sign vectors), keep the best ``k`` (sentence-transformers' ``semantic_search_faiss(
  rescore=True, rescore_multiplier=M)``; the documents are reconstructed from the index).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from . import quantize
from .storage import safe_name, utc_now, write_atomic
from .variants import Variant

KINDS = ("auto", "flat", "hnsw", "ivfpq")
INDEXES = "indexes"
BUILT_FILE = "_built.json"  # per variant: the committed files and kind its index was built from
FLAT_MAX_ROWS = 100_000
HNSW_MAX_ROWS = 1_000_000
_MIN_POINTS_PER_CENTROID = 39  # FAISS k-means warns below this many training points per centroid


class IndexBuildError(ValueError):
    """Embedding files that cannot be indexed as asked."""


# --------------------------------------------------------------------------- reading


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _ipc_reader(path: Path):
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(str(path)))


def _schema(path: Path) -> pa.Schema:
    if not path.is_file():
        raise IndexBuildError(f"{path}: embedding file not found")
    return pq.read_schema(path) if _is_parquet(path) else _ipc_reader(path).schema


def _vector_dim(path: Path, schema: pa.Schema, column: str) -> int:
    if "id" not in schema.names:
        raise IndexBuildError(f"{path}: no 'id' column")
    if column not in schema.names:
        found = ", ".join(n for n in schema.names if n.startswith("emb_")) or "none"
        raise IndexBuildError(f"{path}: no column {column!r} (embedding columns: {found})")
    t = schema.field(column).type
    if pa.types.is_fixed_size_list(t) and t.value_type in (pa.float32(), pa.float16(), pa.float64(), pa.int8(),
                                                           pa.uint8()):
        return t.list_size
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_floating(t.value_type):
        return -1  # variable list (e.g. Ray's tensor type read back by plain pyarrow): checked per chunk
    raise IndexBuildError(f"{path}: column {column!r} has type {t}; expected fixed_size_list<float32|float16>[dim]")


def _rows(path: Path) -> int:
    if _is_parquet(path):
        return pq.ParquetFile(path).metadata.num_rows
    reader = _ipc_reader(path)
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    return sum(b.num_rows for b in reader)


def _columns(source) -> list[str]:
    """The stored columns a source reads: a raw variant's column, or a derived variant's sources."""
    return [source] if isinstance(source, str) else list(source.columns)


def _batches(path: Path, source, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    columns = _columns(source)
    if _is_parquet(path):
        yield from pq.ParquetFile(path).iter_batches(columns=["id", *columns], batch_size=chunk_rows)
        return
    reader = _ipc_reader(path)
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) \
        if isinstance(reader, pa.ipc.RecordBatchFileReader) else iter(reader)
    for batch in batches:
        batch = batch.select(["id", *columns])
        for start in range(0, batch.num_rows, chunk_rows):
            yield batch.slice(start, chunk_rows)


def _to_matrix(path: Path, batch: pa.RecordBatch, column: str, dim: int, raw: bool = False) -> np.ndarray:
    """The column as a float32 (rows, dim) array (``raw``: in its stored type, for quantised columns);
    null or ragged vectors are errors."""
    arr = batch.column(column)
    if arr.null_count:
        bad = batch.column("id")[pc.index(pc.is_null(arr), True).as_py()].as_py()
        raise IndexBuildError(f"{path}: id {bad!r} has a null {column}")
    if not pa.types.is_fixed_size_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy()
        if len(lengths) and ((lengths != lengths[0]).any() or (dim > 0 and lengths[0] != dim)):
            raise IndexBuildError(f"{path}: column {column} has vectors of lengths {sorted(set(lengths))[:5]}, "
                                  f"expected one fixed dim")
        dim = int(lengths[0]) if len(lengths) else dim
    values = arr.flatten()
    if values.null_count:
        raise IndexBuildError(f"{path}: column {column} has null values inside vectors")
    x = values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    return np.ascontiguousarray(x) if raw else np.ascontiguousarray(x, dtype=np.float32)


def _matrix(path: Path, batch: pa.RecordBatch, source, source_dim: int) -> np.ndarray:
    """A chunk's vectors: the raw column, or the derived variant made from its source columns."""
    if isinstance(source, str):
        return _to_matrix(path, batch, source, source_dim)
    return np.ascontiguousarray(source.apply([_to_matrix(path, batch, c, source_dim) for c in source.columns]),
                                dtype=np.float32)


def _chunks(files: Sequence[Path], column, dim: int, chunk_rows: int, source_dim: int | None = None,
            raw: bool = False):
    """(ids, normalised float32 vectors) per chunk, in file order then row order (``raw``: the stored
    values of a quantised column, as they are)."""
    source_dim = dim if source_dim is None else source_dim
    for path in files:
        for batch in _batches(path, column, chunk_rows):
            if batch.column("id").null_count:
                raise IndexBuildError(f"{path}: null id")
            x = _to_matrix(path, batch, column, source_dim, raw=True) if raw else _matrix(path, batch, column,
                                                                                              source_dim)
            if x.shape[1] != dim:
                raise IndexBuildError(f"{path}: {column} has dim {x.shape[1]}, other files have {dim}")
            if not raw:
                faiss.normalize_L2(x)
            yield [str(v) for v in batch.column("id").to_pylist()], x


def _survey(files: Sequence[Path], source, chunk_rows: int) -> tuple[int, int]:
    """Total rows and the common vector dim of the stored column(s), checked before any work is done."""
    column = _columns(source)[0]
    dims, rows = set(), 0
    for path in files:
        schema = _schema(path)
        for c in _columns(source)[1:]:
            _vector_dim(path, schema, c)
        dim = _vector_dim(path, schema, column)
        if dim < 0:  # variable list type: read one chunk to learn the dim
            first = next(_batches(path, column, chunk_rows), None)
            dim = _to_matrix(path, first, column, -1).shape[1] if first is not None and first.num_rows else -1
        if dim >= 0:
            dims.add(dim)
        rows += _rows(path)
    if len(dims) > 1:
        raise IndexBuildError(f"column {column} has different dims across files: {sorted(dims)}")
    if rows == 0 or not dims:
        raise IndexBuildError(f"no rows to index in {len(files)} file(s)")
    return rows, dims.pop()


# --------------------------------------------------------------------------- building


def choose_kind(rows: int) -> str:
    return "flat" if rows < FLAT_MAX_ROWS else "hnsw" if rows <= HNSW_MAX_ROWS else "ivfpq"


def _pq_m(dim: int) -> int:
    """Sub-quantizers: the largest divisor of dim giving at least 4 dims each (the wiki's D = 4*M)."""
    return max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)


def _sidecars(out_path: Path) -> tuple[Path, Path]:
    return out_path.with_suffix(".ids.parquet"), out_path.with_suffix(".json")


def _training_sample(files, column, dim, chunk_rows, rows, n, seed, source_dim, raw=False) -> np.ndarray:
    """n rows drawn uniformly without replacement, gathered in one streaming pass."""
    wanted = np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))
    sample, start = [], 0
    for _, x in _chunks(files, column, dim, chunk_rows, source_dim, raw):
        lo, hi = np.searchsorted(wanted, [start, start + len(x)])
        sample.append(x[wanted[lo:hi] - start])
        start += len(x)
    return np.concatenate(sample)


def _sq_trained(ranges) -> np.ndarray:
    """FAISS ``QT_8bit`` parameters (vmin, then vdiff per dimension) that code exactly as ``quantize.quantize_int8``."""
    r = np.asarray(ranges, dtype=np.float32)
    diff = r[1] - r[0]
    diff = np.where(diff == 0, np.float32(quantize.LEVELS * quantize.ZERO_STEP), diff)  # quantize's step there
    return np.concatenate([r[0], diff]).astype(np.float32)


def _set_sq(index, ranges) -> None:
    faiss.copy_array_to_vector(_sq_trained(ranges), index.sq.trained)
    index.is_trained = True


def _make_index(kind: str, dim: int, rows: int, dtype: str, ranges, sample, *, hnsw_m: int, ef_construction: int,
                ef_search: int, nlist: int | None, m: int | None, nbits: int, nprobe: int | None, rerank: int,
                train_rows: int | None) -> tuple[object, dict]:
    """A new, trained, empty FAISS index of a kind and dtype, and the parameters to record.

    ``sample(n)`` returns n training rows (normalised floats, or a quantised column's stored values).
    """
    params: dict = {}
    ivf = nlist or max(1, min(int(4 * math.sqrt(rows)), rows // _MIN_POINTS_PER_CENTROID))
    if kind in ("hnsw",):
        params.update(hnsw_M=hnsw_m, efConstruction=ef_construction, efSearch=ef_search)
    if dtype == "binary":
        if kind == "flat":
            return faiss.IndexBinaryFlat(dim), params
        if kind == "hnsw":
            index = faiss.IndexBinaryHNSW(dim, hnsw_m)
            index.hnsw.efConstruction, index.hnsw.efSearch = ef_construction, ef_search
            return index, params
        n_train = min(rows, train_rows or min(64 * ivf, 500_000))
        if n_train < ivf:
            raise IndexBuildError(f"{n_train} training vectors for nlist={ivf}: need at least one per list")
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(dim), dim, ivf)
        index.train(sample(n_train))
        index.nprobe = min(ivf, nprobe or max(8, ivf // 16))
        return index, dict(params, kind="ivf", nlist=ivf, nprobe=index.nprobe, train_rows=n_train)
    if dtype == "int8":
        qt = faiss.ScalarQuantizer.QT_8bit
        if kind == "flat":
            index = faiss.IndexScalarQuantizer(dim, qt, faiss.METRIC_INNER_PRODUCT)
            _set_sq(index, ranges)
            return index, params
        if kind == "hnsw":
            index = faiss.IndexHNSWSQ(dim, qt, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            _set_sq(faiss.downcast_index(index.storage), ranges)
            index.is_trained = True
            index.hnsw.efConstruction, index.hnsw.efSearch = ef_construction, ef_search
            return index, params
        n_train = min(rows, train_rows or min(64 * ivf, 500_000))
        if n_train < ivf:
            raise IndexBuildError(f"{n_train} training vectors for nlist={ivf}: need at least one per list")
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, ivf, qt, faiss.METRIC_INNER_PRODUCT, False)
        index.train(quantize.dequantize_int8(sample(n_train), ranges))  # the lists; the codes' ranges are ours:
        _set_sq(index, ranges)
        index.nprobe = min(ivf, nprobe or max(8, ivf // 16))
        return index, dict(params, kind="ivf", nlist=ivf, nprobe=index.nprobe, train_rows=n_train)
    if kind == "flat":
        return faiss.IndexFlatIP(dim), params
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = ef_construction, ef_search
        return index, params
    m = m or _pq_m(dim)
    if dim % m:
        raise IndexBuildError(f"PQ m={m} must divide the dim {dim}")
    n_train = min(rows, train_rows or min(64 * max(ivf, 2 ** nbits), 500_000))
    if n_train < ivf:
        raise IndexBuildError(f"{n_train} training vectors for nlist={ivf}: need at least one per list")
    # A PQ codebook of 2**nbits centroids needs ~39 points each; shrink it for small sets.
    nbits = max(1, min(nbits, int(math.log2(max(2, n_train // _MIN_POINTS_PER_CENTROID)))))
    nprobe = min(ivf, nprobe or max(8, ivf // 16))
    pq_index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, ivf, m, nbits, faiss.METRIC_INNER_PRODUCT)
    pq_index.nprobe = nprobe
    index = faiss.IndexRefineFlat(pq_index)
    index.k_factor = float(rerank)
    index.train(sample(n_train))
    return index, dict(params, nlist=ivf, m=m, nbits=nbits, nprobe=nprobe, rerank=rerank, train_rows=n_train)


def _add(index, dtype: str, ranges, x: np.ndarray) -> None:
    """Add a chunk: normalised floats and packed bits as they are; int8 codes as their bucket centres,
    which the index's ``QT_8bit`` quantiser codes back to the same bytes."""
    index.add(quantize.dequantize_int8(x, ranges) if dtype == "int8" else x)


def _base_params(kind: str, dtype: str, rows: int, dim: int, rescore: int) -> dict:
    quantized = quantize.is_quantized(dtype)
    return {"kind": kind, "metric": "hamming" if dtype == "binary" else "cosine", "dtype": dtype, "rows": rows,
            "dim": dim, "hnsw_M": None, "efConstruction": None, "efSearch": None, "nlist": None, "m": None,
            "nbits": None, "nprobe": None, "rerank": None, "train_rows": None,
            "rescore": int(rescore) if quantized else None, "faiss_version": faiss.__version__}


def build_index(embedding_files: Sequence[str | Path], column, out_path: str | Path, kind: str = "auto", *,
                chunk_rows: int = 65536, hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128,
                nlist: int | None = None, m: int | None = None, nbits: int = 8, nprobe: int | None = None,
                rerank: int = 4, train_rows: int | None = None, seed: int = 0, dtype: str = "float32",
                ranges=None, rescore: int = 0) -> dict:
    """Build one cosine index over ``column`` of the files; returns the parameters written to JSON.

    ``column`` is a raw variant's column, or a ``derive.Reader`` that makes a derived variant
    (a mix, a fitted transform) from its source columns chunk by chunk.

    ``dtype`` ``int8`` or ``binary``: the column holds a quantised output's codes (``ranges``: its
    int8 ranges), indexed as the module doc says; ``rescore`` is the multiplier searches use by default.

    Memory is bounded by ``chunk_rows`` vectors for reading (plus, for ``ivfpq``, a training
    sample of ``train_rows``), on top of the index itself. Index order is file order, then
    row order, and the ids file records it.
    """
    if kind not in KINDS:
        raise IndexBuildError(f"kind {kind!r}: choose from {', '.join(KINDS)}")
    if chunk_rows < 1:
        raise IndexBuildError(f"chunk_rows must be positive, got {chunk_rows}")
    files = [Path(f) for f in embedding_files]
    if not files:
        raise IndexBuildError("no embedding files given")
    out_path = Path(out_path)
    if out_path.suffix != ".faiss":
        raise IndexBuildError(f"{out_path}: an index path must end in .faiss (e.g. indexes/L15.mean.faiss)")
    raw = quantize.is_quantized(dtype)
    if raw and not isinstance(column, str):
        raise IndexBuildError(f"{column.variant.name}: derived variants (mixes, transforms) are made from float "
                              f"columns; a {dtype} output has none")
    rows, source_dim = _survey(files, column, chunk_rows)
    if raw:
        dim = source_dim * 8 if dtype == "binary" else source_dim
        if dtype == "int8":
            ranges = np.asarray(ranges, dtype=np.float32) if ranges is not None else None
            if ranges is None or ranges.shape != (2, dim):
                raise IndexBuildError(f"{column}: int8 codes of dim {dim} need ranges of shape (2, {dim}), got "
                                      f"{None if ranges is None else ranges.shape}")
    else:
        dim = source_dim if isinstance(column, str) else column.dim(source_dim)
    kind = choose_kind(rows) if kind == "auto" else kind
    params = {**_base_params(kind, dtype, rows, dim, rescore),
              "column": column if isinstance(column, str) else None,
              "variant": None if isinstance(column, str) else column.variant.name,
              "source_columns": _columns(column), "files": [str(f) for f in files]}

    def sample(n: int) -> np.ndarray:
        return _training_sample(files, column, source_dim if raw else dim, chunk_rows, rows, n, seed, source_dim,
                                raw)

    index, extra = _make_index(kind, dim, rows, dtype, ranges, sample, hnsw_m=hnsw_m, ef_construction=ef_construction,
                               ef_search=ef_search, nlist=nlist, m=m, nbits=nbits, nprobe=nprobe, rerank=rerank,
                               train_rows=train_rows)
    params.update(extra)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    ids_path, json_path = _sidecars(out_path)
    tmp_index, tmp_ids, tmp_json = (p.with_name(p.name + ".tmp") for p in (out_path, ids_path, json_path))
    added = 0
    with pq.ParquetWriter(tmp_ids, pa.schema([("id", pa.string())])) as writer:
        for ids, x in _chunks(files, column, source_dim if raw else dim, chunk_rows, source_dim, raw):
            _add(index, dtype, ranges, x)
            writer.write_table(pa.table({"id": pa.array(ids, pa.string())}))
            added += len(ids)
    if added != rows or index.ntotal != rows:
        raise IndexBuildError(f"read {added} rows but the files declare {rows}; were they modified during the build?")
    (faiss.write_index_binary if dtype == "binary" else faiss.write_index)(index, str(tmp_index))
    tmp_json.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp_index, out_path)
    os.replace(tmp_ids, ids_path)
    os.replace(tmp_json, json_path)
    return params


def memory_index(ids: Sequence[str], stored: np.ndarray, dtype: str = "float32", ranges=None, kind: str = "flat",
                 rescore: int = 0, seed: int = 0, **options) -> "LoadedIndex":
    """The index ``build_index`` would build over these stored vectors, in memory (the evaluators'
    search, so that a quantised variant is scored exactly as its index would answer)."""
    raw = quantize.is_quantized(dtype)
    x = np.ascontiguousarray(stored) if raw else np.array(stored, dtype=np.float32, order="C", copy=True)
    if not raw:
        faiss.normalize_L2(x)
    dim = x.shape[1] * 8 if dtype == "binary" else x.shape[1]
    rows = len(x)
    kind = choose_kind(rows) if kind == "auto" else kind
    defaults = dict(hnsw_m=32, ef_construction=200, ef_search=128, nlist=None, m=None, nbits=8, nprobe=None,
                    rerank=4, train_rows=None)
    rng = np.random.default_rng(seed)
    index, extra = _make_index(kind, dim, rows, dtype, ranges,
                               lambda n: x[np.sort(rng.choice(rows, size=n, replace=False))], **{**defaults, **options})
    _add(index, dtype, ranges, x)
    params = {**_base_params(kind, dtype, rows, dim, rescore), **extra}
    if params["kind"] == "ivf":  # rescoring reconstructs documents by id
        (index if dtype == "binary" else faiss.extract_index_ivf(index)).make_direct_map()
    return LoadedIndex(index=index, ids=np.array(list(ids), dtype=object), params=params)


# --------------------------------------------------------------------------- searching


@dataclass
class LoadedIndex:
    index: faiss.Index
    ids: np.ndarray  # object array of str, position = FAISS row
    params: dict

    @property
    def dtype(self) -> str:
        return self.params.get("dtype") or "float32"  # indexes built before quantised outputs are float

    def search(self, queries: np.ndarray, k: int, *, rescore: int | None = None
               ) -> tuple[np.ndarray, list[list[str | None]]]:
        """Top-k by cosine: scores (n, min(k, rows)) and ids, best first.

        Queries are normalised here, so raw model outputs can be passed. A slot FAISS could
        not fill (possible with approximate kinds) has id None and score NaN.

        Quantised indexes (module doc): an int8 index scores the float query against the decoded
        documents; a binary one binarises the query and scores ``1 - 2 * hamming / dim``.
        ``rescore`` (default: the JSON's) > 1 re-scores ``rescore x k`` candidates by the cosine of
        the float query with the stored document vectors; 0 or 1 turns it off.
        """
        q = np.array(queries, dtype=np.float32, ndmin=2, copy=True, order="C")
        if q.shape[1] != self.index.d:
            raise ValueError(f"queries have dim {q.shape[1]}, the index has {self.index.d}")
        faiss.normalize_L2(q)
        k = min(k, self.index.ntotal)
        mult = int((self.params.get("rescore") or 0) if rescore is None else rescore)
        if not quantize.is_quantized(self.dtype):
            mult = 0  # float vectors: the index's scores are the float cosines already
        fetch = min(k * mult, self.index.ntotal) if mult > 1 else k
        if self.dtype == "binary":
            dist, labels = self.index.search(quantize.binarize(q), fetch)
            scores = 1.0 - 2.0 * dist.astype(np.float32) / self.index.d
        else:
            scores, labels = self.index.search(q, fetch)
        if mult > 1:
            scores, labels = self._rescore(q, labels, k)
        scores = np.asarray(scores, dtype=np.float32)
        scores[labels < 0] = np.nan
        ids = [[self.ids[i] if i >= 0 else None for i in row] for row in labels]
        return scores, ids

    def _stored(self, keys: np.ndarray) -> np.ndarray:
        """Documents as float32 unit vectors (decoded int8, or sign vectors), reconstructed from the index."""
        if self.dtype == "binary":
            if getattr(self, "_codes", None) is None:  # flat and HNSW keep the codes in one array
                flat = self.index if isinstance(self.index, faiss.IndexBinaryFlat) else (
                    faiss.downcast_IndexBinary(self.index.storage) if hasattr(self.index, "storage") else None)
                self._codes = (faiss.vector_to_array(flat.xb).reshape(-1, self.index.d // 8)
                               if isinstance(flat, faiss.IndexBinaryFlat) else False)
            if self._codes is not False:
                codes = self._codes[keys]
            else:
                codes = np.stack([self.index.reconstruct(int(i)) for i in keys]) if len(keys) else \
                    np.zeros((0, self.index.d // 8), dtype=np.uint8)
            return quantize.sign_vectors(codes)
        x = self.index.reconstruct_batch(keys) if len(keys) else np.zeros((0, self.index.d), dtype=np.float32)
        return quantize.unit_rows(x)

    def _rescore(self, q: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        docs = self._stored(np.where(labels >= 0, labels, 0).ravel().astype(np.int64)).reshape(*labels.shape, -1)
        scores = np.einsum("ij,ikj->ik", q, docs)
        scores[labels < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(labels, order, axis=1)


def load_index(path: str | Path, *, ef_search: int | None = None, nprobe: int | None = None,
               rerank: int | None = None, rescore: int | None = None) -> LoadedIndex:
    """Open an index written by ``build_index``; search-time knobs default to the JSON's values."""
    path = Path(path)
    ids_path, json_path = _sidecars(path)
    for p in (path, ids_path, json_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (an index is the .faiss file plus .ids.parquet and .json)")
    params = json.loads(json_path.read_text())
    binary = params.get("dtype") == "binary"
    ondisk = bool(params.get("ondisk"))  # an IVF-PQ built on Ray (index_ray.py): lists memory-mapped from .ivfdata
    # IO_FLAG_ONDISK_SAME_DIR only where the output moved since the build (FAISS prints a line when it re-points)
    moved = ondisk and params.get("ondisk_path") != str((path.parent / params["ondisk"]).resolve())
    index = faiss.read_index_binary(str(path)) if binary else \
        faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR if moved else 0)
    ids = np.array(pq.read_table(ids_path, columns=["id"]).column("id").to_pylist(), dtype=object)
    present = int(sum(i is not None for i in ids)) if ondisk else len(ids)  # ondisk: indexed by label, holes null
    if present != index.ntotal:
        raise IndexBuildError(f"{ids_path}: {present} ids for {index.ntotal} vectors in {path}")
    if params["kind"] == "hnsw":
        index.hnsw.efSearch = ef_search or params["efSearch"]
    elif params["kind"] == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = nprobe or params["nprobe"]
        if params.get("rerank"):
            index.k_factor = float(rerank or params["rerank"])
    elif params["kind"] == "ivf":  # a quantised output's IVF (no PQ): reconstructing for rescoring needs the map
        ivf = index if binary else faiss.extract_index_ivf(index)
        ivf.nprobe = nprobe or params["nprobe"]
        ivf.make_direct_map()
    if rescore is not None:
        params = {**params, "rescore": rescore}
    return LoadedIndex(index=index, ids=ids, params=params)


def recall_at_k(approx_ids: Sequence[Sequence], exact_ids: Sequence[Sequence], k: int) -> float:
    """Mean share of each query's exact top-k that the approximate top-k also found (ANN recall)."""
    if len(approx_ids) != len(exact_ids) or not len(exact_ids):
        raise ValueError(f"need the same, non-zero number of queries: {len(approx_ids)} vs {len(exact_ids)}")
    shares = []
    for approx, exact in zip(approx_ids, exact_ids):
        truth = {i for i in list(exact)[:k] if i is not None}
        found = {i for i in list(approx)[:k] if i is not None}
        shares.append(len(truth & found) / len(truth) if truth else 1.0)
    return float(np.mean(shares))


def index_path(out_dir: str | Path, variant: Variant) -> Path:
    """Where a variant's index lives in an output: ``indexes/{variant}.faiss`` (+ .ids.parquet, .json)."""
    return Path(out_dir) / INDEXES / f"{safe_name(variant.name)}.faiss"


def committed_files(manifest: dict) -> list[str]:
    """Committed embedding files relative to the output root, in the order indexes add them."""
    return [f"{s['output']}/{f}" for s in sorted(manifest.get("shards", []), key=lambda s: s["path"])
            for f in s["files"]]


def _wanted(manifest: dict, variants: Sequence[Variant | str] | None, where: str) -> list[Variant]:
    from .derive import DERIVED

    known = [Variant.from_row(v) for v in manifest.get("variants", [])]
    known += [Variant.parse(name) for name in manifest.get(DERIVED, {})]
    if variants is None:
        return known
    wanted = [Variant.parse(v) for v in variants]
    unknown = [v.name for v in wanted if v not in known]
    if unknown:
        raise IndexBuildError(f"variant(s) {', '.join(unknown)} not in {where}; it has "
                              f"{', '.join(v.name for v in known)}")
    return wanted


def index_status(output: str | Path, manifest: dict, variants: Sequence[Variant | str] | None = None,
                 kind: str = "auto") -> tuple[list[Variant], list[Variant]]:
    """(variants whose index must be (re)built, variants whose index is up to date), for an
    output at any fsspec URL (only the small records are read).

    An index is up to date when its three files exist and ``indexes/_built.json`` says it was
    built, with this kind, from exactly the manifest's committed files (a re-embedded shard
    gets a new folder name, so any change of the embeddings makes it stale).
    """
    from .storage import Output

    out = Output(str(output))
    built = out.read_json(f"{INDEXES}/{BUILT_FILE}") or {}
    files = committed_files(manifest)
    stale, fresh = [], []
    for v in _wanted(manifest, variants, str(output)):
        rec = built.get(v.name)
        name = index_path("", v).name
        present = all(out.fs.exists(out.path(INDEXES, p.name)) for p in (Path(name), *_sidecars(Path(name))))
        ok = present and rec is not None and rec.get("files") == files and rec.get("kind") == kind
        (fresh if ok else stale).append(v)
    return stale, fresh


def build_indexes(out_dir: str | Path, variants: Sequence[Variant | str] | None = None, kind: str = "auto", *,
                  manifest: dict | None = None, on_built=None, **options) -> dict[Variant, dict]:
    """One index per variant of an embedding output (a local directory): ``indexes/{variant}.faiss``.

    Streams the committed parts the manifest lists (never a directory listing) and records in
    ``indexes/_built.json`` what each index was built from, after the index itself (a crash
    leaves the record stale, never wrong). ``on_built(variant, params, seconds)`` is called
    after each one.
    """
    from .derive import reader
    from .storage import Output

    out_dir = Path(out_dir)
    manifest = manifest if manifest is not None else Output(str(out_dir)).read_manifest()
    if not manifest:
        raise IndexBuildError(f"{out_dir} has no manifest.json: run `strata embed` first")
    wanted = _wanted(manifest, variants, str(out_dir))
    files = committed_files(manifest)
    if not files:
        raise IndexBuildError(f"{out_dir} has no committed embeddings to index")
    missing = [f for f in files if not (out_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir / missing[0]}: listed in the manifest but missing")
    Output(str(out_dir)).check_parts(manifest)  # a damaged part is named (DamagedOutput), never read
    built_rec = Output(str(out_dir)).read_json(f"{INDEXES}/{BUILT_FILE}") or {}
    dtype = manifest.get("signature", {}).get("dtype") or "float32"
    ranges = quantize.read_ranges(str(out_dir))[0] if dtype == "int8" else {}
    built = {}
    for v in wanted:
        t0 = time.perf_counter()
        params = build_index([out_dir / f for f in files], reader(out_dir, manifest, v), index_path(out_dir, v), kind,
                             dtype=dtype, ranges=ranges.get(v.name), **options)
        built[v] = params
        built_rec[v.name] = {"files": files, "kind": kind, "built_kind": params["kind"], "rows": params["rows"],
                             "built_at": utc_now()}
        write_atomic(LocalFileSystem(), str(out_dir / INDEXES / BUILT_FILE),
                     (json.dumps(built_rec, indent=1, sort_keys=True) + "\n").encode())
        if on_built:
            on_built(v, params, time.perf_counter() - t0)
    return built

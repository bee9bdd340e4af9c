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
    if pa.types.is_fixed_size_list(t) and t.value_type in (pa.float32(), pa.float16(), pa.float64()):
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


def _to_matrix(path: Path, batch: pa.RecordBatch, column: str, dim: int) -> np.ndarray:
    """The column as a float32 (rows, dim) array; null or ragged vectors are errors."""
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
    return np.ascontiguousarray(values.to_numpy(zero_copy_only=False).reshape(-1, dim), dtype=np.float32)


def _matrix(path: Path, batch: pa.RecordBatch, source, source_dim: int) -> np.ndarray:
    """A chunk's vectors: the raw column, or the derived variant made from its source columns."""
    if isinstance(source, str):
        return _to_matrix(path, batch, source, source_dim)
    return np.ascontiguousarray(source.apply([_to_matrix(path, batch, c, source_dim) for c in source.columns]),
                                dtype=np.float32)


def _chunks(files: Sequence[Path], column, dim: int, chunk_rows: int, source_dim: int | None = None):
    """(ids, normalised float32 vectors) per chunk, in file order then row order."""
    source_dim = dim if source_dim is None else source_dim
    for path in files:
        for batch in _batches(path, column, chunk_rows):
            if batch.column("id").null_count:
                raise IndexBuildError(f"{path}: null id")
            x = _matrix(path, batch, column, source_dim)
            if x.shape[1] != dim:
                raise IndexBuildError(f"{path}: {column} has dim {x.shape[1]}, other files have {dim}")
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


def _training_sample(files, column, dim, chunk_rows, rows, n, seed, source_dim) -> np.ndarray:
    """n rows drawn uniformly without replacement, gathered in one streaming pass."""
    wanted = np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))
    sample, start = [], 0
    for _, x in _chunks(files, column, dim, chunk_rows, source_dim):
        lo, hi = np.searchsorted(wanted, [start, start + len(x)])
        sample.append(x[wanted[lo:hi] - start])
        start += len(x)
    return np.concatenate(sample)


def build_index(embedding_files: Sequence[str | Path], column, out_path: str | Path, kind: str = "auto", *,
                chunk_rows: int = 65536, hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128,
                nlist: int | None = None, m: int | None = None, nbits: int = 8, nprobe: int | None = None,
                rerank: int = 4, train_rows: int | None = None, seed: int = 0) -> dict:
    """Build one cosine index over ``column`` of the files; returns the parameters written to JSON.

    ``column`` is a raw variant's column, or a ``derive.Reader`` that makes a derived variant
    (a mix, a fitted transform) from its source columns chunk by chunk.

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
    rows, source_dim = _survey(files, column, chunk_rows)
    dim = source_dim if isinstance(column, str) else column.dim(source_dim)
    kind = choose_kind(rows) if kind == "auto" else kind
    params = {"kind": kind, "metric": "cosine", "column": column if isinstance(column, str) else None,
              "variant": None if isinstance(column, str) else column.variant.name,
              "source_columns": _columns(column), "rows": rows, "dim": dim,
              "files": [str(f) for f in files], "hnsw_M": None, "efConstruction": None, "efSearch": None,
              "nlist": None, "m": None, "nbits": None, "nprobe": None, "rerank": None, "train_rows": None,
              "faiss_version": faiss.__version__}

    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = ef_construction, ef_search
        params.update(hnsw_M=hnsw_m, efConstruction=ef_construction, efSearch=ef_search)
    else:
        nlist = nlist or max(1, min(int(4 * math.sqrt(rows)), rows // _MIN_POINTS_PER_CENTROID))
        m = m or _pq_m(dim)
        if dim % m:
            raise IndexBuildError(f"PQ m={m} must divide the dim {dim}")
        n_train = min(rows, train_rows or min(64 * max(nlist, 2 ** nbits), 500_000))
        if n_train < nlist:
            raise IndexBuildError(f"{n_train} training vectors for nlist={nlist}: need at least one per list")
        # A PQ codebook of 2**nbits centroids needs ~39 points each; shrink it for small sets.
        nbits = max(1, min(nbits, int(math.log2(max(2, n_train // _MIN_POINTS_PER_CENTROID)))))
        nprobe = min(nlist, nprobe or max(8, nlist // 16))
        ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = nprobe
        index = faiss.IndexRefineFlat(ivf)
        index.k_factor = float(rerank)
        index.train(_training_sample(files, column, dim, chunk_rows, rows, n_train, seed, source_dim))
        params.update(nlist=nlist, m=m, nbits=nbits, nprobe=nprobe, rerank=rerank, train_rows=n_train)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    ids_path, json_path = _sidecars(out_path)
    tmp_index, tmp_ids, tmp_json = (p.with_name(p.name + ".tmp") for p in (out_path, ids_path, json_path))
    added = 0
    with pq.ParquetWriter(tmp_ids, pa.schema([("id", pa.string())])) as writer:
        for ids, x in _chunks(files, column, dim, chunk_rows, source_dim):
            index.add(x)
            writer.write_table(pa.table({"id": pa.array(ids, pa.string())}))
            added += len(ids)
    if added != rows or index.ntotal != rows:
        raise IndexBuildError(f"read {added} rows but the files declare {rows}; were they modified during the build?")
    faiss.write_index(index, str(tmp_index))
    tmp_json.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp_index, out_path)
    os.replace(tmp_ids, ids_path)
    os.replace(tmp_json, json_path)
    return params


# --------------------------------------------------------------------------- searching


@dataclass
class LoadedIndex:
    index: faiss.Index
    ids: np.ndarray  # object array of str, position = FAISS row
    params: dict

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str | None]]]:
        """Top-k by cosine: scores (n, min(k, rows)) and ids, best first.

        Queries are normalised here, so raw model outputs can be passed. A slot FAISS could
        not fill (possible with approximate kinds) has id None and score NaN.
        """
        q = np.array(queries, dtype=np.float32, ndmin=2, copy=True, order="C")
        if q.shape[1] != self.index.d:
            raise ValueError(f"queries have dim {q.shape[1]}, the index has {self.index.d}")
        faiss.normalize_L2(q)
        scores, labels = self.index.search(q, min(k, self.index.ntotal))
        scores[labels < 0] = np.nan
        ids = [[self.ids[i] if i >= 0 else None for i in row] for row in labels]
        return scores, ids


def load_index(path: str | Path, *, ef_search: int | None = None, nprobe: int | None = None,
               rerank: int | None = None) -> LoadedIndex:
    """Open an index written by ``build_index``; search-time knobs default to the JSON's values."""
    path = Path(path)
    ids_path, json_path = _sidecars(path)
    for p in (path, ids_path, json_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (an index is the .faiss file plus .ids.parquet and .json)")
    params = json.loads(json_path.read_text())
    index = faiss.read_index(str(path))
    ids = np.array(pq.read_table(ids_path, columns=["id"]).column("id").to_pylist(), dtype=object)
    if len(ids) != index.ntotal:
        raise IndexBuildError(f"{ids_path}: {len(ids)} ids for {index.ntotal} vectors in {path}")
    if params["kind"] == "hnsw":
        index.hnsw.efSearch = ef_search or params["efSearch"]
    elif params["kind"] == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = nprobe or params["nprobe"]
        index.k_factor = float(rerank or params["rerank"])
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
    built_rec = Output(str(out_dir)).read_json(f"{INDEXES}/{BUILT_FILE}") or {}
    built = {}
    for v in wanted:
        t0 = time.perf_counter()
        params = build_index([out_dir / f for f in files], reader(out_dir, manifest, v), index_path(out_dir, v), kind,
                             **options)
        built[v] = params
        built_rec[v.name] = {"files": files, "kind": kind, "built_kind": params["kind"], "rows": params["rows"],
                             "built_at": utc_now()}
        write_atomic(LocalFileSystem(), str(out_dir / INDEXES / BUILT_FILE),
                     (json.dumps(built_rec, indent=1, sort_keys=True) + "\n").encode())
        if on_built:
            on_built(v, params, time.perf_counter() - t0)
    return built

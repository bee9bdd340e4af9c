"""Reading the committed vectors an index is built from: streamed in bounded chunks, validated.

Reading is here, not in storage, because it is the index's own streaming and validation of
vectors. A *source* is a raw variant's column name, or a ``derive.Reader`` that makes a derived
variant (a mix, a fitted transform) from its source columns chunk by chunk.

Public: ``source_columns``, ``file_rows``, ``file_dim``, ``survey`` and ``read_vectors`` (both
engines read through them; the Ray tasks read one part each).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .layout import IndexBuildError


def part_ref(path) -> "Path | str":
    """A part as this module reads it: a local ``Path``, or a URL (``s3://…``) kept as a string and read
    through fsspec with its registered storage options, in ranged reads (never downloaded whole)."""
    return str(path) if "://" in str(path) else Path(path)


def _remote(path) -> bool:
    return isinstance(path, str)


def _open(path):
    from ..stores import filesystem, open_ranged

    fs, p = filesystem(path)
    return open_ranged(fs, p)


def _is_parquet(path) -> bool:
    return str(path).lower().endswith((".parquet", ".pq"))


def _parquet(path) -> pq.ParquetFile:
    return pq.ParquetFile(_open(path) if _remote(path) else path)


def _ipc_reader(path):
    if _remote(path):
        f = _open(path)
        try:
            return pa.ipc.open_file(f)
        except pa.ArrowInvalid:
            f.seek(0)
            return pa.ipc.open_stream(f)
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(str(path)))


def _schema(path) -> pa.Schema:
    if _remote(path):
        from ..storage import redact
        from ..stores import filesystem

        fs, p = filesystem(path)
        if not fs.isfile(p):
            raise IndexBuildError(f"{redact(path)}: embedding file not found")
    elif not path.is_file():
        raise IndexBuildError(f"{path}: embedding file not found")
    return _parquet(path).schema_arrow if _is_parquet(path) else _ipc_reader(path).schema


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


def file_rows(path: Path) -> int:
    """Rows of one embedding file (Parquet: from its footer)."""
    if _is_parquet(path):
        return _parquet(path).metadata.num_rows
    reader = _ipc_reader(path)
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    return sum(b.num_rows for b in reader)


def source_columns(source) -> list[str]:
    """The stored columns a source reads: a raw variant's column, or a derived variant's sources."""
    return [source] if isinstance(source, str) else list(source.columns)


def _batches(path: Path, source, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    columns = source_columns(source)
    if _is_parquet(path):
        yield from _parquet(path).iter_batches(columns=["id", *columns], batch_size=chunk_rows)
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


def file_dim(path: Path, source, chunk_rows: int = 1024) -> int:
    """The stored vector dim of a source's first column in one file (every column checked to be there
    and a vector column); -1 where a variable-list column has no rows to tell."""
    columns = source_columns(source)
    schema = _schema(path)
    for c in columns[1:]:
        _vector_dim(path, schema, c)
    dim = _vector_dim(path, schema, columns[0])
    if dim < 0:  # variable list type: read one chunk to learn the dim
        first = next(_batches(path, columns[0], chunk_rows), None)
        dim = _to_matrix(path, first, columns[0], -1).shape[1] if first is not None and first.num_rows else -1
    return dim


def read_vectors(files: Sequence[Path], source, dim: int, chunk_rows: int, source_dim: int | None = None,
                 raw: bool = False) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, L2-normalised float32 vectors) per chunk of at most ``chunk_rows`` rows, in file order then
    row order; ``dim`` is the vectors' dim (a whitened variant's may differ from ``source_dim``, the
    stored one). ``raw``: a quantised column's stored values, as they are."""
    source_dim = dim if source_dim is None else source_dim
    for path in files:
        path = part_ref(path)
        for batch in _batches(path, source, chunk_rows):
            if batch.column("id").null_count:
                raise IndexBuildError(f"{path}: null id")
            x = _to_matrix(path, batch, source, source_dim, raw=True) if raw else _matrix(path, batch, source,
                                                                                              source_dim)
            if x.shape[1] != dim:
                raise IndexBuildError(f"{path}: {source} has dim {x.shape[1]}, other files have {dim}")
            if not raw:
                faiss.normalize_L2(x)
            yield [str(v) for v in batch.column("id").to_pylist()], x


def survey(files: Sequence[Path], source, chunk_rows: int) -> tuple[int, int]:
    """Total rows and the common stored vector dim of the source's column(s), checked before any work."""
    column = source_columns(source)[0]
    dims, rows = set(), 0
    for path in files:
        dim = file_dim(path, source, chunk_rows)
        if dim >= 0:
            dims.add(dim)
        rows += file_rows(path)
    if len(dims) > 1:
        raise IndexBuildError(f"column {column} has different dims across files: {sorted(dims)}")
    if rows == 0 or not dims:
        raise IndexBuildError(f"no rows to index in {len(files)} file(s)")
    return rows, dims.pop()


def row_keys(files: Sequence[Path]) -> pa.Table:
    """Each row's identity, in file then row order: ``id``, ``key`` (the part's content key; null in
    parts written before keys were stored), ``file`` (its position in ``files``) and ``row``."""
    tables = []
    for i, path in enumerate(files):
        path = part_ref(path)
        names = _schema(path).names
        cols = ["id"] + (["key"] if "key" in names else [])
        if _is_parquet(path):
            t = _parquet(path).read(columns=cols)
        else:
            reader = _ipc_reader(path)
            t = reader.read_all().select(cols) if isinstance(reader, pa.ipc.RecordBatchFileReader) else \
                pa.Table.from_batches(list(reader)).select(cols)
        key = t.column("key").cast(pa.binary(16)) if "key" in cols else pa.nulls(t.num_rows, pa.binary(16))
        tables.append(pa.table({"id": t.column("id").cast(pa.string()), "key": key,
                                "file": pa.array(np.full(t.num_rows, i, dtype=np.int32)),
                                "row": pa.array(np.arange(t.num_rows, dtype=np.int64))}))
    return pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string()),
                                                             "key": pa.array([], pa.binary(16)),
                                                             "file": pa.array([], pa.int32()),
                                                             "row": pa.array([], pa.int64())})

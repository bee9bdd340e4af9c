"""The input side of ``embed``: Parquet shards listed and inspected, cut into work units, and
the incremental plan (which shards to embed, keep or drop against the manifest)."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import about
from ..storage import redact, shard_key
from ..stores import exists, filesystem, is_glob, is_local, open_ranged

log = logging.getLogger(__name__)

UNIT_ROWS = 2048  # rows per read task


@dataclass
class Shard:
    path: str  # filesystem path (no protocol)
    rel: str  # path relative to the input root: names the shard in ids and outputs
    fingerprint: str
    rows: int = 0
    row_groups: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def key(self) -> str:
        return shard_key(self.rel)


def is_data(rel: str) -> bool:
    """Whether a path under the input root is data: no file or folder on the way starts with
    ``_`` or ``.`` (Spark's ``_temporary/…/attempt_*`` task output, ``_SUCCESS``, ``.crc``
    checksums, hidden files), as Spark, Hive and Arrow dataset discovery treat them."""
    return not any(part.startswith(("_", ".")) for part in rel.strip("/").split("/") if part)


def _find_local(root: str, output: str | None) -> list[str]:
    """Every file under a local folder, following directory links (fsspec's ``find`` does not: the
    shards behind ``data/2024 -> elsewhere`` were skipped silently), each real folder once (a link
    cycle ends there); a link that leads into ``output`` is refused."""
    out_real = os.path.realpath(output) if output and "://" not in output else None
    inside = (lambda real: real == out_real or real.startswith(out_real.rstrip("/") + "/")) if out_real else None
    if inside and inside(os.path.realpath(root)):
        inside = None  # INPUT itself inside OUTPUT (an evaluation's staged texts): storage.overlap decides that
    seen, found = set(), []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if inside and inside(real):
            raise ValueError(f"{redact(folder)} under INPUT leads to {redact(real)}, inside OUTPUT: Strata would read "
                             f"its own output as input; remove the link or choose another output")
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        found += [os.path.join(folder, f) for f in files]
    return found


def list_shards(url: str, output: str | None = None) -> tuple[Any, list[Shard]]:
    """Parquet files at a URL: a file, a directory (searched recursively, directory links followed
    on a local disk, none into ``output``) or a glob. Listed afresh: an object store's filesystem is
    cached per process with its listings, which would hide new, changed (their ETag) or removed
    shards from a long-lived driver."""
    with about(url):
        return _list_shards(url, output)


def _list_shards(url: str, output: str | None) -> tuple[Any, list[Shard]]:
    fs, root = filesystem(url)
    fs.invalidate_cache()
    if is_glob(fs, root):
        base = root.split("*")[0].rsplit("/", 1)[0]
        paths = sorted(p for p in fs.glob(root) if p.endswith(".parquet") and is_data(p[len(base):]))
    elif fs.isdir(root):
        base = root.rstrip("/")
        every = _find_local(base, output) if is_local(fs) else fs.find(root)
        paths = sorted(p for p in every if p.endswith(".parquet") and is_data(p[len(base):]))
    elif exists(fs, root):
        paths, base = [root], root.rsplit("/", 1)[0]
    else:
        raise FileNotFoundError(f"input {redact(url)} does not exist")
    if not paths:
        raise FileNotFoundError(f"no Parquet files (*.parquet) found at {redact(url)}")
    shards = []
    for p in paths:
        info = fs.info(p)
        if info.get("type", "file") != "file":  # a FIFO or a device would hang the reader
            log.warning("skipping %s: not a regular file (%s)", redact(p), info.get("type"))
            continue
        stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("updated")
        rel = p[len(base):].lstrip("/") or p.rsplit("/", 1)[-1]
        shards.append(Shard(p, rel, f"size={info.get('size')};stamp={stamp}"))
    return fs, shards


def inspect_shards(fs, shards: list[Shard], text_column: str, id_column: str | None) -> None:
    """Read each shard's footer: row counts, and the columns checked before any model loads.

    A shard that cannot be read gets ``error`` (the job goes on with the others); a missing
    or mistyped column is an error of the whole job, raised at once.
    """
    for s in shards:
        try:
            with open_ranged(fs, s.path) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
                s.fingerprint += f";footer={_footer_digest(f)}"
        except Exception as e:  # noqa: BLE001 - any unreadable file is this shard's error
            s.error = f"not a readable Parquet file: {type(e).__name__}: {e}"
            continue
        names = schema.names
        for column in (text_column, id_column):
            if column and names.count(column) > 1:
                raise ValueError(f"{s.rel} has {names.count(column)} columns named {column!r}: which one holds the "
                                 f"{'text' if column == text_column else 'ids'} is ambiguous; rename one")
        if text_column not in names:
            raise ValueError(f"text column {text_column!r} not found in {s.rel}; available columns: {', '.join(names)}")
        t = schema.field(text_column).type
        if not _is_text(t.value_type if pa.types.is_dictionary(t) else t):
            raise ValueError(f"text column {text_column!r} in {s.rel} has type {t}, expected a string column")
        if id_column and id_column not in names:
            raise ValueError(f"id column {id_column!r} not found in {s.rel}; available columns: {', '.join(names)}")
        s.rows = meta.num_rows
        s.row_groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _footer_digest(f) -> str:
    """A digest of the Parquet footer (row group offsets and sizes, column statistics): with the
    size and modification time (or ETag) it tells a rewritten shard from the committed one even
    when the size is the same and the time was put back."""
    f.seek(-8, 2)
    length = int.from_bytes(f.read(4), "little")
    f.seek(-(length + 8), 2)
    return hashlib.sha256(f.read(length)).hexdigest()[:16]


def same_shard(committed: str, current: str) -> bool:
    """Whether a committed fingerprint still describes the shard. Fingerprints recorded before the
    footer digest was added are compared on size and time only (such outputs resume as before)."""
    return committed == current or (";footer=" not in committed and current.split(";footer=")[0] == committed)


def work_units(shards: list[Shard], unit_rows: int = UNIT_ROWS) -> list[dict]:
    """Each shard cut into row ranges of ``unit_rows``, whatever its row groups: a range reads the
    row groups it overlaps (``rgs``) and skips ``skip`` rows of the first. Many small row groups
    are packed into one unit; a large one is split across several."""
    units = []
    for idx, s in enumerate(shards):
        starts = np.cumsum([0, *s.row_groups])
        for start in range(0, s.rows, unit_rows):
            stop = min(s.rows, start + unit_rows)
            first = int(np.searchsorted(starts, start, side="right")) - 1
            last = int(np.searchsorted(starts, stop, side="left")) - 1
            units.append({"unit": len(units), "shard": idx, "path": s.path, "rel": s.rel,
                          "rgs": list(range(first, last + 1)), "skip": int(start - starts[first]), "row0": start,
                          "rows": stop - start, "planned": False})
    return units


@dataclass
class UnitRows:
    """One work unit's rows as read: row numbers, texts, ids, and each row's reject reason (None: good)."""

    rows: np.ndarray
    texts: list
    ids: list
    reasons: list


def _reject_reason(text) -> str | None:
    if text is None:
        return "null text"
    if not text.strip():
        return "empty text"
    return None


def read_unit(unit: dict, fs, text_column: str, id_column: str | None) -> UnitRows:
    """Read a work unit's texts (and ids) and judge each row: a null, empty or undecodable text, or a
    null or undecodable id, is rejected with its reason. Raises if the file changed since it was listed."""
    row0, n = int(unit["row0"]), int(unit["rows"])
    rows = np.arange(row0, row0 + n, dtype=np.int64)
    cols = [text_column] + ([id_column] if id_column and id_column != text_column else [])
    with open_ranged(fs, unit["path"]) as f:
        t = pq.ParquetFile(f).read_row_groups(list(unit["rgs"]), columns=cols).slice(int(unit["skip"]), n)
    if t.num_rows != n:  # the file was replaced since it was listed (a shorter one): this shard fails alone
        raise ValueError(f"{t.num_rows} rows where {n} were listed from row {row0}: the file changed while "
                         f"it was being read")
    texts, bad_text = strings(t.column(text_column))
    if id_column:
        raw_ids, bad_id = strings(t.column(id_column))
        ids = [None if v is None else str(v) for v in raw_ids]
    else:
        ids, bad_id = [f"{unit['rel']}#{r}" for r in rows], {}
    reasons = [bad_text.get(i) or _reject_reason(x) for i, x in enumerate(texts)]
    for i, why in bad_id.items():
        reasons[i] = reasons[i] or f"id {why}"
        ids[i] = None
    for i, v in enumerate(ids):
        if v is None and reasons[i] is None:
            reasons[i] = "null id"
    return UnitRows(rows, texts, ids, reasons)


def plan(manifest: dict | None, shards: list[Shard]) -> tuple[list[Shard], list[dict], list[dict]]:
    """(to embed, committed entries to keep, committed entries to drop)."""
    done = {s["rel"]: s for s in (manifest or {}).get("shards", [])}
    current = {s.rel for s in shards}
    todo, keep = [], []
    for s in shards:
        entry = done.get(s.rel)
        if entry and same_shard(entry["fingerprint"], s.fingerprint):
            keep.append(entry)
        else:
            todo.append(s)
    drop = [e for rel, e in done.items() if rel not in current]
    return todo, keep, drop


def strings(column: pa.ChunkedArray) -> tuple[list, dict[int, str]]:
    """A column's values as Python objects, and {row: reason} for string values that are not
    valid UTF-8 (a binary column written as string, CESU-8 surrogates): those rows become None
    and are rejected alone, never failing the whole shard."""
    if pa.types.is_dictionary(column.type):  # e.g. a pandas categorical: its values
        column = column.cast(column.type.value_type)
    try:
        return column.to_pylist(), {}
    except UnicodeDecodeError:
        pass
    binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
    values, bad = [], {}
    for chunk in column.chunks:
        raw = chunk.cast(binary) if not pa.types.is_string_view(chunk.type) else chunk.cast(pa.binary_view())
        for b in raw.to_pylist():
            if b is None:
                values.append(None)
                continue
            try:
                values.append(b.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad[len(values)] = f"invalid UTF-8 (byte 0x{b[e.start]:02x} at offset {e.start})"
                values.append(None)
    return values, bad


def first_texts(fs, shards: list[Shard], text_column: str, n: int) -> list[str]:
    """The first ``n`` non-empty texts of the input, in shard then row order (int8 calibration)."""
    out: list[str] = []
    for s in shards:
        if s.error or not s.rows:
            continue
        with open_ranged(fs, s.path) as f:
            pf = pq.ParquetFile(f)
            for rg in range(pf.num_row_groups):
                for t in strings(pf.read_row_group(rg, columns=[text_column]).column(text_column))[0]:
                    if t is not None and t.strip():
                        out.append(t)
                        if len(out) >= n:
                            return out
    return out

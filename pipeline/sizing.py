"""Output size, planned before any work: rows (from the input's Parquet footers) x variants x bytes per vector.

The cost model is ``docs/scale.md``. Stored vectors do not compress (Parquet's dictionary and
run-length encodings find nothing in floats), so a part holds ``rows x bytes_per_vector`` per
variant, plus the ids. ``strata embed`` prints the projection on stderr and asks for ``--yes``
above ``CONFIRM_BYTES``.
"""

from __future__ import annotations

import re

import pyarrow.parquet as pq

CONFIRM_BYTES = 100 * 10**9  # embed asks for --yes above this projected size
ID_BYTES = 24  # a typical stored id ("{shard}:{row}" or a document id), with Parquet's length prefix


def vector_bytes(dim: int, dtype: str) -> float:
    """Stored bytes of one vector of ``dim`` in an output of ``dtype``."""
    per = {"float32": 4, "float16": 2, "int8": 1, "binary": 1 / 8}
    if dtype not in per:
        raise ValueError(f"dtype {dtype!r}: choose from {', '.join(per)}")
    return dim * per[dtype]


def index_bytes(kind: str, rows: int, dim: int, *, hnsw_m: int = 32, pq_m: int | None = None) -> int:
    """Approximate size of one float index of ``rows`` vectors (docs/scale.md)."""
    if kind == "flat":
        return int(rows * 4 * dim)
    if kind == "hnsw":  # vectors + ~2*M neighbour ids (int32) per vector on level 0
        return int(rows * (4 * dim + 2 * hnsw_m * 4))
    if kind == "ivfpq":  # PQ codes (m bytes) + an int64 id per vector; the local engine's re-ranking adds the vectors
        return int(rows * ((pq_m or max(1, dim // 4)) + 8))
    raise ValueError(f"kind {kind!r}: choose flat, hnsw or ivfpq")


def input_rows(url: str) -> int:
    """Rows of every Parquet shard at ``url`` (footers only)."""
    from .runner.shards import list_shards
    from .stores import open_ranged

    fs, shards = list_shards(url)
    total = 0
    for s in shards:
        try:
            with open_ranged(fs, s.path) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        except Exception:  # an unreadable shard: embed reports it (and its rows are not stored)
            continue
    return total


def projection(request, rows: int) -> dict:
    """{variant name: bytes}, ``ids`` and ``total`` for ``rows`` rows embedded with ``request``."""
    dtype, dim = request.settings.dtype, request.model.dim
    out = {v.name: int(rows * vector_bytes(dim, dtype)) for v in request.variants}
    out["ids"] = rows * ID_BYTES
    out["total"] = sum(out.values())
    return out


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def plan_lines(request, rows: int) -> list[str]:
    """What ``strata embed`` prints before it starts."""
    p = projection(request, rows)
    names = [v.name for v in request.variants]
    each = p[names[0]]
    return [f"projected output: {rows:,} rows x {len(names)} variant(s) x {request.model.dim} dims "
            f"{request.settings.dtype} = {human(p['total'])} ({human(each)} per variant, {human(p['ids'])} ids)"]


_SIZE_SHAPE = re.compile(r"\s*[0-9]+(?:\.[0-9]+)?\s*(?:[kmgtpe]i?)?b?\s*", re.IGNORECASE)  # bytes, never bits


def parse_size(text: str | int | None) -> int | None:
    """'500GB', '20 TB', '1.5TB', '2TiB' or a number of bytes -> bytes, read by pydantic's ``ByteSize``:
    kB..PB (and a bare k..P) are decimal, as ``human`` prints and docs/scale.md counts; KiB..PiB binary."""
    if text is None or isinstance(text, int):
        return text
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        if not _SIZE_SHAPE.fullmatch(str(text)):  # ByteSize reads a prefix only ('5.GB' as 5, '5 GB more' as 5 GB)
            raise ValueError
        return int(TypeAdapter(ByteSize).validate_python(str(text)))
    except (ValueError, ValidationError):
        raise ValueError(f"size {text!r}: write a number with a unit, e.g. 500GB or 20TB") from None


def check_size(request, rows: int, yes: bool, limit: int | str | None = None) -> None:
    """Refuse before any work when the projected output is above ``limit`` (default 100 GB) and
    the user has not said yes: ``--yes``, or a larger ``--max-output-size`` / a job spec's
    ``embedding.max_output_size``, which is the scheduled job's standing consent."""
    limit = CONFIRM_BYTES if limit is None else parse_size(limit)
    total = projection(request, rows)["total"]
    if total > limit and not yes:
        raise ValueError(f"the output would take about {human(total)} (above {human(limit)}): pass --yes or a larger "
                         f"--max-output-size (a job: embedding.max_output_size) to go on, or embed fewer variants "
                         f"(--layers, --poolings) or a smaller dtype (--dtype float16|int8)")

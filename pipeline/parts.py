"""One part file of an output: how it is written (Parquet options for vectors, in one upload or
aside then renamed), its CRC-32, its rows, and how it is read (a part that cannot be read is a
``DamagedOutput`` naming it). ``storage.Output`` keeps the manifest that lists the parts."""

from __future__ import annotations

import uuid
import zlib

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import redact_text as redact
from .stores import is_local, open_ranged


class DamagedOutput(ValueError):
    """A committed part is missing or differs from what the manifest recorded."""


def parquet_options(schema: pa.Schema) -> dict:
    """How embedding parts are written (BENCHMARKS.md, "Writing embedding parts"): vector columns
    without dictionary encoding (float values hardly repeat: a dictionary made parts larger than
    their raw size and cost most of the write time) and without min/max statistics (meaningless for
    vectors), zstd level 1, and float32 values byte-stream-split (their exponent bytes then compress;
    float16 keeps the plain layout that every Parquet reader of FLOAT16 understands)."""
    vectors = [f for f in schema if pa.types.is_fixed_size_list(f.type)]
    if not vectors:
        return {}
    others = [f.name for f in schema if not pa.types.is_fixed_size_list(f.type)]
    split = {f"{f.name}.list.element": "BYTE_STREAM_SPLIT" for f in vectors if f.type.value_type == pa.float32()}
    return dict(use_dictionary=others, write_statistics=others, compression="zstd", compression_level=1,
                **({"column_encoding": split} if split else {}))


def write_part(fs, path: str, table: pa.Table) -> str:
    """Write a Parquet or Arrow IPC part aside, then rename it into place (on an object store,
    one upload straight to its key: an upload is never seen half-done). Returns the CRC-32 of the
    bytes written (``crc32_hex``), which the manifest records for each committed part."""
    sink = pa.BufferOutputStream()
    if path.endswith(".arrow"):
        with pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
    else:
        pq.write_table(table, sink, **parquet_options(table.schema))
    data = sink.getvalue()
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if is_local(fs) else path
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
    except OSError as e:  # name the file (a full disk says only "No space left on device")
        if e.errno and not e.filename:
            raise OSError(e.errno, e.strerror, redact(path)) from e
        raise
    if tmp != path:
        fs.mv(tmp, path)
    return crc32_hex(memoryview(data))


def crc32_hex(data, crc: int = 0) -> str:
    return f"{zlib.crc32(data, crc) & 0xFFFFFFFF:08x}"


CHECKSUM_CHUNK = 8 << 20


def file_crc32(fs, path: str) -> str:
    """CRC-32 of a file's bytes, read in 8 MiB chunks (never whole in memory)."""
    crc = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHECKSUM_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc32_hex(b"", crc)


def part_rows(fs, path: str) -> int:
    """Rows of a Parquet or Arrow IPC part, from its footer."""
    with open_ranged(fs, path) as f:
        if path.endswith(".arrow"):
            r = pa.ipc.open_file(f)
            return sum(r.get_batch(i).num_rows for i in range(r.num_record_batches))
        return pq.ParquetFile(f).metadata.num_rows


def read_part(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    try:
        if path.endswith(".arrow"):
            with fs.open(path, "rb") as f:
                t = pa.ipc.open_file(f).read_all()
            return t.select(columns) if columns else t
        with open_ranged(fs, path) as f:
            return pq.read_table(f, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise DamagedOutput(f"committed part {redact(path)} is missing: the output is damaged; "
                                "re-run `strata embed` to re-embed its shard") from None
        raise DamagedOutput(f"committed part {redact(path)} cannot be read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]}): the output is damaged; re-run `strata embed` "
                            "to re-embed its shard") from None

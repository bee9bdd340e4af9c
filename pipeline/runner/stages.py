"""The distributed stages of ``embed``, each a function or class Ray runs on workers:
read + tokenise a work unit, embed blocks of rows (the actor around ``Encoder``), write parts.

Every stage returns one row per input row (or one metadata row per shard), so the driver can
account for every row exactly once (``commit.Committer``).
"""

from __future__ import annotations

import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import quantize
from ..encoder import Encoder
from ..request import Request
from ..templates import Tokenized, tokenize
from .shards import read_unit
from ..parts import write_part
from ..storage import STAGING, Output
from ..stores import use_storage_options

log = logging.getLogger(__name__)

EMBED_BATCH_ROWS = 256  # rows handed to an embed actor per call; sorted into token batches inside
MAX_CALLS_PER_ACTOR = 2  # one call writing its parts while the next runs the model


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(model_dir: str):
    """One tokenizer per worker process (Ray reuses workers across tasks)."""
    if model_dir not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[model_dir] = AutoTokenizer.from_pretrained(model_dir)
    return _TOKENIZERS[model_dir]


def _ids_column(k: int) -> str:
    return f"_ids{k}"


def _span_column(k: int) -> str:
    return f"_span{k}"


def planned_rows(plan_url: str, unit: dict) -> dict[str, np.ndarray]:
    """The plan rows of one work unit (``reuse.make_plan``): row, src, src_row, defer, by row."""
    from ..stores import filesystem

    from .reuse import PLAN_SCHEMA

    fs, root = filesystem(plan_url)
    folder = f"{root}/{int(unit['unit']):08d}"
    files = sorted(fs.ls(folder, detail=False)) if unit.get("planned") else []
    tables = []
    for path in files:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    t = pa.concat_tables(tables) if tables else PLAN_SCHEMA.empty_table()
    t = t.sort_by("row")
    return {"row": t.column("row").to_numpy(), "src": np.array(t.column("src").to_pylist(), dtype=object),
            "src_row": t.column("src_row").to_numpy(), "defer": t.column("defer").to_numpy(zero_copy_only=False)}


def read_and_tokenize(batch: pa.Table, *, fs, request: Request, text_column: str, id_column: str | None,
                      salt: bytes = b"", plan: str | None = None, only_planned: bool = False,
                      storage: dict | None = None) -> pa.Table:
    """Read one work unit and tokenise it under each of the request's templates (columns ``_ids{k}``,
    ``_span{k}`` for template k). Returns one row per input row this pass handles.

    Every row gets its key (``_key``, ``reuse.text_keys``). ``plan``: the pass's plan folder
    (``reuse.make_plan``): a row it copies is not tokenised but carries ``_src`` (the part's URL)
    and ``_src_row`` (the embed stage copies the stored vectors); a row it defers is left to the
    second pass; with ``only_planned`` (the second pass) rows it does not list were handled before.
    ``storage``: the driver's registered storage options (the plan is on the output's store)."""
    from .reuse import text_keys

    use_storage_options(storage or {})
    unit = batch.to_pylist()[0]
    shard = int(unit["shard"])
    try:
        got = read_unit(unit, fs, text_column, id_column)
        planned = planned_rows(plan, unit) if plan else None
    except Exception as e:  # noqa: BLE001 - reported as this shard's failure by the driver
        return _unit_error(shard, f"{type(e).__name__}: {e}", len(request.templates))
    rows, texts, ids, reasons = got.rows, got.texts, got.ids, got.reasons
    n = len(rows)
    keys = text_keys([texts[i] if reasons[i] is None else None for i in range(n)], salt)
    src: list[str | None] = [None] * n
    src_row = np.full(n, -1, dtype=np.int64)
    here = np.ones(n, dtype=bool)  # rows this pass handles
    if planned is not None:
        at = planned["row"] - int(unit["row0"])
        if only_planned:
            here[:] = False
            here[at] = True
        here[at[planned["defer"]]] = False
        for i, s, r in zip(at, planned["src"], planned["src_row"]):
            if s is not None:
                src[i], src_row[i] = s, r
    good = [i for i in range(n) if reasons[i] is None and here[i] and src[i] is None]
    k_templates = len(request.templates)
    token_ids: list[list[list[int] | None]] = [[None] * n for _ in range(k_templates)]
    spans = np.zeros((k_templates, n, 2), dtype=np.int32)
    truncated = np.zeros(n, dtype=bool)
    if good:
        tokenizer = _tokenizer(request.model.path)
        for k, template in enumerate(request.templates):
            tok = tokenize(tokenizer, [texts[i] for i in good], request.settings.max_length, template,
                           request.settings.append_eos)
            for j, i in enumerate(good):
                token_ids[k][i], spans[k, i] = tok.ids[j], tok.spans[j]
                truncated[i] |= tok.truncated[j]
        for i in good:
            if any(spans[k, i, 1] <= spans[k, i, 0] for k in range(k_templates)):
                reasons[i] = "no tokens"
                for k in range(k_templates):
                    token_ids[k][i] = None
    columns = {"_shard": pa.array(np.full(n, shard, dtype=np.int32)), "_row": pa.array(rows),
               "id": pa.array(ids, type=pa.string())}
    for k in range(k_templates):
        columns[_ids_column(k)] = pa.array(token_ids[k], type=pa.list_(pa.int32()))
        columns[_span_column(k)] = pa.FixedSizeListArray.from_arrays(pa.array(spans[k].reshape(-1)), 2)
    columns |= {"_truncated": pa.array(truncated), "_reject": pa.array(reasons, type=pa.string()),
                "_error": pa.array([None] * n, type=pa.string()),
                "_key": pa.array(keys, type=pa.binary(16)), "_src": pa.array(src, type=pa.string()),
                "_src_row": pa.array(src_row)}
    table = pa.table(columns)
    # Longest first: the embed stage's row batches then hold similar lengths, so token
    # batches pad little (row order does not matter: every row carries its shard and row).
    lengths = np.array([sum(len(token_ids[k][i] or ()) for k in range(k_templates)) for i in range(n)])
    order = np.argsort(-lengths, kind="stable")
    return table.take(pa.array(order[here[order]]))


def _unit_error(shard: int, message: str, k_templates: int) -> pa.Table:
    columns = {"_shard": pa.array([shard], type=pa.int32()), "_row": pa.array([-1], type=pa.int64()),
               "id": pa.array([None], type=pa.string())}
    for k in range(k_templates):
        columns[_ids_column(k)] = pa.array([None], type=pa.list_(pa.int32()))
        columns[_span_column(k)] = pa.FixedSizeListArray.from_arrays(pa.array([0, 0], type=pa.int32()), 2)
    columns |= {"_truncated": pa.array([False]), "_reject": pa.array([None], type=pa.string()),
                "_error": pa.array([message], type=pa.string()), "_key": pa.array([None], type=pa.binary(16)),
                "_src": pa.array([None], type=pa.string()), "_src_row": pa.array([-1], type=pa.int64())}
    return pa.table(columns)


class EmbedActor:
    """The Ray actor: a thin shell around Encoder. Rows it cannot embed pass through as nulls.

    It embeds exactly ``request.variants`` and types its columns from the same request, so the
    writer's columns and the data in them come from one resolution on the driver. Quantised
    dtypes are coded here from float32 vectors (``ranges``: int8 ranges per variant name,
    calibrated on the driver).
    """

    def __init__(self, request: Request, threads: int | None, ranges: dict | None = None, *,
                 write: dict | None = None, storage: dict | None = None, sources: dict[str, str] | None = None):
        # Every torch call of the actor runs on this one thread. libgomp keeps an OpenMP thread
        # pool per thread that starts parallel work: a model loaded on Ray's main thread and run on
        # Ray Data's UDF thread made two pools, more pooled threads than CPUs, and libgomp then
        # stops spinning at barriers almost at once, leaving cores idle.
        # ``threads``: torch's thread count, set by from_request (Ray sets OMP_NUM_THREADS=1 in workers).
        self._torch = ThreadPoolExecutor(1, thread_name_prefix="strata-torch")
        self.encoder = self._torch.submit(Encoder.from_request, quantize.float_request(request), device="auto",
                                          threads=threads).result()
        self.templates = [t.name for t in request.templates]
        self.dim = request.model.dim
        self.dtype, self.ranges = request.settings.dtype, ranges or {}
        self.type = {v: quantize.arrow_type(self.dtype, self.dim) for v in request.variants}
        self.write = write  # write_parts' keyword arguments, or None: the caller writes
        use_storage_options(storage or {})  # copied rows are read from the output's parts
        self.sources = sources or {}  # part URL -> the CRC-32 its writer recorded
        self._cache: dict[str, pa.Table] = {}  # parts copied from, least recently used first
        # Parts are written on a thread at the OS's idle priority, so it runs mostly in the moments
        # torch leaves a core free: a write that preempts one of torch's two threads stalls the
        # other at the next barrier, so at normal priority the writing cost the model more than
        # its own CPU time (BENCHMARKS.md, "The writer thread at idle priority").
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="strata-write", initializer=idle_priority)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """With ``write``: embed ``batch``, write its parts where the vectors are, return write_parts'
        metadata rows. Ray Data then runs up to two calls at once (``MAX_CALLS_PER_ACTOR``): their
        forward passes queue on the one torch thread and their writes on the one idle-priority
        writer thread, so one block's parts are written while the next block is in the model, and
        only metadata leaves the actor. Without: the embedded batch.
        """
        if self.write is None:
            return self.embed(batch)
        return self._writer.submit(write_parts, self.embed(batch), **self.write).result()

    def embed(self, batch: pa.Table) -> pa.Table:
        """The batch's rows with one column per variant (nulls for rows not embedded), on the torch thread."""
        return self._torch.submit(self._embed, batch).result()

    def _embed(self, batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        ok = np.flatnonzero(pc.is_valid(batch.column(_ids_column(0))).to_numpy(zero_copy_only=False))
        take = pa.array(ok)
        tokens = {}
        for k, name in enumerate(self.templates):
            spans = batch.column(_span_column(k)).take(take).combine_chunks()
            tokens[name] = Tokenized(batch.column(_ids_column(k)).take(take).to_pylist(),
                                     spans.values.to_numpy(zero_copy_only=False).reshape(-1, 2).astype(np.int64),
                                     np.zeros(len(ok), dtype=bool))
        res = self.encoder.encode_tokenized(tokens) if len(ok) else None
        n = batch.num_rows
        lengths = sum(pc.fill_null(pc.list_value_length(batch.column(_ids_column(k))), 0).to_numpy()
                      for k in range(len(self.templates)))
        internal = [c for k in range(len(self.templates)) for c in (_ids_column(k), _span_column(k))]
        internal += ["_src", "_src_row"]
        reused = np.flatnonzero(pc.is_valid(batch.column("_src")).to_numpy(zero_copy_only=False))
        stored, damaged = self._stored(batch, reused) if len(reused) else ({}, {})
        out = batch.drop_columns(internal).append_column("_tokens", pa.array(np.asarray(lengths, dtype=np.int64)))
        padded = np.zeros(n, dtype=np.int64)
        if res is not None and len(ok):
            padded[ok[0]] = res.stats.padded_tokens  # carried on one row; summed by the driver
        out = out.append_column("_padded", pa.array(padded))
        mask = None
        if len(ok) + len(reused) < n:  # rows not embedded (rejected, or a unit's error row) are nulls
            mask = np.ones(n, dtype=bool)
            mask[ok] = False
            mask[reused] = False
            mask = pa.array(mask)
        for v, typ in self.type.items():
            arr = res[v] if res is not None else np.zeros((0, self.dim), dtype=np.float32)
            arr = quantize.quantize(self.dtype, arr, self.ranges.get(v.name))
            if len(ok) < n:
                full = np.zeros((n, typ.list_size), dtype=arr.dtype)
                full[ok] = arr
                if len(reused):
                    full[reused] = stored[v.column]  # the stored values, bit for bit
                arr = full
            values = pa.array(arr.reshape(-1), type=typ.value_type)  # no copy: Arrow takes numpy's buffer
            out = out.append_column(v.column, pa.FixedSizeListArray.from_arrays(values, typ.list_size, mask=mask))
        if damaged:  # the rows' shard fails, naming the part (write_parts)
            errors = out.column("_error").to_pylist()
            for i, e in damaged.items():
                errors[i] = e
            out = out.set_column(out.schema.get_field_index("_error"), "_error", pa.array(errors, pa.string()))
        return out


    def _stored(self, batch: pa.Table, rows: np.ndarray) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """The stored vectors of copied rows, per column, read from the parts they came from; and
        {row: error} for rows whose part no longer matches the checksum its writer recorded (each part
        is read whole once, so checking it costs no extra read)."""
        srcs = batch.column("_src").take(pa.array(rows)).to_pylist()
        src_rows = batch.column("_src_row").take(pa.array(rows)).to_numpy()
        columns = [v.column for v in self.type]
        out = {c: np.zeros((len(rows), self.type[v].list_size), dtype=self.type[v].value_type.to_pandas_dtype())
               for v, c in zip(self.type, columns)}
        errors = {}
        for url in dict.fromkeys(srcs):
            mine = np.flatnonzero(np.array([s == url for s in srcs]))
            table = self._source(url, columns)
            if isinstance(table, str):
                errors |= {int(rows[i]): table for i in mine}
                continue
            t = table.take(pa.array(src_rows[mine]))
            for v, c in zip(self.type, columns):
                col = t.column(c).combine_chunks()
                out[c][mine] = col.values.to_numpy(zero_copy_only=False).reshape(len(mine), -1)
        return out, errors

    def _source(self, url: str, columns: list[str]) -> "pa.Table | str":
        """A part's vector columns, read whole once (and checked against its CRC-32) and kept while the
        cache has room: consecutive blocks copy from the same parts. A damaged part: the error."""
        from ..parts import crc32_hex
        from ..stores import filesystem

        if url in self._cache:
            self._cache[url] = self._cache.pop(url)  # most recently used last
            return self._cache[url]
        fs, path = filesystem(url)
        with fs.open(path, "rb") as f:
            data = f.read()
        want = self.sources.get(url)
        if want and crc32_hex(data) != want:
            return (f"{DAMAGED_SOURCE} {url} does not match its checksum (CRC-32 {want} at commit); its shard is "
                    "embedded again on the next run")
        buf = pa.BufferReader(data)
        table = (pa.ipc.open_file(buf).read_all().select(columns) if path.endswith(".arrow")
                 else pq.read_table(buf, columns=columns))
        self._cache[url] = table
        while sum(t.nbytes for t in self._cache.values()) > SOURCE_CACHE_BYTES and len(self._cache) > 1:
            self._cache.pop(next(iter(self._cache)))
        return table


DAMAGED_SOURCE = "copied part"
SOURCE_CACHE_BYTES = 256 << 20  # parts an actor keeps after copying from them (a part's rows span several blocks)


def idle_priority() -> None:
    """Put the calling thread under the OS's idle scheduling policy where there is one (Linux
    ``SCHED_IDLE``: a weight below nice 19's, so a busy core's normal threads are seldom preempted by
    it; any thread may lower itself to it). Elsewhere, or where the call is refused, the thread keeps
    its priority: only speed differs."""
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread, on Linux
        except OSError:
            pass


def write_parts(batch: pa.Table, *, output_url: str, run_id: str, keys: list[str], columns: list[str],
                fmt: str, storage: dict | None = None) -> pa.Table:
    """Write each shard's rows of this batch as a staged part; return one metadata row per shard.
    ``storage``: the driver's registered storage options (``stores.storage_options()``)."""
    import pyarrow.compute as pc

    use_storage_options(storage or {})
    out = Output(output_url)
    meta = []
    shards = batch.column("_shard").to_numpy()
    rows = batch.column("_row").to_numpy()
    rejected = pc.is_valid(batch.column("_reject")).to_numpy(zero_copy_only=False)
    for shard in np.unique(shards):
        mine = np.flatnonzero(shards == shard)
        errors = [e for e in batch.column("_error").take(pa.array(mine)).to_pylist() if e]
        if errors:
            meta.append({"shard": int(shard), "rows": [], "error": errors[0]})
            continue
        mine = mine[np.argsort(rows[mine], kind="stable")]  # row order; one take per table, not three copies
        t = batch.select(["id", "_row", "_reject", "_padded"]).take(pa.array(mine))
        accepted = batch.select(["id", "_key", "_tokens", "_truncated", *columns]).take(pa.array(mine[~rejected[mine]]))
        rej = t.filter(pc.is_valid(t.column("_reject")))
        stage = out.path(STAGING, run_id, keys[shard])
        out.fs.makedirs(stage, exist_ok=True)
        name = f"part-{int(t.column('_row')[0].as_py()):012d}-{uuid.uuid4().hex[:8]}"
        part = rej_part = crc = rej_crc = None
        if accepted.num_rows:
            part = f"{name}.{fmt}"
            crc = write_part(out.fs, f"{stage}/{part}", accepted.select(["id", "_key", *columns]).rename_columns(
                ["id", "key", *columns]))
        if rej.num_rows:
            rej_part = f"rejects-{name}.parquet"
            rej_crc = write_part(out.fs, f"{stage}/{rej_part}", rej.select(["id", "_row", "_reject"]).rename_columns(
                ["id", "row", "reason"]))
        meta.append({"shard": int(shard), "rows": t.column("_row").to_pylist(), "error": None, "part": part,
                     "rejects_part": rej_part, "part_crc32": crc, "rejects_crc32": rej_crc,
                     "rejected": rej.column("_reject").to_pylist(),
                     "tokens": int(pc.sum(accepted.column("_tokens")).as_py() or 0),
                     "padded": int(pc.sum(t.column("_padded")).as_py() or 0),
                     "truncated": int(pc.sum(pc.cast(accepted.column("_truncated"), pa.int64())).as_py() or 0),
                     "reused": int(accepted.num_rows - pc.sum(pc.cast(pc.greater(accepted.column("_tokens"), 0),
                                                                       pa.int64())).as_py() or 0)})
    return pa.Table.from_pylist(meta, schema=META_SCHEMA)


META_SCHEMA = pa.schema([
    ("shard", pa.int32()), ("rows", pa.list_(pa.int64())), ("error", pa.string()), ("part", pa.string()),
    ("rejects_part", pa.string()), ("rejected", pa.list_(pa.string())), ("tokens", pa.int64()),
    ("padded", pa.int64()), ("truncated", pa.int64()), ("reused", pa.int64()),
    ("part_crc32", pa.string()), ("rejects_crc32", pa.string()),
])



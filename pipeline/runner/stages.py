"""The distributed stages of ``embed``, each a function or class Ray runs on workers:
read + tokenise a work unit, embed blocks of rows (the actor around ``Encoder``), write parts.

Every stage returns one row per input row (or one metadata row per shard), so the driver can
account for every row exactly once (``commit.Committer``).
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..encoder import Encoder, tokenize
from ..request import Request
from ..storage import STAGING, Output, write_part

EMBED_BATCH_ROWS = 256  # rows handed to an embed actor per call; sorted into token batches inside


def _reject_reason(text) -> str | None:
    if text is None:
        return "null text"
    if not text.strip():
        return "empty text"
    return None


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(model_dir: str):
    """One tokenizer per worker process (Ray reuses workers across tasks)."""
    if model_dir not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[model_dir] = AutoTokenizer.from_pretrained(model_dir)
    return _TOKENIZERS[model_dir]


def read_and_tokenize(batch: pa.Table, *, fs, model_dir: str, text_column: str, id_column: str | None,
                      max_length: int) -> pa.Table:
    """Read one work unit and tokenise it. Returns one row per input row, always."""
    unit = batch.to_pylist()[0]
    shard, row0, n = int(unit["shard"]), int(unit["row0"]), int(unit["stop"] - unit["start"])
    rows = np.arange(row0, row0 + n, dtype=np.int64)
    try:
        cols = [text_column] + ([id_column] if id_column and id_column != text_column else [])
        with fs.open(unit["path"], "rb") as f:
            t = pq.ParquetFile(f).read_row_group(int(unit["rg"]), columns=cols).slice(int(unit["start"]), n)
        texts = t.column(text_column).to_pylist()
        if id_column:
            ids = [None if v is None else str(v) for v in t.column(id_column).to_pylist()]
        else:
            ids = [f"{unit['rel']}#{r}" for r in rows]
    except Exception as e:  # noqa: BLE001 - reported as this shard's failure by the driver
        return _unit_error(shard, f"{type(e).__name__}: {e}")
    reasons = [_reject_reason(x) for x in texts]
    for i, v in enumerate(ids):
        if v is None and reasons[i] is None:
            reasons[i] = "null id"
    good = [i for i, r in enumerate(reasons) if r is None]
    token_ids: list[list[int] | None] = [None] * n
    truncated = np.zeros(n, dtype=bool)
    if good:
        ids_good, trunc_good = tokenize(_tokenizer(model_dir), [texts[i] for i in good], max_length)
        for j, i in enumerate(good):
            token_ids[i], truncated[i] = ids_good[j], trunc_good[j]
            if not token_ids[i]:
                token_ids[i], reasons[i] = None, "no tokens"
    table = pa.table({
        "_shard": pa.array(np.full(n, shard, dtype=np.int32)),
        "_row": pa.array(rows),
        "id": pa.array(ids, type=pa.string()),
        "_ids": pa.array(token_ids, type=pa.list_(pa.int32())),
        "_truncated": pa.array(truncated),
        "_reject": pa.array(reasons, type=pa.string()),
        "_error": pa.array([None] * n, type=pa.string()),
    })
    # Longest first: the embed stage's row batches then hold similar lengths, so token
    # batches pad little (row order does not matter: every row carries its shard and row).
    lengths = np.array([len(x) if x else 0 for x in token_ids])
    return table.take(pa.array(np.argsort(-lengths, kind="stable")))


def _unit_error(shard: int, message: str) -> pa.Table:
    return pa.table({
        "_shard": pa.array([shard], type=pa.int32()), "_row": pa.array([-1], type=pa.int64()),
        "id": pa.array([None], type=pa.string()), "_ids": pa.array([None], type=pa.list_(pa.int32())),
        "_truncated": pa.array([False]), "_reject": pa.array([None], type=pa.string()),
        "_error": pa.array([message], type=pa.string()),
    })


class EmbedActor:
    """The Ray actor: a thin shell around Encoder. Rows it cannot embed pass through as nulls.

    It embeds exactly ``request.variants`` and types its columns from the same request, so the
    writer's columns and the data in them come from one resolution on the driver.
    """

    def __init__(self, request: Request, threads: int | None):
        if threads:
            import torch

            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in workers
        self.encoder = Encoder.from_request(request, device="auto")
        self.dim = request.model.dim
        value = pa.float16() if request.settings.dtype == "float16" else pa.float32()
        self.type = {v: pa.list_(value, self.dim) for v in request.variants}

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        token_ids = batch.column("_ids")
        ok = np.flatnonzero(pc.is_valid(token_ids).to_numpy(zero_copy_only=False))
        res = self.encoder.encode_ids(token_ids.take(pa.array(ok)).to_pylist()) if len(ok) else None
        n = batch.num_rows
        lengths = pc.fill_null(pc.list_value_length(token_ids), 0)
        out = batch.drop_columns(["_ids"]).append_column("_tokens", pc.cast(lengths, pa.int64()))
        padded = np.zeros(n, dtype=np.int64)
        if res is not None and len(ok):
            padded[ok[0]] = res.stats.padded_tokens  # carried on one row; summed by the driver
        out = out.append_column("_padded", pa.array(padded))
        for v, typ in self.type.items():
            arr = res[v] if res is not None else np.zeros((0, self.dim), dtype=np.float32)
            full = np.zeros((n, self.dim), dtype=arr.dtype)
            full[ok] = arr
            mask = np.ones(n, dtype=bool)
            mask[ok] = False
            values = pa.array(full.reshape(-1), type=typ.value_type)
            out = out.append_column(v.column, pa.FixedSizeListArray.from_arrays(values, self.dim, mask=pa.array(mask)))
        return out


def write_parts(batch: pa.Table, *, output_url: str, run_id: str, keys: list[str], columns: list[str],
                fmt: str) -> pa.Table:
    """Write each shard's rows of this batch as a staged part; return one metadata row per shard."""
    import pyarrow.compute as pc

    out = Output(output_url)
    meta = []
    for shard in sorted(set(batch.column("_shard").to_pylist())):
        t = batch.filter(pc.equal(batch.column("_shard"), shard))
        errors = [e for e in t.column("_error").to_pylist() if e]
        if errors:
            meta.append({"shard": shard, "rows": [], "error": errors[0]})
            continue
        t = t.sort_by("_row")
        rejected = pc.is_valid(t.column("_reject"))
        accepted = t.filter(pc.invert(rejected))
        rej = t.filter(rejected)
        stage = out.path(STAGING, run_id, keys[shard])
        out.fs.makedirs(stage, exist_ok=True)
        name = f"part-{int(t.column('_row')[0].as_py()):012d}-{uuid.uuid4().hex[:8]}"
        part = rej_part = None
        if accepted.num_rows:
            part = f"{name}.{fmt}"
            write_part(out.fs, f"{stage}/{part}", accepted.select(["id", *columns]))
        if rej.num_rows:
            rej_part = f"rejects-{name}.parquet"
            write_part(out.fs, f"{stage}/{rej_part}", rej.select(["id", "_row", "_reject"]).rename_columns(["id", "row", "reason"]))
        meta.append({"shard": shard, "rows": t.column("_row").to_pylist(), "error": None, "part": part,
                     "rejects_part": rej_part, "rejected": rej.column("_reject").to_pylist(),
                     "tokens": int(pc.sum(accepted.column("_tokens")).as_py() or 0),
                     "padded": int(pc.sum(t.column("_padded")).as_py() or 0),
                     "truncated": int(pc.sum(pc.cast(accepted.column("_truncated"), pa.int64())).as_py() or 0)})
    return pa.Table.from_pylist(meta, schema=META_SCHEMA)


META_SCHEMA = pa.schema([
    ("shard", pa.int32()), ("rows", pa.list_(pa.int64())), ("error", pa.string()), ("part", pa.string()),
    ("rejects_part", pa.string()), ("rejected", pa.list_(pa.string())), ("tokens", pa.int64()),
    ("padded", pa.int64()), ("truncated", pa.int64()),
])



"""``embed``: Parquet shards -> Ray Data -> per-shard embedding parts, committed shard by shard.

Data flow (one Ray Data pipeline)::

    work units (shard, row group, row range)     planned by the driver from Parquet footers
      -> read + tokenise   CPU tasks; every row keeps its shard and row number; bad rows are
                           marked with a reject reason, unreadable units with an error
      -> embed             actor pool around Encoder (one per GPU, or CPU actors that leave a
                           CPU free for the read/write tasks); ONE forward pass per batch
      -> write parts       tasks write parts into _staging/, return small metadata rows
    driver                 counts every (shard, row) exactly once; a shard whose rows are all
                           accounted for is moved into embeddings/ and recorded in the manifest

The manifest is the commit point: a crash loses only uncommitted shards, and re-running the
same command skips what is committed (resume), re-embeds new or changed shards and drops the
outputs of removed ones (incremental).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import models
from .encoder import Encoder, EncoderConfig, tokenize
from .storage import STAGING, Output, read_part, redact, shard_key, utc_now, write_part
from .variants import make_variants

log = logging.getLogger(__name__)

UNIT_ROWS = 2048  # rows per read task
EMBED_BATCH_ROWS = 256  # rows handed to an embed actor per call; sorted into token batches inside


class EmbedError(RuntimeError):
    """The job could not complete; the message says which shards and why."""


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


@dataclass
class EmbedSummary:
    output: str
    shards_total: int = 0
    shards_embedded: int = 0
    shards_skipped: int = 0
    shards_dropped: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    rows_rejected: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    truncated: int = 0
    duplicate_ids: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0
    steady_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def steady_tokens_per_second(self) -> float:
        return self.tokens / self.steady_seconds if self.steady_seconds else 0.0

    @property
    def padding_efficiency(self) -> float:
        return self.tokens / self.padded_tokens if self.padded_tokens else 1.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(tokens_per_second=self.tokens_per_second, steady_tokens_per_second=self.steady_tokens_per_second,
                 padding_efficiency=self.padding_efficiency,
                 rows_per_second=self.rows / self.seconds if self.seconds else 0.0)
        return d

    def line(self) -> str:
        fail = f", {len(self.shards_failed)} FAILED" if self.shards_failed else ""
        return (f"{self.shards_embedded} shards embedded, {self.shards_skipped} skipped, {self.shards_dropped} dropped{fail}; "
                f"{self.rows:,} rows ({self.rows_rejected:,} rejected), {self.tokens:,} tokens in {self.seconds:.1f}s "
                f"= {self.tokens_per_second:,.0f} tok/s (steady {self.steady_tokens_per_second:,.0f}, "
                f"Ray start-up {self.startup_seconds:.1f}s), padding efficiency {self.padding_efficiency:.2f}, "
                f"{self.truncated:,} truncated" + (f", {self.duplicate_ids:,} DUPLICATE ids" if self.duplicate_ids else ""))


# ---------------------------------------------------------------------------- input
def list_shards(url: str) -> tuple[Any, list[Shard]]:
    """Parquet files at a URL: a file, a directory (searched recursively) or a glob."""
    fs, root = fsspec.core.url_to_fs(url)
    if any(c in root for c in "*?["):
        paths = sorted(p for p in fs.glob(root) if p.endswith(".parquet"))
        base = root.split("*")[0].rsplit("/", 1)[0]
    elif fs.isdir(root):
        paths = sorted(p for p in fs.find(root) if p.endswith(".parquet") and "/." not in p[len(root):])
        base = root.rstrip("/")
    elif fs.exists(root):
        paths, base = [root], root.rsplit("/", 1)[0]
    else:
        raise FileNotFoundError(f"input {redact(url)} does not exist")
    if not paths:
        raise FileNotFoundError(f"no Parquet files (*.parquet) found at {redact(url)}")
    shards = []
    for p in paths:
        info = fs.info(p)
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
            with fs.open(s.path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except Exception as e:  # noqa: BLE001 - any unreadable file is this shard's error
            s.error = f"not a readable Parquet file: {type(e).__name__}: {e}"
            continue
        names = schema.names
        if text_column not in names:
            raise ValueError(f"text column {text_column!r} not found in {s.rel}; available columns: {', '.join(names)}")
        t = schema.field(text_column).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
            raise ValueError(f"text column {text_column!r} in {s.rel} has type {t}, expected a string column")
        if id_column and id_column not in names:
            raise ValueError(f"id column {id_column!r} not found in {s.rel}; available columns: {', '.join(names)}")
        s.rows = meta.num_rows
        s.row_groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def work_units(shards: list[Shard], unit_rows: int = UNIT_ROWS) -> list[dict]:
    units = []
    for idx, s in enumerate(shards):
        first = 0
        for rg, n in enumerate(s.row_groups):
            for start in range(0, n, unit_rows):
                stop = min(n, start + unit_rows)
                units.append({"shard": idx, "path": s.path, "rel": s.rel, "rg": rg, "start": start, "stop": stop,
                              "row0": first + start})
            first += n
    return units


# ---------------------------------------------------------------------------- stage functions
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
    """The Ray actor: a thin shell around Encoder. Rows it cannot embed pass through as nulls."""

    def __init__(self, model_dir: str, config: dict, threads: int | None, device: str,
                 trust_remote_code: bool = False, allow_pickle: bool = False):
        import torch

        if threads:
            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in workers
        self.encoder = Encoder.load(model_dir, device=device, trust_remote_code=trust_remote_code,
                                    allow_pickle=allow_pickle, **config)
        self.type = {v.column: pa.list_(pa.float16() if config["dtype"] == "float16" else pa.float32(), self.encoder.dim)
                     for v in self.encoder.variants}

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
        for v in self.encoder.variants:
            arr = res.embeddings[v.name] if res is not None else np.zeros((0, self.encoder.dim), dtype=np.float32)
            full = np.zeros((n, self.encoder.dim), dtype=arr.dtype)
            full[ok] = arr
            mask = np.ones(n, dtype=bool)
            mask[ok] = False
            values = pa.array(full.reshape(-1), type=self.type[v.column].value_type)
            out = out.append_column(v.column, pa.FixedSizeListArray.from_arrays(values, self.encoder.dim,
                                                                               mask=pa.array(mask)))
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


# ---------------------------------------------------------------------------- driver
@dataclass
class _Pending:
    """Per-shard bookkeeping on the driver: every row must be seen exactly once."""

    shard: Shard
    seen: np.ndarray
    parts: list[str] = field(default_factory=list)
    rejects_parts: list[str] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    tokens: int = 0
    padded: int = 0
    truncated: int = 0
    error: str | None = None

    def add(self, m: dict) -> None:
        if m["error"]:
            self.error = self.error or m["error"]
            return
        rows = np.asarray(m["rows"], dtype=np.int64)
        if self.seen[rows].any():
            raise EmbedError(f"shard {self.shard.rel}: rows delivered twice ({rows[self.seen[rows]][:5].tolist()}...)")
        self.seen[rows] = True
        self.parts += [m["part"]] if m["part"] else []
        self.rejects_parts += [m["rejects_part"]] if m["rejects_part"] else []
        self.reasons.update(m["rejected"] or [])
        self.tokens += m["tokens"]
        self.padded += m["padded"]
        self.truncated += m["truncated"]

    @property
    def complete(self) -> bool:
        return bool(self.seen.all())


class Committer:
    """The driver's side of exactly-once: feeds metadata rows, commits each complete shard.

    A shard commits when every one of its rows has been seen exactly once (a row seen twice
    is an error, never a duplicate output); a shard whose read failed is recorded as failed
    and never committed. Kept free of Ray so its logic can be tested on its own.
    """

    def __init__(self, out: Output, manifest: dict, todo: list[Shard], summary: EmbedSummary, run_id: str):
        self.out, self.manifest, self.summary, self.run_id = out, manifest, summary, run_id
        self.pending = {i: _Pending(s, np.zeros(s.rows, dtype=bool)) for i, s in enumerate(todo)}
        self.rows_seen = 0

    def feed(self, m: dict) -> None:
        p = self.pending.get(m["shard"])
        if p is None:
            return  # that shard already failed
        p.add(m)
        self.rows_seen += len(m["rows"] or [])
        self.summary.tokens += m["tokens"] or 0
        self.summary.padded_tokens += m["padded"] or 0
        if p.error:
            msg = f"read failed: {p.error}"
            self.summary.shards_failed[p.shard.rel] = msg
            self.manifest.setdefault("failed", {})[p.shard.rel] = msg
            del self.pending[m["shard"]]
        elif p.complete:
            _commit(self.out, self.manifest, p.shard, p, self.run_id)
            self.summary.shards_embedded += 1
            self.summary.rows += p.shard.rows
            self.summary.rows_rejected += sum(p.reasons.values())
            self.summary.truncated += p.truncated
            del self.pending[m["shard"]]

    def finish(self) -> None:
        """After the stream ends: any shard still pending lost rows somewhere; say so."""
        for p in self.pending.values():
            missing = int((~p.seen).sum())
            self.summary.shards_failed[p.shard.rel] = f"{missing} row(s) never came back from the pipeline"


def job_signature(encoder_desc: dict, config: dict) -> dict:
    """What must match for committed shards to be reused."""
    return {"model": encoder_desc["model"], "weights_digest": encoder_desc["weights_digest"],
            "variants": [v["name"] for v in encoder_desc["variants"]], **config}


def plan(manifest: dict | None, shards: list[Shard]) -> tuple[list[Shard], list[dict], list[dict]]:
    """(to embed, committed entries to keep, committed entries to drop)."""
    done = {s["rel"]: s for s in (manifest or {}).get("shards", [])}
    current = {s.rel for s in shards}
    todo, keep = [], []
    for s in shards:
        entry = done.get(s.rel)
        if entry and entry["fingerprint"] == s.fingerprint:
            keep.append(entry)
        else:
            todo.append(s)
    drop = [e for rel, e in done.items() if rel not in current]
    return todo, keep, drop


def _ray_init(ray_address: str | None):
    import ray

    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True, configure_logging=True, ignore_reinit_error=True)
    return ray


def _resources(ray, actors: int | None, gpus_per_actor: float | None) -> tuple[int, float, float, int]:
    """(actors, cpus per actor, gpus per actor, torch threads): never take every CPU."""
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 1.0), res.get("GPU", 0.0)
    if gpus >= 1 and gpus_per_actor != 0:
        g = gpus_per_actor or 1.0
        n = actors or max(1, int(gpus // g))
        return n, 1.0, g, 0
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = min((n["Resources"].get("CPU", 1.0) for n in nodes), default=cpus)
    cpu_each = max(1.0, min(4.0, per_node - 1)) if per_node > 1 else 0.5
    n = actors or max(1, int((cpus - 1) // cpu_each)) if cpus > 1 else 1
    threads = max(1, int(per_node) // max(1, min(n, int(per_node // cpu_each) or 1)))
    return n, cpu_each, 0.0, threads


def embed(input: str, output: str, *, model: str | None = None, layers="-1", poolings="mean",
          text_column: str = "text", id_column: str | None = None, max_length: int = 512,
          dtype: str = "float32", normalize: bool = False, batch_tokens: int | None = None,
          actors: int | None = None, gpus_per_actor: float | None = None, ray_address: str | None = None,
          force: bool = False, output_format: str = "parquet", progress: bool = True,
          trust_remote_code: bool = False, allow_pickle: bool = False,
          stall_timeout_s: float = 600.0, unit_rows: int = UNIT_ROWS) -> EmbedSummary:
    """Embed every row of the Parquet shards at ``input`` into ``output`` (see module doc)."""
    t_start = time.perf_counter()
    if output_format not in ("parquet", "arrow"):
        raise ValueError(f"output format {output_format!r}: choose 'parquet' or 'arrow'")
    config = EncoderConfig(layers=layers, poolings=poolings, normalize=normalize, dtype=dtype,
                           max_length=max_length, batch_tokens=batch_tokens)
    fs, shards = list_shards(input)
    inspect_shards(fs, shards, text_column, id_column)  # column errors before any model loads
    out = Output(output)
    out.check_writable()
    with out.lock():  # one run per output
        # Model: resolve and materialise once on the driver (converts GGUF into the cache once).
        src = models.resolve(model)
        if src.gguf_file is None and not os.path.isdir(src.path):
            raise ValueError(f"model {src.name!r} must be a local directory or a .gguf file for distributed runs")
        model_dir = str(models.materialize(src))
        models.check_weight_format(src, model_dir, allow_pickle)  # here, not deep inside an actor
        from transformers import AutoConfig

        mcfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        variants = make_variants(layers, poolings, mcfg.num_hidden_layers)
        desc = {"model": src.name, "weights_digest": models.weights_digest(src),
                "variants": [{"name": v.name, "column": v.column, "layer": v.layer, "pooling": v.pooling,
                              "dim": mcfg.hidden_size, "dtype": dtype, "normalized": normalize} for v in variants]}
        signature = job_signature(desc, {"max_length": max_length, "dtype": dtype, "normalize": normalize,
                                         "text_column": text_column, "id_column": id_column, "format": output_format})
        manifest = out.read_manifest()
        if manifest and manifest.get("signature") != signature:
            if not force:
                old = manifest.get("signature", {})
                diff = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
                raise ValueError(f"{redact(output)} holds embeddings made with a different {', '.join(diff)}; "
                                 "use a new output location, or --force to replace them")
            log.warning("replacing %s: settings changed and --force given", redact(output))
            for s in manifest.get("shards", []):
                out.remove(s["output"])
            manifest = None
        manifest = manifest or {"signature": signature, "model": {"name": src.name, "weights_digest": desc["weights_digest"]},
                                "variants": desc["variants"], "input": redact(input), "shards": []}
        out.sweep(manifest)

        todo, keep, drop = plan(manifest, shards)
        failed = {s.rel: s.error for s in todo if s.error}
        todo = [s for s in todo if s.error is None]
        for e in drop:
            out.remove(e["output"])
        # A changed (or now unreadable) shard keeps its old output until a new one is committed.
        dropped = {e["rel"] for e in drop}
        manifest["shards"] = [e for e in manifest["shards"] if e["rel"] not in dropped]
        manifest["failed"] = failed
        out.write_manifest(manifest)
        summary = EmbedSummary(output=redact(output), shards_total=len(shards), shards_skipped=len(keep),
                               shards_dropped=len(drop), shards_failed=dict(failed))
        empty = [s for s in todo if s.rows == 0]
        todo = [s for s in todo if s.rows > 0]
        for s in empty:  # an empty shard is done at once: nothing to embed, nothing lost
            _commit(out, manifest, s, _Pending(s, np.zeros(0, dtype=bool)), None)
            summary.shards_embedded += 1
        if todo:
            _run_ray(out, manifest, todo, summary, model_dir=model_dir, config=asdict(config),
                     model_options=dict(trust_remote_code=trust_remote_code, allow_pickle=allow_pickle),
                     text_column=text_column, id_column=id_column, actors=actors, gpus_per_actor=gpus_per_actor,
                     ray_address=ray_address, fmt=output_format, progress=progress, stall_timeout_s=stall_timeout_s,
                     fs=fs, unit_rows=unit_rows, t_start=t_start)
        if id_column:
            summary.duplicate_ids, examples = _duplicate_ids(out, manifest)
            manifest["duplicate_ids"] = {"count": summary.duplicate_ids, "examples": examples}
            if summary.duplicate_ids:
                log.warning("%d duplicate id(s) in column %r (e.g. %s): every row is kept and embedded",
                            summary.duplicate_ids, id_column, ", ".join(examples))
        summary.seconds = time.perf_counter() - t_start
        manifest["last_run"] = summary.as_dict()
        out.write_manifest(manifest)
        if summary.shards_failed:
            lines = "; ".join(f"{rel}: {msg}" for rel, msg in sorted(summary.shards_failed.items()))
            raise EmbedError(f"{len(summary.shards_failed)} shard(s) failed, the others are committed "
                             f"(re-run to retry): {lines}")
        return summary


def _duplicate_ids(out: Output, manifest: dict) -> tuple[int, list[str]]:
    """Rows whose id appears more than once across all committed shards (ids column only)."""
    import pyarrow.compute as pc

    files = out.embedding_files(manifest)
    if not files:
        return 0, []
    ids = pa.chunked_array([read_part(out.fs, f, ["id"]).column("id") for f in files])
    counts = pc.value_counts(ids).flatten()
    dup = pc.filter(counts[0], pc.greater(counts[1], 1))
    extra = int(pc.sum(pc.subtract(pc.filter(counts[1], pc.greater(counts[1], 1)), 1)).as_py() or 0)
    return extra, [str(x) for x in dup[:5].to_pylist()]


def _commit(out: Output, manifest: dict, shard: Shard, p: _Pending, run_id: str | None) -> None:
    staged = out.path(STAGING, run_id or "none", shard.key)
    if run_id and out.fs.exists(staged):
        listed = set(p.parts) | set(p.rejects_parts)
        for f in out.fs.ls(staged, detail=False):  # parts of retried tasks are orphans: never committed
            if f.rsplit("/", 1)[-1] not in listed:
                out.fs.rm(f)
    else:
        out.fs.makedirs(staged, exist_ok=True)
        with out.fs.open(f"{staged}/.empty", "wb"):
            pass
    rel = out.commit_dir(staged, shard.key)
    old = [e for e in manifest["shards"] if e["rel"] == shard.rel]
    manifest["shards"] = [e for e in manifest["shards"] if e["rel"] != shard.rel] + [{
        "path": redact(shard.path), "rel": shard.rel, "fingerprint": shard.fingerprint, "output": rel,
        "files": sorted(p.parts), "rejects_files": sorted(p.rejects_parts), "rows": shard.rows,
        "rows_written": shard.rows - sum(p.reasons.values()), "rows_rejected": sum(p.reasons.values()),
        "rejected_reasons": dict(p.reasons), "tokens": p.tokens, "truncated": p.truncated,
        "committed_at": utc_now(),
    }]
    manifest.get("failed", {}).pop(shard.rel, None)
    out.write_manifest(manifest)
    for e in old:  # the replaced output of a changed shard goes only after the new one is committed
        out.remove(e["output"])


def _run_ray(out: Output, manifest: dict, todo: list[Shard], summary: EmbedSummary, *, model_dir: str,
             config: dict, model_options: dict, text_column: str, id_column: str | None, actors: int | None,
             gpus_per_actor: float | None, ray_address: str | None, fmt: str, progress: bool,
             stall_timeout_s: float, fs, unit_rows: int, t_start: float) -> None:
    t0 = time.perf_counter()
    ray = _ray_init(ray_address)
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.execution_no_progress_timeout_s = stall_timeout_s
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Ray's high-memory notice repeats every 30 s for any model-sized actor: noise, not news.
    ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    n_actors, cpus, gpus, threads = _resources(ray, actors, gpus_per_actor)
    summary.startup_seconds = time.perf_counter() - t0
    log.info("embedding %d shards with %d actor(s) (%.1f CPU, %.1f GPU each)", len(todo), n_actors, cpus, gpus)

    run_id = uuid.uuid4().hex[:12]
    units = work_units(todo, unit_rows)
    variants = [v["column"] for v in manifest["variants"]]
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    # Fractional CPUs: different resources keep Ray from fusing these tasks into the actor, so
    # reading and tokenising overlap the forward passes instead of running in series with them.
    ds = ds.map_batches(read_and_tokenize, batch_size=1, batch_format="pyarrow", num_cpus=0.5,
                        fn_kwargs=dict(fs=fs, model_dir=model_dir, text_column=text_column, id_column=id_column,
                                       max_length=config["max_length"]))
    # Blocks of EMBED_BATCH_ROWS rows: each actor task is then one call, and its output streams
    # to the writers as it is made (a whole read unit in one task would reach them only at its end).
    ds = ds.repartition(target_num_rows_per_block=EMBED_BATCH_ROWS)
    ds = ds.map_batches(EmbedActor, batch_size=EMBED_BATCH_ROWS, batch_format="pyarrow",
                        compute=ActorPoolStrategy(size=n_actors), num_cpus=cpus, num_gpus=gpus or None,
                        fn_constructor_kwargs=dict(model_dir=model_dir, config=config,
                                                   threads=threads, device="auto", **model_options))
    ds = ds.map_batches(write_parts, batch_size=None, batch_format="pyarrow", num_cpus=0.5,
                        fn_kwargs=dict(output_url=out.url, run_id=run_id, keys=[s.key for s in todo],
                                       columns=variants, fmt=fmt))
    committer = Committer(out, manifest, todo, summary, run_id)
    total_rows = sum(s.rows for s in todo)
    last_print, first_batch, first_tokens = 0.0, None, 0
    try:
        # prefetch_batches=0: with Ray's default of 1 the iterator holds each metadata block
        # back until the next one exists, so every commit would wait for one more actor call.
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            for m in batch.to_pylist():
                committer.feed(m)
            now = time.perf_counter()
            if first_batch is None:  # steady state starts once the first batch is through
                first_batch, first_tokens = now, summary.tokens
            if progress and now - last_print > 2.0:
                last_print = now
                rate = summary.tokens / (now - t_start)
                print(f"\r[strata] {summary.shards_embedded}/{len(todo)} shards committed, "
                      f"{committer.rows_seen:,}/{total_rows:,} rows, {rate:,.0f} tok/s",
                      end="", file=sys.stderr, flush=True)
    except Exception as e:
        if "ExecutionTimeoutError" in type(e).__name__ or "no progress" in str(e).lower():
            raise EmbedError(f"the pipeline made no progress for {stall_timeout_s:.0f}s and was stopped "
                             "(too few free CPUs for the read/write tasks, or a hung actor?); "
                             f"{summary.shards_embedded} shard(s) were committed, re-run to resume") from None
        raise
    finally:
        if progress and last_print:
            print(file=sys.stderr)
    committer.finish()
    end = time.perf_counter()
    # Steady state: the rate after the first output. Only meaningful when outputs streamed
    # over most of the run; when they arrive in a burst at the end it is left at 0 (unknown).
    if first_batch is not None and summary.tokens > first_tokens and end - first_batch >= 0.5 * (end - t0):
        summary.steady_seconds = (end - first_batch) * summary.tokens / (summary.tokens - first_tokens)
    out.remove(STAGING)


def read_embeddings(output: str, columns: list[str] | None = None) -> pa.Table:
    """Every committed row of an output directory, in shard and row order."""
    return Output(output).read_table(columns)


__all__ = ["embed", "EmbedSummary", "EmbedError", "read_embeddings", "read_part"]

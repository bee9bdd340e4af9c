"""The Ray build's driver: plan each variant against its build record, train, encode, merge.

1. **train**: each part's share of a seeded uniform sample of the variant's vectors is read by its
   own Ray task (in parallel); one task trains the coarse quantiser and the PQ codebooks on it
   (``params.ivfpq_options``; fewer than 39 x nlist vectors is refused here). The trained, empty
   index is written to ``indexes/{variant}.parts/trained.faiss``.
2. **encode** (one Ray task per committed embedding part, ``tasks.encode_shard``): stream the part
   in ``chunk_rows`` chunks reading only the variant's column(s), normalise, ``add_with_ids`` into a
   copy of the trained index, write ``indexes/{variant}.parts/{shard}.….faiss`` + ``.ids.parquet``.
   Memory per task: one chunk plus the shard's PQ codes (``m`` bytes + an 8-byte id per vector).
3. **merge** (``merge.py``): the parts' lists concatenated on disk.

**Ids.** Each shard owns a range of FAISS labels ``[offset, offset + rows)``, allocated once and
recorded (a build killed before the shard was done reuses it); the ``.ids.parquet`` sidecar is
indexed by label (null where a range was given up because its shard changed or went away).

**Resumable** (``record.py``). Re-running skips recorded shards whose fingerprint still matches,
reuses the trained quantiser while the key is unchanged (options, columns, dim, and the digest of
the fitted pieces: a refitted transform or new mix weights retrain and re-encode everything),
re-encodes only new or changed shards and forgets removed ones, until more than ``update.DRIFT`` of
the rows were added or removed since the quantiser was trained (``BuildRecord.drift``): then it trains
again and encodes every shard.

**Bad input.** NaN or Inf vectors in a shard are refused, naming the shard and the first id; a dim
that differs between shards names both; quantised (int8/binary) outputs are refused (this engine
builds float IVF-PQ only; ``--engine local`` indexes them).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ...raystart import connect
from ...storage import Output, utc_now
from ...variants import Variant
from ..fitted import source_digest
from ..fresh import committed_files, record_built, wanted_variants
from ..layout import IndexBuildError
from ..params import DEFAULTS, MIN_POINTS_PER_CENTROID, ivfpq_options
from ..reading import file_dim, file_rows, source_columns
from ..update import DRIFT
from .merge import merge
from .record import (TRAINED, BuildKey, BuildRecord, Shard, parts_dir, read_build_record,
                     write_build_record)
from .tasks import encode_shard, sample_positions, sample_shard, train_sample

log = logging.getLogger(__name__)

RAY_MIN_ROWS = 1_000_000  # --engine auto: Ray above this many rows (the size above which `auto` picks ivfpq)
ENGINES = ("auto", "local", "ray")


def choose_engine(engine: str, rows: int, ray_address: str | None = None) -> str:
    if engine not in ENGINES:
        raise IndexBuildError(f"engine {engine!r}: choose from {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    return "ray" if ray_address or rows > RAY_MIN_ROWS else "local"


def shards_of(out_dir: Path, manifest: dict) -> list[Shard]:
    files = committed_files(manifest)
    if not files:
        raise IndexBuildError(f"{out_dir} has no committed embeddings to index")
    Output(str(out_dir)).check_parts(manifest)  # a damaged part is named (DamagedOutput), never read
    return [Shard(rel, (out_dir / rel).stat().st_size, file_rows(out_dir / rel)) for rel in files]


def output_rows(out_dir: str | Path, manifest: dict) -> int:
    """Committed rows of an output, from the part files' footers (for the engine choice)."""
    return sum(s.rows for s in shards_of(Path(out_dir), manifest))


def _check_dims(out_dir: Path, shards: Sequence[Shard], source) -> int:
    """The stored column's dim, the same in every shard (else an error naming two that differ)."""
    column = source_columns(source)[0]
    seen: dict[int, str] = {}
    for s in shards:
        dim = file_dim(out_dir / s.rel, source)
        if dim >= 0:
            seen.setdefault(dim, s.rel)
        if len(seen) > 1:
            (d1, f1), (d2, f2) = list(seen.items())[:2]
            raise IndexBuildError(f"column {column} has dim {d1} in {f1} but {d2} in {f2}")
    if not seen:
        raise IndexBuildError("no rows to index")
    return next(iter(seen))


def _unwrap(ray, e: Exception) -> Exception:
    cause = getattr(e, "cause", None)
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, (IndexBuildError, FileNotFoundError)):
        return cause
    return e


@dataclass
class _Plan:
    variant: Variant
    source: object
    dim: int
    source_dim: int
    rows: int
    record: BuildRecord
    parts: Path


def _plan(out_dir: Path, manifest: dict, v: Variant, shards: Sequence[Shard], given: dict) -> _Plan:
    """A variant's source and record: the recorded one while its key and quantiser hold, else a new one."""
    from ...derive import reader

    source = reader(out_dir, manifest, v)  # loaded once: what is encoded through is what is digested
    source_dim = _check_dims(out_dir, shards, source)
    dim = source_dim if isinstance(source, str) else source.dim(source_dim)
    rows = sum(s.rows for s in shards)
    key = BuildKey(**given, columns=tuple(source_columns(source)), dim=dim, fitted=source_digest(source))
    rec = read_build_record(out_dir, v)
    parts = parts_dir(out_dir, v)
    drift = rec.drift(shards) if rec is not None else None
    if drift is not None and drift[0] > DRIFT * max(drift[1], 1):
        log.info("%s: %d rows changed since the quantiser was trained on %d (more than %.0f%%): training again",
                 v.name, drift[0], drift[1], 100 * DRIFT)
        rec = None
    if rec is None or rec.key != key or not (parts / TRAINED).is_file():
        options = ivfpq_options(rows, dim, per_list=MIN_POINTS_PER_CENTROID,
                                **{k: given[k] for k in ("nlist", "m", "nbits", "nprobe", "train_rows")})
        rec = BuildRecord(key, options)
    return _Plan(v, source, dim, source_dim, rows, rec, parts)


def build_ivfpq_ray(out_dir: str | Path, variants: Sequence[Variant | str] | None = None, *,
                    manifest: dict | None = None, nlist: int | None = None, m: int | None = None, nbits: int = 8,
                    nprobe: int | None = None, rerank: int = DEFAULTS["rerank"], train_rows: int | None = None,
                    seed: int = 0,
                    chunk_rows: int = 65536, ray_address: str | None = None, task_cpus: float = 1.0,
                    threads: int = 1, on_shard: Callable[[Variant, str, dict], None] | None = None,
                    on_built=None, probe=None) -> dict[Variant, dict]:
    """Build (or resume) one on-disk IVF-PQ index per variant on Ray (module doc); all variants' tasks
    run side by side. Returns each variant's parameters (the index JSON) with an ``encoded`` and a
    ``reused`` list of shard keys. ``on_shard(variant, key, result)`` is called after each shard is
    recorded (tests use it to stop a build midway); ``on_built(variant, params, seconds)`` after each
    merge; ``probe`` is passed to every task (``tasks.py``; benchmarks)."""
    out_dir = Path(out_dir)
    manifest = manifest if manifest is not None else Output(str(out_dir)).read_manifest()
    if not manifest:
        raise IndexBuildError(f"{out_dir} has no manifest.json: run `strata embed` first")
    dtype = manifest.get("signature", {}).get("dtype") or "float32"
    if dtype in ("int8", "binary"):
        raise IndexBuildError(f"{out_dir} stores {dtype} codes: --engine ray builds float IVF-PQ indexes only; "
                              f"use --engine local")
    wanted = wanted_variants(manifest, variants, str(out_dir))
    shards = shards_of(out_dir, manifest)
    given = {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe, "train_rows": train_rows, "seed": seed}
    plans = [_plan(out_dir, manifest, v, shards, given) for v in wanted]

    ray = connect(ray_address)
    remote = dict(num_cpus=task_cpus, max_retries=3, retry_exceptions=False)
    sample_task = ray.remote(**remote)(sample_shard)
    train_task = ray.remote(**remote)(train_sample)
    encode_task = ray.remote(**remote)(encode_shard)
    out_str = str(out_dir)

    # 1. train where needed (all variants at once)
    pending = {}
    for p in plans:
        p.parts.mkdir(parents=True, exist_ok=True)
        if (p.parts / TRAINED).is_file() and p.record.trained_at:
            continue
        positions = sample_positions([sh.rows for sh in shards], p.record.options["train_rows"], seed)
        samples = [sample_task.remote(out_str, sh.rel, pos, p.source, p.dim, p.source_dim, chunk_rows, probe)
                   for sh, pos in zip(shards, positions) if len(pos)]  # read in parallel, one task per part
        pending[train_task.remote(p.dim, p.record.options, seed, threads, *samples, probe=probe)] = p
    for ref, p in pending.items():
        try:
            blob = ray.get(ref)
        except Exception as e:
            raise _unwrap(ray, e) from None
        tmp = p.parts / f"{TRAINED}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(np.asarray(blob).tobytes())
        os.replace(tmp, p.parts / TRAINED)
        p.record.trained(utc_now(), shards)  # a new quantiser: no list valid
        write_build_record(out_dir, p.variant, p.record)

    # 2. encode the shards not recorded with their current fingerprint
    jobs, report = {}, {p.variant: {"encoded": [], "reused": []} for p in plans}
    for p in plans:
        trained = ray.put(np.frombuffer((p.parts / TRAINED).read_bytes(), dtype=np.uint8))
        for s in shards:
            got = p.record.reusable(s)
            if got is not None and all((p.parts / f).is_file() for f in (got.part, got.vectors_file)):
                report[p.variant]["reused"].append(s.key)
                continue
            offset = p.record.allocate(s)
            # one file per attempt: a task left running by a killed build never overwrites a recorded part
            part = f"{s.key}.{uuid.uuid4().hex[:8]}.faiss"
            ref = encode_task.remote(out_str, s.rel, p.source, p.dim, p.source_dim, trained, offset,
                                     str(p.parts / part), chunk_rows, threads, probe)
            jobs[ref] = (p, s, offset, part)
    for p in plans:
        write_build_record(out_dir, p.variant, p.record)
    waiting = list(jobs)
    try:
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            p, s, offset, part = jobs[done[0]]
            try:
                result = ray.get(done[0])
            except Exception as e:
                raise _unwrap(ray, e) from None
            if result["rows"] != s.rows:
                raise IndexBuildError(f"shard {s.rel}: read {result['rows']} rows, the file declares {s.rows}; "
                                      f"was it modified during the build?")
            p.record.done(s, offset, part, utc_now(), result["seconds"])
            write_build_record(out_dir, p.variant, p.record)
            report[p.variant]["encoded"].append(s.key)
            if on_shard:
                on_shard(p.variant, s.key, result)
    except BaseException:
        for ref in waiting:
            ray.cancel(ref)
        raise

    # 3. merge each variant's lists on disk
    built = {}
    for p in plans:
        t0 = time.perf_counter()
        params = merge(out_dir, p.variant, p.source, p.dim, p.rows, p.record, p.parts, shards, rerank)
        params.update(report[p.variant])
        built[p.variant] = params
        record_built(out_dir, p.variant, {"files": committed_files(manifest), "kind": "ivfpq", "built_kind": "ivfpq",
                                          "engine": "ray", "rows": params["rows"], "fitted": p.record.key.fitted})
        if on_built:
            on_built(p.variant, params, time.perf_counter() - t0)
    return built

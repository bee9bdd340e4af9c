"""IVF-PQ indexes built on Ray: trained once, encoded shard by shard in parallel tasks, merged on disk.

For outputs too big for one process (``strata index --engine ray``; ``auto`` picks it above
``RAY_MIN_ROWS`` rows or when ``--ray-address`` is given). Per variant:

1. **train**: each part's share of a seeded uniform sample of the variant's vectors is read by its
   own Ray task (in parallel); one task trains the coarse quantiser (``nlist`` lists) and the PQ
   codebooks on it. Sample size as in ``index.py``:
   ``64 * max(nlist, 2**nbits)`` rows (at most 500k), inside the FAISS wiki's 30..256 x nlist
   range, and ~64 points per PQ centroid; fewer than 39 x nlist vectors in all is refused
   (FAISS's own warning threshold). The trained, empty index is written to
   ``indexes/{variant}.parts/trained.faiss``.
2. **encode** (one Ray task per committed embedding part): stream the part in ``chunk_rows``
   chunks reading only the variant's column(s), normalise, ``add_with_ids`` into a copy of the
   trained index, write ``indexes/{variant}.parts/{shard}.faiss`` + ``.ids.parquet`` (written
   aside, then renamed). Memory per task: one chunk plus the shard's PQ codes (``m`` bytes + an
   8-byte id per vector).
3. **merge** (driver): ``faiss.contrib.ondisk.merge_ondisk`` concatenates the shards' inverted
   lists into ``indexes/{variant}.{build}.ivfdata``; ``indexes/{variant}.faiss`` holds the
   quantiser and refers to that file, which ``index.load_index`` memory-maps
   (``IO_FLAG_ONDISK_SAME_DIR``: the two files travel together).

**Ids.** Each shard owns a range of FAISS labels ``[offset, offset + rows)``, allocated once and
recorded (a build killed before the shard was done reuses it); the ``.ids.parquet`` sidecar is
indexed by label (null where a range was given up because its shard changed or went away), so ``LoadedIndex.search`` maps labels to document ids as for every
other kind.

**Resumable.** ``indexes/{variant}.build.json`` records the training options and, per shard, its
fingerprint (the part's path relative to the output, its size and rows), label offset and part
file. A shard counts as done only once its part index is renamed into place *and* recorded.
Re-running skips recorded shards whose fingerprint still matches, reuses the trained quantiser
(when the options are unchanged), re-encodes only new or changed shards (a changed shard gets a
new label range; its old lists are dropped) and forgets removed ones.

**Bad input.** NaN or Inf vectors in a shard are refused, naming the shard and the first id;
a dim that differs between shards names both; quantised (int8/binary) outputs are refused (this
engine builds float IVF-PQ only; ``--engine local`` indexes them).

No exact re-ranking (``IndexRefineFlat`` would need every float vector in memory): recall is the
bare IVF-PQ's; raise ``nprobe`` at search time to trade speed for recall. The output must be a
directory every Ray node can read and write (a shared file system).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import resource
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import index as ix
from .index import INDEXES, IndexBuildError
from .storage import Output, safe_name, utc_now
from .variants import Variant

RAY_MIN_ROWS = 1_000_000  # --engine auto: Ray above this many rows (the size above which `auto` picks ivfpq)
ENGINES = ("auto", "local", "ray")
TRAINED = "trained.faiss"
TRAIN_MAX_ROWS = 500_000


def choose_engine(engine: str, rows: int, ray_address: str | None = None) -> str:
    if engine not in ENGINES:
        raise IndexBuildError(f"engine {engine!r}: choose from {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    return "ray" if ray_address or rows > RAY_MIN_ROWS else "local"


# --------------------------------------------------------------------------- shards and records


@dataclass(frozen=True)
class Shard:
    rel: str  # the committed part, relative to the output root
    size: int
    rows: int

    @property
    def key(self) -> str:
        return f"{safe_name(Path(self.rel).stem, 40)}-{hashlib.sha256(self.rel.encode()).hexdigest()[:10]}"

    @property
    def fingerprint(self) -> dict:
        return {"rel": self.rel, "size": self.size, "rows": self.rows}


def shards_of(out_dir: Path, manifest: dict) -> list[Shard]:
    files = ix.committed_files(manifest)
    if not files:
        raise IndexBuildError(f"{out_dir} has no committed embeddings to index")
    Output(str(out_dir)).check_parts(manifest)  # a damaged part is named (DamagedOutput), never read
    shards = []
    for rel in files:  # each one there and whole (check_parts)
        p = out_dir / rel
        shards.append(Shard(rel, p.stat().st_size, ix._rows(p)))
    return shards


def parts_dir(out_dir: Path, v: Variant) -> Path:
    return out_dir / INDEXES / f"{safe_name(v.name)}.parts"


def build_record_path(out_dir: Path, v: Variant) -> Path:
    return out_dir / INDEXES / f"{safe_name(v.name)}.build.json"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_build_record(out_dir: Path, v: Variant) -> dict:
    p = build_record_path(out_dir, v)
    return json.loads(p.read_text()) if p.is_file() else {}


def _check_dims(out_dir: Path, shards: Sequence[Shard], source) -> int:
    """The stored column's dim, the same in every shard (else an error naming two that differ)."""
    columns = ix._columns(source)
    seen: dict[int, str] = {}
    for s in shards:
        path = out_dir / s.rel
        schema = ix._schema(path)
        for c in columns[1:]:
            ix._vector_dim(path, schema, c)
        dim = ix._vector_dim(path, schema, columns[0])
        if dim < 0:
            first = next(ix._batches(path, columns[0], 1024), None)
            dim = ix._to_matrix(path, first, columns[0], -1).shape[1] if first is not None and first.num_rows else -1
        if dim >= 0:
            seen.setdefault(dim, s.rel)
        if len(seen) > 1:
            (d1, f1), (d2, f2) = list(seen.items())[:2]
            raise IndexBuildError(f"column {columns[0]} has dim {d1} in {f1} but {d2} in {f2}")
    if not seen:
        raise IndexBuildError("no rows to index")
    return next(iter(seen))


def ivfpq_options(rows: int, dim: int, *, nlist: int | None = None, m: int | None = None, nbits: int = 8,
                  nprobe: int | None = None, train_rows: int | None = None) -> dict:
    """Concrete IVF-PQ parameters for ``rows`` vectors of ``dim`` (module doc), or an error naming the minimum."""
    minimum_per_list = ix._MIN_POINTS_PER_CENTROID
    nlist = nlist or max(1, min(int(4 * math.sqrt(rows)), rows // minimum_per_list))
    if rows < minimum_per_list * nlist:
        raise IndexBuildError(f"{rows:,} vectors are too few to train nlist={nlist} lists: FAISS needs at least "
                              f"{minimum_per_list} per list, {minimum_per_list * nlist:,} in all (pass a smaller "
                              f"nlist, at most {max(1, rows // minimum_per_list)})")
    m = m or ix._pq_m(dim)
    if dim % m:
        raise IndexBuildError(f"PQ m={m} must divide the dim {dim}")
    n_train = min(rows, train_rows or min(64 * max(nlist, 2 ** nbits), TRAIN_MAX_ROWS))
    if n_train < minimum_per_list * nlist:
        raise IndexBuildError(f"train_rows={n_train:,} is too few for nlist={nlist}: at least "
                              f"{minimum_per_list * nlist:,} ({minimum_per_list} per list)")
    nbits = max(1, min(nbits, int(math.log2(max(2, n_train // minimum_per_list)))))
    return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nlist, nprobe or max(8, nlist // 16)),
            "train_rows": n_train}


# --------------------------------------------------------------------------- worker code (Ray tasks)

PEAKS_ENV = "STRATA_INDEX_TASK_PEAKS"  # a file: every task appends {"task", "rel", "rows", "peak_rss_mb"} (benchmarks)


_START_MB = [0.0]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _peak_reset() -> None:
    """Start a task's own peak: a reused Ray worker's lifetime peak would carry earlier tasks' memory
    (Linux: writing 5 to clear_refs resets VmHWM; elsewhere the lifetime peak is what is reported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _START_MB[0] = round(_status_kb("VmRSS:") / 1024, 1)
    except (OSError, StopIteration):
        pass


def _peak_mb(task: str, rel: str = "", rows: int = 0) -> float:
    """This process's peak RSS (MB) since ``_peak_reset``; appended to ``$STRATA_INDEX_TASK_PEAKS`` when set."""
    try:
        kb = _status_kb("VmHWM:")
    except (OSError, StopIteration):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mb = round(kb / 1024, 1)
    if os.environ.get(PEAKS_ENV):
        with open(os.environ[PEAKS_ENV], "a") as f:
            f.write(json.dumps({"task": task, "rel": rel, "rows": rows, "peak_rss_mb": mb, "start_rss_mb": _START_MB[0],
                                "pid": os.getpid()}) + "\n")
    return mb


def _finite(rel: str, ids: Sequence[str], x: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise IndexBuildError(f"shard {rel}: {int(bad.sum())} {what} vector(s) are NaN or Inf (first id "
                              f"{ids[int(np.argmax(bad))]!r}); fix or re-embed that shard (refused, not skipped)")


def sample_positions(rows_per_file: Sequence[int], n: int, seed: int) -> list[np.ndarray]:
    """Per file, the sorted row numbers of a seeded uniform sample of ``n`` rows over all files."""
    wanted = np.sort(np.random.default_rng(seed).choice(int(sum(rows_per_file)), size=n, replace=False))
    bounds = np.concatenate([[0], np.cumsum(rows_per_file)]).astype(np.int64)
    return [wanted[np.searchsorted(wanted, lo):np.searchsorted(wanted, hi)] - lo
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def sample_shard(out_dir: str, rel: str, positions: np.ndarray, source, dim: int, source_dim: int,
                 chunk_rows: int = 65536) -> np.ndarray:
    """The normalised vectors at ``positions`` (sorted row numbers) of one part, streamed. A Ray task."""
    _peak_reset()
    sample, pos = [], 0
    for ids, x in ix._chunks([Path(out_dir) / rel], source, dim, chunk_rows, source_dim):
        a, b = np.searchsorted(positions, [pos, pos + len(x)])
        pick = positions[a:b] - pos
        _finite(rel, [ids[i] for i in pick], x[pick], "sampled")
        sample.append(x[pick])
        pos += len(x)
        if b == len(positions):
            break
    out = np.concatenate(sample) if sample else np.zeros((0, dim), np.float32)
    _peak_mb("sample", rel, len(out))
    return out


def train_sample(dim: int, opts: dict, seed: int, threads: int, *samples: np.ndarray) -> np.ndarray:
    """The trained, empty IVF-PQ index (serialised) from the parts' samples, in file order. A Ray task."""
    _peak_reset()
    if threads:
        faiss.omp_set_num_threads(threads)
    x = np.ascontiguousarray(np.concatenate(samples), dtype=np.float32)
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, opts["nlist"], opts["m"], opts["nbits"],
                             faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.pq.cp.seed = seed
    index.train(x)
    blob = faiss.serialize_index(index)
    _peak_mb("train", "", len(x))
    return blob


def train_ivfpq(out_dir: str, rels: Sequence[str], rows_per_file: Sequence[int], source, dim: int, source_dim: int,
                opts: dict, seed: int, chunk_rows: int = 65536, threads: int = 1) -> np.ndarray:
    """In one process, what the Ray build does: sample every part (seeded), train on the sample."""
    samples = [sample_shard(out_dir, rel, pos, source, dim, source_dim, chunk_rows)
               for rel, pos in zip(rels, sample_positions(rows_per_file, opts["train_rows"], seed)) if len(pos)]
    return train_sample(dim, opts, seed, threads, *samples)


def encode_shard(out_dir: str, rel: str, source, dim: int, source_dim: int, trained: np.ndarray, offset: int,
                 part: str, chunk_rows: int = 65536, threads: int = 1) -> dict:
    """Add one embedding part's vectors to a copy of the trained index (labels ``offset + row``) and
    write it to ``part`` (+ ``.ids.parquet``), each aside then renamed. Runs as a Ray task."""
    _peak_reset()
    if threads:
        faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    index = faiss.deserialize_index(np.asarray(trained))
    part_path = Path(part)
    ids_path = part_path.with_suffix(".ids.parquet")
    tag = uuid.uuid4().hex[:8]
    tmp_index, tmp_ids = (p.with_name(f"{p.name}.tmp-{tag}") for p in (part_path, ids_path))
    n = 0
    with pq.ParquetWriter(tmp_ids, pa.schema([("id", pa.string())])) as writer:
        for ids, x in ix._chunks([Path(out_dir) / rel], source, dim, chunk_rows, source_dim):
            _finite(rel, ids, x, "")
            index.add_with_ids(x, np.arange(offset + n, offset + n + len(x), dtype=np.int64))
            writer.write_table(pa.table({"id": pa.array(ids, pa.string())}))
            n += len(x)
    faiss.write_index(index, str(tmp_index))
    os.replace(tmp_ids, ids_path)
    os.replace(tmp_index, part_path)
    return {"rows": n, "seconds": round(time.perf_counter() - t0, 3),
            "peak_rss_mb": _peak_mb("encode", rel, n)}


# --------------------------------------------------------------------------- the driver


def _ray(address: str | None):
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False, ignore_reinit_error=True)
    return ray


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
    user: dict  # the options as given (what must match to reuse the trained quantiser)
    record: dict
    parts: Path


def build_ivfpq_ray(out_dir: str | Path, variants: Sequence[Variant | str] | None = None, *,
                    manifest: dict | None = None, nlist: int | None = None, m: int | None = None, nbits: int = 8,
                    nprobe: int | None = None, train_rows: int | None = None, seed: int = 0,
                    chunk_rows: int = 65536, ray_address: str | None = None, task_cpus: float = 1.0,
                    threads: int = 1, on_shard: Callable[[Variant, str, dict], None] | None = None,
                    on_built=None) -> dict[Variant, dict]:
    """Build (or resume) one on-disk IVF-PQ index per variant on Ray (module doc); all variants' tasks
    run side by side. Returns each variant's parameters (the index JSON) with an ``encoded`` and a
    ``reused`` list of shard keys. ``on_shard(variant, key, result)`` is called after each shard is
    recorded (tests use it to stop a build midway)."""
    from .derive import reader

    out_dir = Path(out_dir)
    manifest = manifest if manifest is not None else Output(str(out_dir)).read_manifest()
    if not manifest:
        raise IndexBuildError(f"{out_dir} has no manifest.json: run `strata embed` first")
    dtype = manifest.get("signature", {}).get("dtype") or "float32"
    if dtype in ("int8", "binary"):
        raise IndexBuildError(f"{out_dir} stores {dtype} codes: --engine ray builds float IVF-PQ indexes only; "
                              f"use --engine local")
    wanted = ix._wanted(manifest, variants, str(out_dir))
    shards = shards_of(out_dir, manifest)
    rows = sum(s.rows for s in shards)
    given = {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe, "train_rows": train_rows, "seed": seed}

    plans = []
    for v in wanted:
        source = reader(out_dir, manifest, v)
        source_dim = _check_dims(out_dir, shards, source)
        dim = source_dim if isinstance(source, str) else source.dim(source_dim)
        user = {**given, "columns": ix._columns(source), "dim": dim,
                "transform": manifest.get("derived", {}).get(v.name, {}).get("transform")}
        rec = read_build_record(out_dir, v)
        parts = parts_dir(out_dir, v)
        if rec.get("user") != user or not (parts / TRAINED).is_file():
            rec = {"user": user, "options": ivfpq_options(rows, dim, **{k: given[k] for k in
                                                                        ("nlist", "m", "nbits", "nprobe",
                                                                         "train_rows")}),
                   "shards": {}, "next_offset": 0}
        plans.append(_Plan(v, source, dim, source_dim, rows, user, rec, parts))

    ray = _ray(ray_address)
    remote = dict(num_cpus=task_cpus, max_retries=3, retry_exceptions=False)
    sample_task = ray.remote(**remote)(sample_shard)
    train_task = ray.remote(**remote)(train_sample)
    encode_task = ray.remote(**remote)(encode_shard)
    out_str = str(out_dir)

    # 1. train where needed (all variants at once)
    pending = {}
    for p in plans:
        p.parts.mkdir(parents=True, exist_ok=True)
        if (p.parts / TRAINED).is_file() and p.record.get("trained_at"):
            continue
        positions = sample_positions([sh.rows for sh in shards], p.record["options"]["train_rows"], seed)
        samples = [sample_task.remote(out_str, sh.rel, pos, p.source, p.dim, p.source_dim, chunk_rows)
                   for sh, pos in zip(shards, positions) if len(pos)]  # read in parallel, one task per part
        pending[train_task.remote(p.dim, p.record["options"], seed, threads, *samples)] = p
    for ref, p in pending.items():
        try:
            blob = ray.get(ref)
        except Exception as e:
            raise _unwrap(ray, e) from None
        tmp = p.parts / f"{TRAINED}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(np.asarray(blob).tobytes())
        os.replace(tmp, p.parts / TRAINED)
        p.record.update(trained_at=utc_now(), shards={}, allocated={}, next_offset=0)  # new quantiser: no list valid
        _write_json(build_record_path(out_dir, p.variant), p.record)

    # 2. encode the shards not recorded with their current fingerprint
    jobs, report = {}, {p.variant: {"encoded": [], "reused": []} for p in plans}
    for p in plans:
        trained = ray.put(np.frombuffer((p.parts / TRAINED).read_bytes(), dtype=np.uint8))
        for s in shards:
            got = p.record["shards"].get(s.key)
            if got and got["fingerprint"] == s.fingerprint and (p.parts / got["part"]).is_file():
                report[p.variant]["reused"].append(s.key)
                continue
            p.record["shards"].pop(s.key, None)
            allocated = p.record.setdefault("allocated", {})
            if (allocated.get(s.key) or {}).get("fingerprint") == s.fingerprint:
                offset = allocated[s.key]["offset"]  # a killed build's range: reused, no hole left
            else:  # a new or changed shard: a new label range (a changed shard's old one is given up)
                offset = p.record["next_offset"]
                p.record["next_offset"] = offset + s.rows
                allocated[s.key] = {"fingerprint": s.fingerprint, "offset": offset, "rows": s.rows}
            # one file per attempt: a task left running by a killed build never overwrites a recorded part
            part = f"{s.key}.{uuid.uuid4().hex[:8]}.faiss"
            ref = encode_task.remote(out_str, s.rel, p.source, p.dim, p.source_dim, trained, offset,
                                     str(p.parts / part), chunk_rows, threads)
            jobs[ref] = (p, s, offset, part)
    for p in plans:
        _write_json(build_record_path(out_dir, p.variant), p.record)
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
            p.record["shards"][s.key] = {"fingerprint": s.fingerprint, "offset": offset, "rows": s.rows,
                                         "part": part, "encoded_at": utc_now(),
                                         "seconds": result["seconds"], "peak_rss_mb": result["peak_rss_mb"]}
            _write_json(build_record_path(out_dir, p.variant), p.record)
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
        params = _merge(out_dir, p, shards)
        params.update(report[p.variant])
        built[p.variant] = params
        _record_built(out_dir, manifest, p.variant, params)
        if on_built:
            on_built(p.variant, params, time.perf_counter() - t0)
    return built


def _merge(out_dir: Path, p: _Plan, shards: Sequence[Shard]) -> dict:
    from faiss.contrib.ondisk import merge_ondisk

    current = {s.key for s in shards}
    allocated = p.record.setdefault("allocated", {})
    for key in [k for k in allocated if k not in current]:
        allocated.pop(key)
    for key in [k for k in p.record["shards"] if k not in current]:  # shards no longer in the manifest
        gone = p.record["shards"].pop(key)
        for f in (p.parts / gone["part"], (p.parts / gone["part"]).with_suffix(".ids.parquet")):
            f.unlink(missing_ok=True)
    _write_json(build_record_path(out_dir, p.variant), p.record)
    recs = [p.record["shards"][s.key] for s in shards]
    keep = {TRAINED, *(r["part"] for r in recs), *(str(Path(r["part"]).with_suffix(".ids.parquet")) for r in recs)}
    for f in p.parts.iterdir():  # parts of earlier attempts, tasks of killed builds, temporary files
        if f.name not in keep:
            f.unlink(missing_ok=True)
    labels = max(r["offset"] + r["rows"] for r in recs)

    out_path = ix.index_path(out_dir, p.variant)
    build = uuid.uuid4().hex[:8]
    ivfdata = out_path.with_name(f"{out_path.stem}.{build}.ivfdata").resolve()
    index = faiss.read_index(str(p.parts / TRAINED))
    merge_ondisk(index, [str(p.parts / r["part"]) for r in recs], str(ivfdata))
    opts = p.record["options"]
    index.nprobe = opts["nprobe"]
    if index.ntotal != p.rows:
        raise IndexBuildError(f"{p.variant.name}: merged {index.ntotal} vectors, the manifest lists {p.rows}")
    params = {**ix._base_params("ivfpq", "float32", p.rows, p.dim, 0), **opts, "rerank": None, "engine": "ray",
              "ondisk": ivfdata.name, "ondisk_path": str(ivfdata.resolve()), "labels": labels, "shards": len(recs),
              "column": p.source if isinstance(p.source, str) else None,
              "variant": None if isinstance(p.source, str) else p.variant.name,
              "source_columns": ix._columns(p.source), "files": [str(out_dir / s.rel) for s in shards]}
    ids_path, json_path = ix._sidecars(out_path)
    tmp_index, tmp_ids, tmp_json = (q.with_name(q.name + f".tmp-{build}") for q in (out_path, ids_path, json_path))
    faiss.write_index(index, str(tmp_index))
    del index
    _write_ids(tmp_ids, [(r["offset"], r["rows"], p.parts / Path(r["part"]).with_suffix(".ids.parquet")) for r in recs],
               labels)
    tmp_json.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp_index, out_path)
    os.replace(tmp_ids, ids_path)
    os.replace(tmp_json, json_path)
    for old in glob.glob(str(out_path.with_name(f"{glob.escape(out_path.stem)}.*.ivfdata"))):
        if Path(old).name != ivfdata.name:
            os.unlink(old)
    return params


def _write_ids(path: Path, parts: Sequence[tuple[int, int, Path]], labels: int) -> None:
    """The label -> id table, streamed one part at a time (memory: one part's ids, whatever the
    corpus size); labels no part holds (ranges a killed build handed out) are null."""
    schema = pa.schema([("id", pa.string())])
    at = 0
    with pq.ParquetWriter(path, schema) as writer:
        for offset, rows, ids_file in sorted(parts):
            if offset > at:
                writer.write_table(pa.table({"id": pa.nulls(offset - at, pa.string())}, schema=schema))
            part = pq.read_table(ids_file, columns=["id"]).column("id").cast(pa.string())
            if len(part) != rows:
                raise IndexBuildError(f"{ids_file.name}: {len(part)} ids, its build record says {rows}")
            writer.write_table(pa.table({"id": part}, schema=schema))
            at = offset + rows
        if labels > at:
            writer.write_table(pa.table({"id": pa.nulls(labels - at, pa.string())}, schema=schema))


def _record_built(out_dir: Path, manifest: dict, v: Variant, params: dict) -> None:

    built = Output(str(out_dir)).read_json(f"{INDEXES}/{ix.BUILT_FILE}") or {}
    built[v.name] = {"files": ix.committed_files(manifest), "kind": "ivfpq", "built_kind": "ivfpq", "engine": "ray",
                     "rows": params["rows"], "built_at": utc_now()}
    _write_json(out_dir / INDEXES / ix.BUILT_FILE, built)


def output_rows(out_dir: str | Path, manifest: dict) -> int:
    """Committed rows of an output, from the part files' footers (for the engine choice)."""
    return sum(s.rows for s in shards_of(Path(out_dir), manifest))

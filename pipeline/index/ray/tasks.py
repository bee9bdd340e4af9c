"""Worker code of the Ray build: sample a part, train the quantiser, encode a part. Each is a plain
function (tests and ``train_ivfpq`` call them in-process) that the driver runs as a Ray task.

``probe``: None, or a picklable object a study passes to look inside each task
(``studies/index_memory.py``: peak RSS per task): ``probe.start()`` when the task starts,
``probe.stop(task, rel, rows)`` when it ends (``task``: ``sample``, ``train`` or ``encode``); what
``stop`` returns (a dict) joins an encode task's result, which the driver hands to ``on_shard``.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..factory import ivfpq
from ..layout import IndexBuildError
from ..reading import read_vectors
from .record import VECTORS_SUFFIX


def _finite(rel: str, ids: Sequence[str], x: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise IndexBuildError(f"shard {rel}: {int(bad.sum())} {what} vector(s) are NaN or Inf (first id "
                              f"{ids[int(np.argmax(bad))]!r}); fix or re-embed that shard (refused, not skipped)")


def _start(probe) -> None:
    if probe is not None:
        probe.start()


def _stop(probe, task: str, rel: str, rows: int) -> dict:
    return dict(probe.stop(task, rel, rows) or {}) if probe is not None else {}


def sample_positions(rows_per_file: Sequence[int], n: int, seed: int) -> list[np.ndarray]:
    """Per file, the sorted row numbers of a seeded uniform sample of ``n`` rows over all files."""
    wanted = np.sort(np.random.default_rng(seed).choice(int(sum(rows_per_file)), size=n, replace=False))
    bounds = np.concatenate([[0], np.cumsum(rows_per_file)]).astype(np.int64)
    return [wanted[np.searchsorted(wanted, lo):np.searchsorted(wanted, hi)] - lo
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def sample_shard(out_dir: str, rel: str, positions: np.ndarray, source, dim: int, source_dim: int,
                 chunk_rows: int = 65536, probe=None) -> np.ndarray:
    """The normalised vectors at ``positions`` (sorted row numbers) of one part, streamed. A Ray task."""
    _start(probe)
    sample, pos = [], 0
    for ids, x in read_vectors([Path(out_dir) / rel], source, dim, chunk_rows, source_dim):
        a, b = np.searchsorted(positions, [pos, pos + len(x)])
        pick = positions[a:b] - pos
        _finite(rel, [ids[i] for i in pick], x[pick], "sampled")
        sample.append(x[pick])
        pos += len(x)
        if b == len(positions):
            break
    out = np.concatenate(sample) if sample else np.zeros((0, dim), np.float32)
    _stop(probe, "sample", rel, len(out))
    return out


def train_sample(dim: int, opts: dict, seed: int, threads: int, *samples: np.ndarray, probe=None) -> np.ndarray:
    """The trained, empty IVF-PQ index (serialised) from the parts' samples, in file order. A Ray task."""
    _start(probe)
    if threads:
        faiss.omp_set_num_threads(threads)
    x = np.ascontiguousarray(np.concatenate(samples), dtype=np.float32)
    index = ivfpq(dim, opts, seed)
    index.train(x)
    blob = faiss.serialize_index(index)
    _stop(probe, "train", "", len(x))
    return blob


def train_ivfpq(out_dir: str, rels: Sequence[str], rows_per_file: Sequence[int], source, dim: int, source_dim: int,
                opts: dict, seed: int, chunk_rows: int = 65536, threads: int = 1) -> np.ndarray:
    """In one process, what the Ray build does: sample every part (seeded), train on the sample."""
    samples = [sample_shard(out_dir, rel, pos, source, dim, source_dim, chunk_rows)
               for rel, pos in zip(rels, sample_positions(rows_per_file, opts["train_rows"], seed)) if len(pos)]
    return train_sample(dim, opts, seed, threads, *samples)


def encode_shard(out_dir: str, rel: str, source, dim: int, source_dim: int, trained: np.ndarray, offset: int,
                 part: str, chunk_rows: int = 65536, threads: int = 1, probe=None) -> dict:
    """Add one embedding part's vectors to a copy of the trained index (labels ``offset + row``) and
    write it to ``part`` (+ ``.ids.parquet``, + ``.f32``: the same normalised vectors as float32 rows,
    which the merge gathers for exact re-ranking), each aside then renamed. Runs as a Ray task."""
    _start(probe)
    if threads:
        faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    index = faiss.deserialize_index(np.asarray(trained))
    part_path = Path(part)
    ids_path, vectors_path = part_path.with_suffix(".ids.parquet"), part_path.with_suffix(VECTORS_SUFFIX)
    tag = uuid.uuid4().hex[:8]
    tmp_index, tmp_ids, tmp_vectors = (p.with_name(f"{p.name}.tmp-{tag}") for p in (part_path, ids_path, vectors_path))
    n = 0
    with pq.ParquetWriter(tmp_ids, pa.schema([("id", pa.string())])) as writer, open(tmp_vectors, "wb") as vec:
        for ids, x in read_vectors([Path(out_dir) / rel], source, dim, chunk_rows, source_dim):
            _finite(rel, ids, x, "")
            index.add_with_ids(x, np.arange(offset + n, offset + n + len(x), dtype=np.int64))
            writer.write_table(pa.table({"id": pa.array(ids, pa.string())}))
            vec.write(np.ascontiguousarray(x, dtype=np.float32).tobytes())
            n += len(x)
    faiss.write_index(index, str(tmp_index))
    os.replace(tmp_ids, ids_path)
    os.replace(tmp_vectors, vectors_path)
    os.replace(tmp_index, part_path)
    return {"rows": n, "seconds": round(time.perf_counter() - t0, 3), **_stop(probe, "encode", rel, n)}

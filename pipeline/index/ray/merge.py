"""The on-disk merge (driver): every recorded part's inverted lists concatenated into one file.

``faiss.contrib.ondisk.merge_ondisk`` writes ``indexes/{variant}.{build}.ivfdata``;
``indexes/{variant}.faiss`` holds the quantiser and refers to that file, which ``load_index``
memory-maps (``IO_FLAG_ONDISK_SAME_DIR``: the two files travel together). The ``.ids.parquet``
sidecar is indexed by FAISS label, null where no recorded part holds the label. Beside them,
``{variant}.{build}.f32`` holds the indexed vectors as float32 rows by label: search re-ranks the
``rerank x k`` IVF-PQ candidates by their exact cosine, reading only those rows (memory-mapped),
as the local engine's ``IndexRefineFlat`` does from memory.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...variants import Variant
from ..layout import IndexBuildError, index_path, sidecars
from ..params import base_params
from ..reading import source_columns
from .record import TRAINED, VECTORS_SUFFIX, BuildRecord, Shard, write_build_record


def merge(out_dir: Path, v: Variant, source, dim: int, rows: int, record: BuildRecord, parts: Path,
          shards: Sequence[Shard], rerank: int) -> dict:
    """Forget parts no longer committed, merge the recorded ones' lists, write the index and its
    sidecars (each aside, then renamed; the JSON last); returns the parameters written."""
    from faiss.contrib.ondisk import merge_ondisk

    for gone in record.forget(s.key for s in shards):  # shards no longer in the manifest
        for f in (parts / gone.part, parts / gone.ids_file, parts / gone.vectors_file):
            f.unlink(missing_ok=True)
    write_build_record(out_dir, v, record)
    recs = [record.shards[s.key] for s in shards]
    keep = {TRAINED, *(r.part for r in recs), *(r.ids_file for r in recs), *(r.vectors_file for r in recs)}
    for f in parts.iterdir():  # parts of earlier attempts, tasks of killed builds, temporary files
        if f.name not in keep:
            f.unlink(missing_ok=True)
    labels = record.labels

    out_path = index_path(out_dir, v)
    build = uuid.uuid4().hex[:8]
    ivfdata = out_path.with_name(f"{out_path.stem}.{build}.ivfdata").resolve()
    vectors = out_path.with_name(f"{out_path.stem}.{build}{VECTORS_SUFFIX}")
    write_vectors(vectors, [(r.offset, r.rows, parts / r.vectors_file) for r in recs], labels, dim)
    index = faiss.read_index(str(parts / TRAINED))
    merge_ondisk(index, [str(parts / r.part) for r in recs], str(ivfdata))
    opts = record.options
    index.nprobe = opts["nprobe"]
    if index.ntotal != rows:
        raise IndexBuildError(f"{v.name}: merged {index.ntotal} vectors, the manifest lists {rows}")
    params = {**base_params("ivfpq", "float32", rows, dim, 0), **opts, "rerank": rerank, "engine": "ray",
              "ondisk": ivfdata.name, "ondisk_path": str(ivfdata.resolve()), "vectors": vectors.name,
              "labels": labels, "shards": len(recs),
              "column": source if isinstance(source, str) else None,
              "variant": None if isinstance(source, str) else v.name,
              "source_columns": source_columns(source), "files": [str(out_dir / s.rel) for s in shards]}
    ids_path, json_path = sidecars(out_path)
    tmp_index, tmp_ids, tmp_json = (q.with_name(q.name + f".tmp-{build}") for q in (out_path, ids_path, json_path))
    faiss.write_index(index, str(tmp_index))
    del index
    write_ids(tmp_ids, [(r.offset, r.rows, parts / r.ids_file) for r in recs], labels)
    tmp_json.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp_index, out_path)
    os.replace(tmp_ids, ids_path)
    os.replace(tmp_json, json_path)
    for suffix, current in ((".ivfdata", ivfdata.name), (VECTORS_SUFFIX, vectors.name)):
        for old in glob.glob(str(out_path.with_name(f"{glob.escape(out_path.stem)}.*{suffix}"))):
            if Path(old).name != current:
                os.unlink(old)
    return params


def write_vectors(path: Path, parts: Sequence[tuple[int, int, Path]], labels: int, dim: int) -> None:
    """The label-ordered float32 rows (``labels x dim``, zeros where no part holds a label) that
    search re-ranks with, copied one part at a time (memory: one part's vectors)."""
    tmp = path.with_name(path.name + ".tmp")
    out = np.memmap(tmp, dtype=np.float32, mode="w+", shape=(max(labels, 1), dim))
    for offset, rows, f in parts:
        x = np.fromfile(f, dtype=np.float32)
        if x.size != rows * dim:
            raise IndexBuildError(f"{f.name}: {x.size // max(dim, 1)} vectors, its build record says {rows}")
        out[offset:offset + rows] = x.reshape(rows, dim)
    out.flush()
    del out
    os.replace(tmp, path)


def write_ids(path: Path, parts: Sequence[tuple[int, int, Path]], labels: int) -> None:
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

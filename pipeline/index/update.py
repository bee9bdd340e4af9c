"""Indexes that follow their output: rows that left deleted and new rows added, in place of a
rebuild, while the trained quantiser still describes the data.

An index's labels are positions; its ids table (``{variant}.ids.parquet``) holds each label's
``id`` and ``key`` (the content key every part stores, ``runner/reuse.py``: within an output, equal
keys mean equal vectors, copied bit for bit). A label stays while some row of the output has its key:
a shard re-exported under other file names, split otherwise or given new ids moves no vector (the
label takes the row's current id). When the output moves on, ``row_delta`` matches the index's keys
with the output's (each key counted, so repeated texts match one for one), and ``update_index``

- deletes the labels whose pair left (FAISS ``remove_ids``: a flat index compacts its rows in order;
  an IVF's lists drop the entries and the remaining ids are renumbered to their new positions;
  ``IndexRefineFlat`` does both to its two halves);
- adds the rows whose pair is new at the end, reading vectors only from the files that hold them;
- writes the ids and keys in the new label order.

Reading the output's (id, key) columns costs ~40 bytes a row; no vector of an unchanged row is read.
What the IVF lists hold afterwards is what a fresh build on the same trained quantiser would add
(the same codes in the same lists, in another order), so searches answer alike up to ties.

A full rebuild instead where an update cannot keep that promise (``refusal`` and ``row_delta`` say
why): an HNSW graph (FAISS cannot delete from it), another kind or build options, other fitted
pieces (a refitted transform changes every vector), an index from before keys were kept, and
*drift*: more than ``DRIFT`` of the rows changed (deleted plus added, summed over updates) since the
quantiser was trained, counted against the rows it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DRIFT = 0.2  # share of rows changed since training beyond which an IVF index is trained again
STRUCTURE = ("nlist", "m", "train_rows", "hnsw_m", "ef_construction")  # build options an update cannot change


@dataclass
class Delta:
    """What changes between an index's rows and the output's."""

    removed: np.ndarray  # labels to delete
    kept_ids: pa.Array  # the current id of each label that stays, in label order
    added: pa.Table  # the output's new rows (``reading.row_keys``: id, key, file, row), in file then row order
    rows_before: int
    changed: int  # rows changed since training, with this update


def refusal(record: dict | None, *, kind: str, fitted: str, options: dict) -> str | None:
    """Why the index ``record`` describes cannot be updated but must be rebuilt; None where it can."""
    if not record:
        return "no previous index to update"
    if record.get("engine") == "ray":
        return "the Ray engine's index follows its output by its own build (shards' parts reused)"
    if record.get("built_kind") == "hnsw":
        return "an HNSW graph cannot delete rows"
    if record.get("kind") != kind:
        return f"it was built as {record.get('kind')}, {kind} is asked"
    if record.get("fitted") != fitted:
        return "the fitted pieces it was built through changed"
    given = [k for k in STRUCTURE if options.get(k) is not None]
    if given:
        return f"build options given ({', '.join(given)})"
    return None


def _counted(t: pa.Table, pos: str) -> pa.Table:
    """``t``'s keyed rows with ``n``: the occurrence number of its key, in the order of column ``pos``."""
    t = t.filter(pc.is_valid(t.column("key")))
    order = t.sort_by([("key", "ascending"), (pos, "ascending")])
    keys = order.column("key").to_numpy(zero_copy_only=False)
    start = np.ones(len(keys), dtype=bool)
    start[1:] = keys[1:] != keys[:-1]
    first = np.maximum.accumulate(np.where(start, np.arange(len(keys)), 0))
    return order.append_column("n", pa.array(np.arange(len(keys)) - first))


def row_delta(record: dict, old: pa.Table, now: pa.Table) -> Delta | str:
    """Match the index's rows (``old``: its ids table, id and key by label) with the output's (``now``:
    ``reading.row_keys``) by key; the delta, or why a rebuild is due instead (keys missing, drift)."""
    if "key" not in old.column_names:
        return "its ids table predates content keys"
    a = _counted(old.select(["key"]).append_column("label", pa.array(np.arange(old.num_rows, dtype=np.int64))),
                 "label")
    b = _counted(now.select(["id", "key"]).append_column("at", pa.array(np.arange(now.num_rows, dtype=np.int64))),
                 "at")
    matched = a.join(b, keys=["key", "n"], join_type="inner")
    labels = matched.column("label").to_numpy()
    at = matched.column("at").to_numpy()
    kept = np.zeros(old.num_rows, dtype=bool)
    kept[labels] = True
    found = np.zeros(now.num_rows, dtype=bool)
    found[at] = True
    current = np.empty(old.num_rows, dtype=np.int64)
    current[labels] = at
    kept_ids = now.column("id").take(pa.array(current[kept]))
    removed = np.flatnonzero(~kept).astype(np.int64)
    added = now.filter(pa.array(~found))
    changed = int(record.get("changed", 0)) + len(removed) + added.num_rows
    trained = int(record.get("trained_rows") or old.num_rows)
    if record.get("built_kind") in ("ivfpq", "ivf") and changed > DRIFT * max(trained, 1):
        return (f"{changed:,} rows changed since its quantiser was trained on {trained:,} "
                f"(more than {DRIFT:.0%})")
    return Delta(removed, kept_ids, added, old.num_rows, changed)


def remove_labels(index, labels: np.ndarray) -> None:
    """Delete ``labels`` from any flat or IVF index (float, int8 or binary; with or without
    ``IndexRefineFlat``) and renumber the rest to their positions among the rows that remain, in order."""
    if not len(labels):
        return
    n = index.ntotal
    keep = np.ones(n, dtype=bool)
    keep[labels] = False
    remap = (np.cumsum(keep) - 1).astype(np.int64)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    selector = faiss.IDSelectorBatch(len(labels), faiss.swig_ptr(labels))
    if isinstance(index, faiss.IndexRefine):
        base, refine = faiss.downcast_index(index.base_index), faiss.downcast_index(index.refine_index)
        _remove_ivf(base, selector, remap)
        refine.remove_ids(selector)  # a flat index: compacts in order
        index.ntotal = base.ntotal
    elif isinstance(index, (faiss.IndexIVF, faiss.IndexBinaryIVF)):
        _remove_ivf(index, selector, remap)
    else:
        index.remove_ids(selector)  # flat kinds compact their rows in order
    if index.ntotal != int(keep.sum()):
        raise RuntimeError(f"removing {len(labels)} of {n} rows left {index.ntotal}")


def _remove_ivf(ivf, selector, remap: np.ndarray) -> None:
    ivf.remove_ids(selector)
    lists = ivf.invlists
    for i in range(ivf.nlist):
        size = lists.list_size(i)
        if not size:
            continue
        ptr = lists.get_ids(i)
        ids = faiss.rev_swig_ptr(ptr, size)  # the list's own memory: renumbered in place
        ids[:] = remap[ids]
        lists.release_ids(i, ptr)


def update_index(previous, delta: Delta, parts: list, column, out_path, *, dtype: str = "float32",
                 ranges=None, chunk_rows: int = 65536, search: dict | None = None) -> dict:
    """Write the index ``previous`` (the path of its ``.faiss``, beside its ids and JSON) takes to with
    ``delta``: its removed labels deleted, the added rows of ``parts`` (the output's files, in
    ``row_keys`` order, read through ``column``: a column name or a ``derive.Reader``) appended; returns
    the parameters written to the new JSON. ``search``: search settings given now (nprobe, rerank,
    rescore), recorded where the kind has them."""
    import json
    import os
    from pathlib import Path

    import pyarrow.parquet as pq

    from .. import quantize
    from .factory import add_vectors
    from .layout import IndexBuildError, sidecars
    from .reading import read_vectors, survey

    previous, out_path = Path(previous), Path(out_path)
    ids_path, json_path = sidecars(previous)
    params = json.loads(json_path.read_text())
    binary = dtype == "binary"
    index = (faiss.read_index_binary if binary else faiss.read_index)(str(previous))
    ids = pq.read_table(ids_path, columns=["id", "key"])
    if index.ntotal != delta.rows_before or ids.num_rows != delta.rows_before:
        raise IndexBuildError(f"{previous}: {index.ntotal} vectors and {ids.num_rows} ids, expected {delta.rows_before}")
    remove_labels(index, delta.removed)
    keep = np.ones(delta.rows_before, dtype=bool)
    keep[delta.removed] = False
    tables = [pa.table({"id": delta.kept_ids, "key": ids.column("key").filter(pa.array(keep))})]
    raw = quantize.is_quantized(dtype)
    files = delta.added.column("file").to_numpy()
    rows = delta.added.column("row").to_numpy()
    for i in np.unique(files):
        want = rows[files == i]
        _, source_dim = survey([parts[i]], column, chunk_rows)
        read_dim = source_dim if raw else (source_dim if isinstance(column, str) else column.dim(source_dim))
        start = 0
        for chunk_ids, x in read_vectors([parts[i]], column, read_dim, chunk_rows, source_dim, raw):
            lo, hi = np.searchsorted(want, [start, start + len(x)])
            sel = want[lo:hi] - start
            if len(sel):
                add_vectors(index, dtype, ranges, np.ascontiguousarray(x[sel]))
            start += len(x)
        tables.append(delta.added.filter(pa.array(files == i)).select(["id", "key"]))
    new_ids = pa.concat_tables(tables)
    if new_ids.num_rows != index.ntotal:
        raise IndexBuildError(f"{index.ntotal} vectors but {new_ids.num_rows} ids after the update")
    params = {**params, "rows": int(index.ntotal)}
    params.update({k: int(v) for k, v in (search or {}).items() if v is not None and params.get(k) is not None})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_ids, out_json = sidecars(out_path)
    tmp = [p.with_name(p.name + ".tmp") for p in (out_path, out_ids, out_json)]
    (faiss.write_index_binary if binary else faiss.write_index)(index, str(tmp[0]))
    pq.write_table(new_ids, tmp[1])
    tmp[2].write_text(json.dumps(params, indent=2) + "\n")
    for t, p in zip(tmp, (out_path, out_ids, out_json)):
        os.replace(t, p)
    return params

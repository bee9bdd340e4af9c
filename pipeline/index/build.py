"""Building FAISS indexes per variant (the local engine), streaming the embedding files in bounded chunks.

``build_index`` builds one index over files (``reading.py`` streams and validates them,
``factory.py`` makes the FAISS index, ``params.py`` chooses kind and parameters) and writes it with
its sidecars (``layout.py``), the JSON last; ``build_indexes`` does that for an output's variants
and records each in ``indexes/_built.json`` (``fresh.py``); ``memory_index`` is the same index in
memory, for the evaluators.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import pyarrow.parquet as pq

from .. import quantize
from ..errors import redact_text
from ..variants import Variant
from .factory import add_vectors, make_index
from .fitted import source_digest
from .fresh import committed_files, record_built, wanted_variants
from .layout import INDEXES, IndexBuildError, index_path, local_index, sidecars
from .loaded import LoadedIndex
from .params import DEFAULTS, KINDS, base_params, choose_kind
from .reading import part_ref, read_vectors, row_keys, source_columns, survey


def _training_sample(files, source, dim, chunk_rows, rows, n, seed, source_dim, raw=False) -> np.ndarray:
    """n rows drawn uniformly without replacement, gathered in one streaming pass."""
    wanted = np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))
    sample, start = [], 0
    for _, x in read_vectors(files, source, dim, chunk_rows, source_dim, raw):
        lo, hi = np.searchsorted(wanted, [start, start + len(x)])
        sample.append(x[wanted[lo:hi] - start])
        start += len(x)
    return np.concatenate(sample)


def build_index(embedding_files: Sequence[str | Path], column, out_path: str | Path, kind: str = "auto", *,
                chunk_rows: int = 65536, hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128,
                nlist: int | None = None, m: int | None = None, nbits: int = 8, nprobe: int | None = None,
                rerank: int = DEFAULTS["rerank"], train_rows: int | None = None, seed: int = 0, dtype: str = "float32",
                ranges=None, rescore: int = 0) -> dict:
    """Build one cosine index over ``column`` of the files; returns the parameters written to JSON.

    ``column`` is a raw variant's column, or a ``derive.Reader`` that makes a derived variant
    (a mix, a fitted transform) from its source columns chunk by chunk.

    ``dtype`` ``int8`` or ``binary``: the column holds a quantised output's codes (``ranges``: its
    int8 ranges), indexed as ``factory.py`` says; ``rescore`` is the multiplier searches use by default.

    Memory is bounded by ``chunk_rows`` vectors for reading (plus, for ``ivfpq``, a training
    sample of ``train_rows``), on top of the index itself. Index order is file order, then
    row order, and the ids file records it.
    """
    if kind not in KINDS:
        raise IndexBuildError(f"kind {kind!r}: choose from {', '.join(KINDS)}")
    if chunk_rows < 1:
        raise IndexBuildError(f"chunk_rows must be positive, got {chunk_rows}")
    files = [part_ref(f) for f in embedding_files]
    if not files:
        raise IndexBuildError("no embedding files given")
    out_path = Path(out_path)
    if out_path.suffix != ".faiss":
        raise IndexBuildError(f"{out_path}: an index path must end in .faiss (e.g. indexes/L15.mean.faiss)")
    raw = quantize.is_quantized(dtype)
    if raw and not isinstance(column, str):
        raise IndexBuildError(f"{column.variant.name}: derived variants (mixes, transforms) are made from float "
                              f"columns; a {dtype} output has none")
    rows, source_dim = survey(files, column, chunk_rows)
    if raw:
        dim = source_dim * 8 if dtype == "binary" else source_dim
        if dtype == "int8":
            ranges = np.asarray(ranges, dtype=np.float32) if ranges is not None else None
            if ranges is None or ranges.shape != (2, dim):
                raise IndexBuildError(f"{column}: int8 codes of dim {dim} need ranges of shape (2, {dim}), got "
                                      f"{None if ranges is None else ranges.shape}")
    else:
        dim = source_dim if isinstance(column, str) else column.dim(source_dim)
    kind = choose_kind(rows) if kind == "auto" else kind
    params = {**base_params(kind, dtype, rows, dim, rescore),
              "column": column if isinstance(column, str) else None,
              "variant": None if isinstance(column, str) else column.variant.name,
              "source_columns": source_columns(column), "files": [redact_text(str(f)) for f in files]}  # kept with the index
    read_dim = source_dim if raw else dim

    def sample(n: int) -> np.ndarray:
        return _training_sample(files, column, read_dim, chunk_rows, rows, n, seed, source_dim, raw)

    index, extra = make_index(kind, dim, rows, dtype, ranges, sample, hnsw_m=hnsw_m, ef_construction=ef_construction,
                              ef_search=ef_search, nlist=nlist, m=m, nbits=nbits, nprobe=nprobe, rerank=rerank,
                              train_rows=train_rows, seed=seed)
    params.update(extra)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    ids_path, json_path = sidecars(out_path)
    tmp_index, tmp_ids, tmp_json = (p.with_name(p.name + ".tmp") for p in (out_path, ids_path, json_path))
    added = 0
    for ids, x in read_vectors(files, column, read_dim, chunk_rows, source_dim, raw):
        add_vectors(index, dtype, ranges, x)
        added += len(ids)
    # each label's id and content key (update.py matches rows by them), in the order added
    keys = row_keys(files).select(["id", "key"])
    if added != rows or index.ntotal != rows or keys.num_rows != rows:
        raise IndexBuildError(f"read {added} rows but the files declare {rows}; were they modified during the build?")
    (faiss.write_index_binary if dtype == "binary" else faiss.write_index)(index, str(tmp_index))
    pq.write_table(keys, tmp_ids)
    tmp_json.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp_index, out_path)
    os.replace(tmp_ids, ids_path)
    os.replace(tmp_json, json_path)
    return params


def memory_index(ids: Sequence[str], stored: np.ndarray, dtype: str = "float32", ranges=None, kind: str = "flat",
                 rescore: int = 0, seed: int = 0, **options) -> LoadedIndex:
    """The index ``build_index`` would build over these stored vectors, in memory (the evaluators'
    search, so that a quantised variant is scored exactly as its index would answer)."""
    raw = quantize.is_quantized(dtype)
    x = np.ascontiguousarray(stored) if raw else np.array(stored, dtype=np.float32, order="C", copy=True)
    if not raw:
        faiss.normalize_L2(x)
    dim = x.shape[1] * 8 if dtype == "binary" else x.shape[1]
    rows = len(x)
    kind = choose_kind(rows) if kind == "auto" else kind
    rng = np.random.default_rng(seed)
    index, extra = make_index(kind, dim, rows, dtype, ranges,
                              lambda n: x[np.sort(rng.choice(rows, size=n, replace=False))], **{**DEFAULTS, **options},
                              seed=seed)
    add_vectors(index, dtype, ranges, x)
    params = {**base_params(kind, dtype, rows, dim, rescore), **extra}
    if params["kind"] == "ivf":  # rescoring reconstructs documents by id
        (index if dtype == "binary" else faiss.extract_index_ivf(index)).make_direct_map()
    return LoadedIndex(index=index, ids=np.array(list(ids), dtype=object), params=params)


def build_indexes(out_dir: str | Path, variants: Sequence[Variant | str] | None = None, kind: str = "auto", *,
                  manifest: dict | None = None, on_built=None, previous: str | None = None,
                  **options) -> dict[Variant, dict]:
    """One index per variant of an embedding output: ``indexes/{variant}.faiss``.

    Streams the committed parts the manifest lists (never a directory listing) and records in
    ``indexes/_built.json`` what each index was built from, after the index itself (a crash
    leaves the record stale, never wrong): the files, the kind, the digest of the fitted pieces read
    through (``fitted.py``) and the rows changed since training. ``on_built(variant, params,
    seconds)`` is called after each one; ``params["update"]`` says how an updated index changed.

    An index already there (or in ``previous``: an output whose indexes were built from an earlier
    state of this one, e.g. the job's previous published version) is updated where it can be:
    rows whose content key left deleted, new ones added (``update.py``), reading the vectors of the
    new rows only; otherwise it is rebuilt, and ``params["rebuilt"]`` says why.

    An output on an object store (any fsspec URL) is read part by part in ranged reads, never
    downloaded whole; each index is written on local disk (FAISS writes files) and uploaded, its
    JSON last, then recorded.
    """
    import tempfile

    from ..derive import reader
    from ..storage import Output, redact
    from ..stores import is_local
    from .layout import BUILT_FILE
    from .update import refusal, row_delta, update_index

    out = Output(str(out_dir))
    remote = not is_local(out.fs)
    where = redact(out.url) if remote else str(out_dir)
    manifest = manifest if manifest is not None else out.read_manifest()
    if not manifest:
        raise IndexBuildError(f"{where} has no manifest.json: run `strata embed` first")
    wanted = wanted_variants(manifest, variants, where)
    files = committed_files(manifest)
    if not files:
        raise IndexBuildError(f"{where} has no committed embeddings to index")
    missing = [f for f in files if not out.fs.isfile(out.path(f))]
    if missing:
        raise FileNotFoundError(f"{redact(out.url.rstrip('/') + '/' + missing[0]) if remote else Path(out_dir) / missing[0]}"
                                ": listed in the manifest but missing")
    out.check_parts(manifest, read=set())  # a damaged part is named (DamagedOutput), never read: sizes and rows
    checked: set[str] = set()

    def verify(read: list[str]) -> None:  # and the checksum of every part whose vectors are read
        todo = set(read) - checked
        if todo:
            out.check_parts(manifest, read=todo)
            checked.update(todo)
    dtype = manifest.get("signature", {}).get("dtype") or "float32"
    ranges = quantize.read_ranges(str(out_dir))[0] if dtype == "int8" else {}

    def ref(f: str):
        return out.fs.unstrip_protocol(out.path(f)) if remote else Path(out.path(f))

    parts = [ref(f) for f in files]
    before = Output(str(previous)) if previous else out
    records = before.read_json(f"{INDEXES}/{BUILT_FILE}") or {}
    now = None  # the output's rows (id, key), read once for every variant that updates
    built = {}
    with tempfile.TemporaryDirectory(prefix="strata-index-") as scratch:
        for v in wanted:
            t0 = time.perf_counter()
            source = reader(out_dir, manifest, v)  # loaded once: what is built through is what is digested
            fitted = source_digest(source, ranges.get(v.name))
            target = index_path(scratch if remote else out_dir, v)
            rec = records.get(v.name)
            why = refusal(rec, kind=kind, fitted=fitted, options=options)
            old = local_index(before, v, Path(scratch) / "previous") if why is None else None
            delta = None
            if old is not None:
                now = row_keys(parts) if now is None else now
                delta = row_delta(rec, pq.read_table(sidecars(old)[0]), now)
                why = delta if isinstance(delta, str) else None
            elif why is None:
                why = "no previous index to update"
            if why is None:
                verify([files[i] for i in set(delta.added.column("file").to_pylist())])
                params = update_index(old, delta, parts, source, target, dtype=dtype, ranges=ranges.get(v.name),
                                      search={k: options.get(k) for k in ("nprobe", "rerank", "rescore")})
                extra = {"trained_rows": rec.get("trained_rows") or delta.rows_before, "changed": delta.changed}
                params["update"] = {"deleted": len(delta.removed), "added": delta.added.num_rows,
                                    "changed_since_training": delta.changed}
            else:
                verify(files)
                params = build_index(parts, source, target, kind, dtype=dtype, ranges=ranges.get(v.name), **options)
                extra = {"trained_rows": params["rows"], "changed": 0}
                params["rebuilt"] = why
            if remote:  # the three files, the JSON last: its presence means they belong together
                for local in (target, *sidecars(target)):
                    out.fs.put_file(str(local), out.path(INDEXES, local.name))
            built[v] = params
            record_built(out, v, {"files": files, "kind": kind, "built_kind": params["kind"], "rows": params["rows"],
                                  "fitted": fitted, **extra})
            if on_built:
                on_built(v, params, time.perf_counter() - t0)
    return built

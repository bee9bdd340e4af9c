"""A built index, loaded and searched.

``load_index`` opens ``indexes/{variant}.faiss`` with its ids and JSON (``layout.py``); an
``ondisk`` IVF-PQ of the Ray engine memory-maps its inverted lists (``{variant}.{build}.ivfdata``,
re-pointed with ``IO_FLAG_ONDISK_SAME_DIR`` where the output moved). ``LoadedIndex.search`` answers
by cosine whatever the kind (``factory.py``).

``rescore`` (the JSON's default, or ``search(..., rescore=M)``) on quantised indexes: fetch
``M x k`` candidates, re-score them by the cosine of the float query with the stored document
vectors (decoded int8, or sign vectors), keep the best ``k`` (sentence-transformers'
``semantic_search_faiss(rescore=True, rescore_multiplier=M)``; the documents are reconstructed
from the index).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import pyarrow.parquet as pq

from .. import quantize
from .layout import IndexBuildError, sidecars


@dataclass
class LoadedIndex:
    index: faiss.Index
    ids: np.ndarray  # object array of str, position = FAISS row
    params: dict
    # the Ray engine's IVF-PQ: its vectors by label (memory-mapped ``.f32``), for exact re-ranking
    vectors: np.ndarray | None = None

    @property
    def dtype(self) -> str:
        return self.params.get("dtype") or "float32"  # indexes built before quantised outputs are float

    def search(self, queries: np.ndarray, k: int, *, rescore: int | None = None
               ) -> tuple[np.ndarray, list[list[str | None]]]:
        """Top-k by cosine: scores (n, min(k, rows)) and ids, best first.

        Queries are normalised here, so raw model outputs can be passed. A slot FAISS could
        not fill (possible with approximate kinds) has id None and score NaN.

        Quantised indexes (module doc): an int8 index scores the float query against the decoded
        documents; a binary one binarises the query and scores ``1 - 2 * hamming / dim``.
        ``rescore`` (default: the JSON's) > 1 re-scores ``rescore x k`` candidates by the cosine of
        the float query with the stored document vectors; 0 or 1 turns it off.
        """
        q = np.array(queries, dtype=np.float32, ndmin=2, copy=True, order="C")
        if q.shape[1] != self.index.d:
            raise ValueError(f"queries have dim {q.shape[1]}, the index has {self.index.d}")
        faiss.normalize_L2(q)
        k = min(k, self.index.ntotal)
        mult = int((self.params.get("rescore") or 0) if rescore is None else rescore)
        if not quantize.is_quantized(self.dtype):
            mult = 0  # float vectors: the index's scores are the float cosines already
        refine = self.vectors is not None  # the Ray engine's IVF-PQ: exact scores, as IndexRefineFlat gives
        if refine:
            mult = max(1, int(self.params.get("rerank") or 1))
        fetch = min(k * mult, self.index.ntotal) if mult > 1 else k
        if self.dtype == "binary":
            dist, labels = self.index.search(quantize.binarize(q), fetch)
            scores = 1.0 - 2.0 * dist.astype(np.float32) / self.index.d
        else:
            scores, labels = self.index.search(q, fetch)
        if mult > 1 or refine:
            scores, labels = self._rescore(q, labels, k)
        scores = np.asarray(scores, dtype=np.float32)
        scores[labels < 0] = np.nan
        ids = [[self.ids[i] if i >= 0 else None for i in row] for row in labels]
        return scores, ids

    def set_search(self, *, nprobe: int | None = None, rerank: int | None = None) -> None:
        """The search settings in effect: the JSON's, or those given; kept in ``params`` (what answered)
        and applied to the FAISS index (an IVF's nprobe; the local IVF-PQ's ``IndexRefineFlat`` depth;
        the Ray IVF-PQ reads ``params["rerank"]`` in ``search``)."""
        given = {key: v for key, v in (("nprobe", nprobe), ("rerank", rerank)) if v is not None}
        if given:
            self.params = {**self.params, **given}
        kind = self.params["kind"]
        if kind in ("ivfpq", "ivf"):
            ivf = self.index if self.dtype == "binary" else faiss.extract_index_ivf(self.index)
            ivf.nprobe = self.params["nprobe"]
        if isinstance(self.index, faiss.IndexRefine) and self.params.get("rerank"):
            self.index.k_factor = float(self.params["rerank"])

    def stored(self, keys: np.ndarray) -> np.ndarray:
        """Documents as float32 unit vectors (decoded int8, or sign vectors), reconstructed from the index."""
        if self.vectors is not None:
            return np.asarray(self.vectors[keys], dtype=np.float32)  # reads only those rows
        if self.dtype == "binary":
            if getattr(self, "_codes", None) is None:  # flat and HNSW keep the codes in one array
                flat = self.index if isinstance(self.index, faiss.IndexBinaryFlat) else (
                    faiss.downcast_IndexBinary(self.index.storage) if hasattr(self.index, "storage") else None)
                self._codes = (faiss.vector_to_array(flat.xb).reshape(-1, self.index.d // 8)
                               if isinstance(flat, faiss.IndexBinaryFlat) else False)
            if self._codes is not False:
                codes = self._codes[keys]
            else:
                codes = np.stack([self.index.reconstruct(int(i)) for i in keys]) if len(keys) else \
                    np.zeros((0, self.index.d // 8), dtype=np.uint8)
            return quantize.sign_vectors(codes)
        x = self.index.reconstruct_batch(keys) if len(keys) else np.zeros((0, self.index.d), dtype=np.float32)
        return quantize.unit_rows(x)

    def _rescore(self, q: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        docs = self.stored(np.where(labels >= 0, labels, 0).ravel().astype(np.int64)).reshape(*labels.shape, -1)
        scores = np.einsum("ij,ikj->ik", q, docs)
        scores[labels < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(labels, order, axis=1)


def load_index(path: str | Path, *, ef_search: int | None = None, nprobe: int | None = None,
               rerank: int | None = None, rescore: int | None = None) -> LoadedIndex:
    """Open an index written by ``build_index``; search-time knobs default to the JSON's values."""
    path = Path(path)
    ids_path, json_path = sidecars(path)
    for p in (path, ids_path, json_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (an index is the .faiss file plus .ids.parquet and .json)")
    params = json.loads(json_path.read_text())
    binary = params.get("dtype") == "binary"
    ondisk = bool(params.get("ondisk"))  # an IVF-PQ built on Ray (index/ray/): lists memory-mapped from .ivfdata
    # IO_FLAG_ONDISK_SAME_DIR only where the output moved since the build (FAISS prints a line when it re-points)
    moved = ondisk and params.get("ondisk_path") != str((path.parent / params["ondisk"]).resolve())
    index = faiss.read_index_binary(str(path)) if binary else \
        faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR if moved else 0)
    ids = np.array(pq.read_table(ids_path, columns=["id"]).column("id").to_pylist(), dtype=object)
    present = int(sum(i is not None for i in ids)) if ondisk else len(ids)  # ondisk: indexed by label, holes null
    if present != index.ntotal:
        raise IndexBuildError(f"{ids_path}: {present} ids for {index.ntotal} vectors in {path}")
    vectors = None
    if params["kind"] == "hnsw":
        index.hnsw.efSearch = ef_search or params["efSearch"]
    elif params["kind"] == "ivfpq" and params.get("vectors"):  # the Ray engine: the re-ranking rows, memory-mapped
        vectors = _vectors(path.parent / params["vectors"], params.get("labels") or index.ntotal, index.d)
    elif params["kind"] == "ivf":  # a quantised output's IVF (no PQ): reconstructing for rescoring needs the map
        (index if binary else faiss.extract_index_ivf(index)).make_direct_map()
    if rescore is not None:
        params = {**params, "rescore": rescore}
    loaded = LoadedIndex(index=index, ids=ids, params=params, vectors=vectors)
    loaded.set_search(nprobe=nprobe, rerank=rerank)
    return loaded


def _vectors(path: Path, labels: int, dim: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the Ray engine's index keeps its vectors there for re-ranking; "
                                f"rebuild with `strata index --engine ray`)")
    size = path.stat().st_size
    if size != max(labels, 1) * dim * 4:
        raise IndexBuildError(f"{path}: {size} bytes, expected {max(labels, 1)} x {dim} float32 rows")
    return np.memmap(path, dtype=np.float32, mode="r", shape=(max(labels, 1), dim))


def recall_at_k(approx_ids: Sequence[Sequence], exact_ids: Sequence[Sequence], k: int) -> float:
    """Mean share of each query's exact top-k that the approximate top-k also found (ANN recall)."""
    if len(approx_ids) != len(exact_ids) or not len(exact_ids):
        raise ValueError(f"need the same, non-zero number of queries: {len(approx_ids)} vs {len(exact_ids)}")
    shares = []
    for approx, exact in zip(approx_ids, exact_ids):
        truth = {i for i in list(exact)[:k] if i is not None}
        found = {i for i in list(approx)[:k] if i is not None}
        shares.append(len(truth & found) / len(truth) if truth else 1.0)
    return float(np.mean(shares))

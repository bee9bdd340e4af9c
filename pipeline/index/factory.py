"""The FAISS factory: a new, trained, empty index of a kind and dtype, and the parameters to record.

Every index searches by cosine similarity: vectors are L2-normalised and compared by inner
product, both when added and when queried, so scores are cosines whatever the index kind.
``ivfpq`` wraps the IVF-PQ in FAISS ``IndexRefineFlat``, which re-scores ``rerank`` x k
candidates exactly and restores most of the recall PQ loses (at the cost of keeping the full
vectors on disk next to the codes); the Ray engine builds the same IVF-PQ (same options, same
training sample and k-means seed) and re-ranks the same way from its memory-mapped vectors
(``ray/merge.py``).

Quantised outputs (``--dtype int8|binary``, ``pipeline/quantize.py``) keep their compression in
the index:

- int8: a FAISS ``QT_8bit`` scalar quantiser given the output's own ranges (``flat``:
  ``IndexScalarQuantizer``, ``hnsw``: ``IndexHNSWSQ``, ``ivfpq``: ``IndexIVFScalarQuantizer``,
  no PQ on top). It stores the output's codes unchanged, 1 byte per dimension, and decodes them
  to the same bucket centres as ``quantize.dequantize_int8``; queries stay float (L2-normalised)
  and are scored by inner product against the decoded documents, which are unit vectors up to
  the quantisation error, so scores are (nearly) cosines. ``QT_8bit_direct_signed`` would store
  the same bytes but decode them to the bare codes: fine for a flat scan with rescaled queries,
  but an HNSW graph or IVF lists would then be built in the codes' distorted geometry.
- binary: ``IndexBinaryFlat`` / ``IndexBinaryHNSW`` / ``IndexBinaryIVF`` by Hamming distance;
  queries are binarised (``x > 0``); scores are ``1 - 2 * hamming / dim`` (the cosine of sign vectors).
"""

from __future__ import annotations

import faiss
import numpy as np

from .. import quantize
from .params import ivf_options, ivfpq_options


def sq_trained(ranges) -> np.ndarray:
    """FAISS ``QT_8bit`` parameters (vmin, then vdiff per dimension) that code exactly as ``quantize.quantize_int8``."""
    r = np.asarray(ranges, dtype=np.float32)
    diff = r[1] - r[0]
    diff = np.where(diff == 0, np.float32(quantize.LEVELS * quantize.ZERO_STEP), diff)  # quantize's step there
    return np.concatenate([r[0], diff]).astype(np.float32)


def _set_sq(index, ranges) -> None:
    faiss.copy_array_to_vector(sq_trained(ranges), index.sq.trained)
    index.is_trained = True


def ivfpq(dim: int, opts: dict, seed: int | None = None) -> faiss.IndexIVFPQ:
    """An untrained inner-product IVF-PQ of ``ivfpq_options``; ``seed`` seeds both k-means (else FAISS's)."""
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, opts["nlist"], opts["m"], opts["nbits"],
                             faiss.METRIC_INNER_PRODUCT)
    if seed is not None:
        index.cp.seed = seed
        index.pq.cp.seed = seed
    return index


def make_index(kind: str, dim: int, rows: int, dtype: str, ranges, sample, *, hnsw_m: int, ef_construction: int,
               ef_search: int, nlist: int | None, m: int | None, nbits: int, nprobe: int | None, rerank: int,
               train_rows: int | None, seed: int | None = None) -> tuple[object, dict]:
    """A new, trained, empty FAISS index of a kind (not ``auto``) and dtype, and the parameters to record.

    ``sample(n)`` returns n training rows (normalised floats, or a quantised column's stored values).
    """
    params: dict = {}
    if kind == "hnsw":
        params.update(hnsw_M=hnsw_m, efConstruction=ef_construction, efSearch=ef_search)
    if dtype in ("binary", "int8") and kind == "ivfpq":  # an IVF of the output's own codes, no PQ on top
        opts = ivf_options(rows, nlist=nlist, nprobe=nprobe, train_rows=train_rows)
        if dtype == "binary":
            index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(dim), dim, opts["nlist"])
            index.train(sample(opts["train_rows"]))
        else:
            index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, opts["nlist"],
                                                  faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False)
            index.train(quantize.dequantize_int8(sample(opts["train_rows"]), ranges))  # the lists; the codes'
            _set_sq(index, ranges)  # ranges are ours
        index.nprobe = opts["nprobe"]
        return index, dict(params, kind="ivf", **opts)
    if dtype == "binary":
        if kind == "flat":
            return faiss.IndexBinaryFlat(dim), params
        index = faiss.IndexBinaryHNSW(dim, hnsw_m)
        index.hnsw.efConstruction, index.hnsw.efSearch = ef_construction, ef_search
        return index, params
    if dtype == "int8":
        qt = faiss.ScalarQuantizer.QT_8bit
        if kind == "flat":
            index = faiss.IndexScalarQuantizer(dim, qt, faiss.METRIC_INNER_PRODUCT)
            _set_sq(index, ranges)
            return index, params
        index = faiss.IndexHNSWSQ(dim, qt, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        _set_sq(faiss.downcast_index(index.storage), ranges)
        index.is_trained = True
        index.hnsw.efConstruction, index.hnsw.efSearch = ef_construction, ef_search
        return index, params
    if kind == "flat":
        return faiss.IndexFlatIP(dim), params
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = ef_construction, ef_search
        return index, params
    opts = ivfpq_options(rows, dim, nlist=nlist, m=m, nbits=nbits, nprobe=nprobe, train_rows=train_rows)
    pq_index = ivfpq(dim, opts, seed)
    pq_index.nprobe = opts["nprobe"]
    index = faiss.IndexRefineFlat(pq_index)
    index.k_factor = float(rerank)
    index.train(sample(opts["train_rows"]))
    return index, dict(params, **opts, rerank=rerank)


def add_vectors(index, dtype: str, ranges, x: np.ndarray) -> None:
    """Add a chunk: normalised floats and packed bits as they are; int8 codes as their bucket centres,
    which the index's ``QT_8bit`` quantiser codes back to the same bytes."""
    index.add(quantize.dequantize_int8(x, ranges) if dtype == "int8" else x)

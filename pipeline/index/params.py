"""Index parameters, for both engines: the kind by size, IVF and IVF-PQ options, search defaults.

Choosing a kind (``kind="auto"``) follows the FAISS wiki page "Guidelines to choose an index"
(github.com/facebookresearch/faiss/wiki/Guidelines-to-choose-an-index):

- below 100k vectors: ``flat`` — exact search, and brute force is fast at that size;
- up to 1M vectors: ``hnsw`` (HNSW32) — the wiki's choice when memory is not the issue;
  it keeps the full vectors and answers in well under a millisecond;
- above 1M vectors: ``ivfpq`` — the wiki's route when memory matters: IVF with K = 4*sqrt(N)
  lists (its range is 4..16*sqrt(N), trained on 30..256*K vectors) and PQ codes of one
  byte per 4 dimensions (its preferred D = 4*M).

The 100k and 1M thresholds are this project's reading of the wiki, not numbers it states.

IVF training: ``64 * max(nlist, 2**nbits)`` rows (at most ``TRAIN_MAX_ROWS``), inside the wiki's
30..256 x nlist range and ~64 points per PQ centroid; a PQ codebook of ``2**nbits`` centroids
needs ~39 points each (FAISS's warning threshold), so ``nbits`` shrinks for small sets. The local
engine trains on as little as one vector per list (FAISS then warns); the Ray engine refuses fewer
than 39 per list (``per_list``), since a distributed build is for large outputs.

Search defaults, measured (``python studies/index_recall.py``; docs/indexes.md has the curves and
their commits): ``rerank`` 8 and ``nprobe`` ``max(64, nlist // 16)`` (at most nlist). On SciFact
(nlist 132) all-MiniLM-L6-v2 ``L6.mean`` needs nprobe 64 to come within 1.0 nDCG@10 of exact search
(32 keeps recall@10 0.97 but loses 1.2 points) and SmolLM2 ``L1.mean`` reaches 0.99 there; on 1M
synthetic clustered vectors (nlist 4000) re-ranking is what PQ needs (rerank 4: 0.89, 8: 0.97).
The ``nlist // 16`` share above the floor is the earlier rule, kept: no real corpus of that size was
measured here; ``strata index --target-recall`` measures a corpus's own.
"""

from __future__ import annotations

import math

import faiss

from .. import quantize
from .layout import IndexBuildError

KINDS = ("auto", "flat", "hnsw", "ivfpq")
FLAT_MAX_ROWS = 100_000
HNSW_MAX_ROWS = 1_000_000
MIN_POINTS_PER_CENTROID = 39  # FAISS k-means warns below this many training points per centroid
TRAIN_MAX_ROWS = 500_000
# build options and their defaults (``build.build_index``, ``build.memory_index``; nbits also for Ray)
NPROBE_FLOOR = 64  # lists searched at the least (module doc: measured)
RERANK = 8  # ivfpq: exact re-ranking of RERANK x k candidates (module doc: measured)
DEFAULTS = dict(hnsw_m=32, ef_construction=200, ef_search=128, nlist=None, m=None, nbits=8, nprobe=None, rerank=RERANK,
                train_rows=None)


def choose_kind(rows: int) -> str:
    return "flat" if rows < FLAT_MAX_ROWS else "hnsw" if rows <= HNSW_MAX_ROWS else "ivfpq"


def pq_m(dim: int) -> int:
    """Sub-quantizers: the largest divisor of dim giving at least 4 dims each (the wiki's D = 4*M)."""
    return max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)


def default_nlist(rows: int) -> int:
    """4*sqrt(N) lists, but no more than leave 39 vectors per list."""
    return max(1, min(int(4 * math.sqrt(rows)), rows // MIN_POINTS_PER_CENTROID))


def _nlist(rows: int, nlist: int | None, per_list: int) -> int:
    nlist = nlist or default_nlist(rows)
    if per_list > 1 and rows < per_list * nlist:
        raise IndexBuildError(f"{rows:,} vectors are too few to train nlist={nlist} lists: FAISS needs at least "
                              f"{per_list} per list, {per_list * nlist:,} in all (pass a smaller nlist, at most "
                              f"{max(1, rows // per_list)})")
    return nlist


def _train_rows(rows: int, nlist: int, train_rows: int | None, codebook: int, per_list: int) -> int:
    n_train = min(rows, train_rows or min(64 * max(nlist, codebook), TRAIN_MAX_ROWS))
    if n_train < per_list * nlist:
        if per_list == 1:
            raise IndexBuildError(f"{n_train} training vectors for nlist={nlist}: need at least one per list")
        raise IndexBuildError(f"train_rows={n_train:,} is too few for nlist={nlist}: at least "
                              f"{per_list * nlist:,} ({per_list} per list)")
    return n_train


def _nprobe(nlist: int, nprobe: int | None) -> int:
    return min(nlist, nprobe or max(NPROBE_FLOOR, nlist // 16))


def ivf_options(rows: int, *, nlist: int | None = None, nprobe: int | None = None,
                train_rows: int | None = None) -> dict:
    """A quantised output's IVF (no PQ: int8 scalar codes or binary codes): nlist, nprobe, train_rows."""
    nlist = _nlist(rows, nlist, 1)
    n_train = _train_rows(rows, nlist, train_rows, 0, 1)
    return {"nlist": nlist, "nprobe": _nprobe(nlist, nprobe), "train_rows": n_train}


def ivfpq_options(rows: int, dim: int, *, nlist: int | None = None, m: int | None = None, nbits: int = 8,
                  nprobe: int | None = None, train_rows: int | None = None, per_list: int = 1) -> dict:
    """Concrete IVF-PQ parameters for ``rows`` vectors of ``dim`` (module doc), or an error naming the
    minimum; ``per_list``: the fewest training vectors per list accepted."""
    nlist = _nlist(rows, nlist, per_list)
    m = m or pq_m(dim)
    if dim % m:
        raise IndexBuildError(f"PQ m={m} must divide the dim {dim}")
    n_train = _train_rows(rows, nlist, train_rows, 2 ** nbits, per_list)
    nbits = max(1, min(nbits, int(math.log2(max(2, n_train // MIN_POINTS_PER_CENTROID)))))
    return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": _nprobe(nlist, nprobe), "train_rows": n_train}


def base_params(kind: str, dtype: str, rows: int, dim: int, rescore: int) -> dict:
    """The JSON written beside an index: every parameter named, those its kind does not use null."""
    quantized = quantize.is_quantized(dtype)
    return {"kind": kind, "metric": "hamming" if dtype == "binary" else "cosine", "dtype": dtype, "rows": rows,
            "dim": dim, "hnsw_M": None, "efConstruction": None, "efSearch": None, "nlist": None, "m": None,
            "nbits": None, "nprobe": None, "rerank": None, "train_rows": None,
            "rescore": int(rescore) if quantized else None, "faiss_version": faiss.__version__}

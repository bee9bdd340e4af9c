"""``strata index --target-recall R``: the cheapest IVF-PQ search settings that keep recall@k >= R,
measured on the index's own vectors, recorded in its JSON.

Queries are a seeded sample of the indexed vectors themselves (``queries`` of them): their exact
neighbours come from a brute-force scan of every indexed vector, and each query's own label is
left out of both lists (a vector always finds itself). Every ``nprobe`` (powers of two up to
``nlist``) x ``rerank`` (``RERANKS``) pair is searched; the chosen one reaches the target at the
lowest cost, counted as the work a search does: the PQ codes scanned (``nprobe / nlist`` of the
rows, ``m`` table look-ups each) plus the exact re-ranking (``k x rerank`` dot products of ``dim``).
The count is the machine's work, not a timing, so the choice does not move with the load of the
machine it is made on. If no pair reaches the target (even every list searched), the best one
found is recorded with a warning: a flat or HNSW index is then the tool.

The index's JSON then records ``nprobe`` and ``rerank`` (the defaults its searches use) and
``tuned``: the target, the measured recall, the sample size and k. Both engines' IVF-PQ indexes are
tuned the same way (the local engine's vectors come from its ``IndexRefineFlat``, the Ray engine's
from its memory-mapped ``.f32`` file).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import faiss
import numpy as np

from .layout import IndexBuildError, sidecars
from .loaded import LoadedIndex, load_index

log = logging.getLogger(__name__)

RERANKS = (1, 2, 4, 8, 16)
QUERIES = 200
K = 10
CHUNK = 65536


def _vectors(ix: LoadedIndex) -> tuple[np.ndarray | faiss.Index, np.ndarray]:
    """(the indexed vectors, row-addressable, and the labels present)."""
    if ix.vectors is not None:
        present = np.array([i for i, v in enumerate(ix.ids) if v is not None], dtype=np.int64)
        return ix.vectors, present
    refine = faiss.downcast_index(ix.index.refine_index)
    return refine, np.arange(ix.index.ntotal, dtype=np.int64)


def _rows(store, labels: np.ndarray) -> np.ndarray:
    if isinstance(store, np.ndarray):
        return np.asarray(store[labels], dtype=np.float32)
    return store.reconstruct_batch(labels)


def exact_neighbours(store, present: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Labels of each query's exact top ``k`` by inner product, streamed over the vectors in chunks."""
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_l = np.full((len(q), k), -1, dtype=np.int64)
    for lo in range(0, len(present), CHUNK):
        labels = present[lo:lo + CHUNK]
        s = q @ _rows(store, labels).T
        s_all = np.concatenate([best_s, s], axis=1)
        l_all = np.concatenate([best_l, np.broadcast_to(labels, s.shape)], axis=1)
        top = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s, best_l = np.take_along_axis(s_all, top, 1), np.take_along_axis(l_all, top, 1)
    return best_l


def _recall(found: np.ndarray, truth: np.ndarray, own: np.ndarray, k: int) -> float:
    shares = []
    for f, t, o in zip(found, truth, own):
        want = [x for x in t if x != o and x >= 0][:k]
        got = set([x for x in f if x != o and x >= 0][:k])
        shares.append(len(got & set(want)) / len(want) if want else 1.0)
    return float(np.mean(shares))


def measure(ix: LoadedIndex, *, queries: int = QUERIES, k: int = K, seed: int = 0) -> dict:
    """Recall@k of every (nprobe, rerank) pair on a sample of the index's own vectors, with its cost."""
    p = ix.params
    if p.get("kind") != "ivfpq" or (p.get("dtype") or "float32") != "float32":
        raise IndexBuildError(f"--target-recall tunes float IVF-PQ indexes (this one is {p.get('kind')}, "
                              f"{p.get('dtype') or 'float32'})")
    store, present = _vectors(ix)
    n = min(queries, len(present))
    own = np.sort(np.random.default_rng(seed).choice(present, size=n, replace=False))
    q = _rows(store, own)
    truth = exact_neighbours(store, present, q, k + 1)
    nlist, m, dim = int(p["nlist"]), int(p["m"]), int(p["dim"])
    ivf = faiss.extract_index_ivf(ix.index)
    grid = []
    nprobe = 1
    while True:
        ivf.nprobe = min(nprobe, nlist)
        for rerank in RERANKS:
            fetch = min((k + 1) * rerank, ix.index.ntotal)
            if ix.vectors is None:
                ix.index.k_factor = float(rerank)
                _, found = ix.index.search(q, k + 1)
            else:
                _, cand = ix.index.search(q, fetch)
                found = _refined(store, q, cand, k + 1)
            cost = ivf.nprobe / nlist * len(present) * m + k * rerank * dim
            grid.append({"nprobe": ivf.nprobe, "rerank": rerank, "recall": _recall(found, truth, own, k),
                         "cost": round(cost)})
        if nprobe >= nlist:
            break
        nprobe *= 2
    return {"queries": n, "k": k, "grid": grid}


def _refined(store, q: np.ndarray, cand: np.ndarray, k: int) -> np.ndarray:
    docs = _rows(store, np.where(cand >= 0, cand, 0).ravel()).reshape(*cand.shape, -1)
    s = np.einsum("ij,ikj->ik", q, docs)
    s[cand < 0] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand, order, 1)


def choose(grid: list[dict], target: float) -> tuple[dict, bool]:
    """The cheapest pair reaching ``target`` (True), else the best recall found (False)."""
    ok = [g for g in grid if g["recall"] >= target]
    if ok:
        return min(ok, key=lambda g: (g["cost"], -g["recall"])), True
    return max(grid, key=lambda g: (g["recall"], -g["cost"])), False


def tune_loaded(ix: LoadedIndex, target: float, *, queries: int = QUERIES, k: int = K, seed: int = 0,
                name: str = "the index") -> dict:
    """Measure and choose (module doc) for an index in hand, and set its search defaults to the choice;
    returns the ``tuned`` entry (the ``nprobe`` and ``rerank`` chosen among it)."""
    if not 0 < target <= 1:
        raise IndexBuildError(f"--target-recall must be in (0, 1], got {target}")
    result = measure(ix, queries=queries, k=k, seed=seed)
    best, reached = choose(result["grid"], target)
    tuned = {"target_recall": target, "recall": round(best["recall"], 4), "reached": reached,
             "queries": result["queries"], "k": k, "nprobe": best["nprobe"], "rerank": best["rerank"]}
    if not reached:
        log.warning("%s: recall@%d %.3f at best (nprobe %d, rerank %d) is below the target %.3f: recorded; "
                    "a flat or hnsw index reaches it", name, k, best["recall"], best["nprobe"], best["rerank"], target)
    faiss.extract_index_ivf(ix.index).nprobe = best["nprobe"]
    ix.params.update(nprobe=best["nprobe"], rerank=best["rerank"])
    if ix.vectors is None:
        ix.index.k_factor = float(best["rerank"])
    return tuned


def tune_index(path: str | Path, target: float, *, queries: int = QUERIES, k: int = K, seed: int = 0) -> dict:
    """Measure, choose and record (module doc); returns the ``tuned`` entry written to the JSON."""
    path = Path(path)
    tuned = tune_loaded(load_index(path), target, queries=queries, k=k, seed=seed, name=path.name)
    _, json_path = sidecars(path)
    params = json.loads(json_path.read_text())
    params.update(nprobe=tuned["nprobe"], rerank=tuned["rerank"], tuned=tuned)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp, json_path)
    return tuned


def describe_tuned(params: dict) -> str | None:
    """One line for ``strata search`` and ``eval --index``: the recall the index's settings were measured at."""
    t = params.get("tuned")
    if not t:
        return None
    line = (f"recall@{t['k']} {t['recall']:.3f} measured at build on {t['queries']} of its own vectors "
            f"(target {t['target_recall']}{'' if t['reached'] else ', not reached'}; nprobe {t['nprobe']}, "
            f"rerank {t['rerank']})")
    if (params.get("nprobe"), params.get("rerank")) != (t["nprobe"], t["rerank"]):
        line += f"; this search used nprobe {params.get('nprobe')}, rerank {params.get('rerank')}: not measured"
    return line

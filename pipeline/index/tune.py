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

import numpy as np

from .layout import IndexBuildError, sidecars
from .loaded import LoadedIndex, load_index, recall_at_k

log = logging.getLogger(__name__)

RERANKS = (1, 2, 4, 8, 16)
QUERIES = 200
K = 10
CHUNK = 65536


def exact_neighbours(ix: LoadedIndex, present: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Labels of each query's exact top ``k`` by inner product, streamed over the vectors in chunks."""
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_l = np.full((len(q), k), -1, dtype=np.int64)
    for lo in range(0, len(present), CHUNK):
        labels = present[lo:lo + CHUNK]
        s = q @ ix.stored(labels).T
        s_all = np.concatenate([best_s, s], axis=1)
        l_all = np.concatenate([best_l, np.broadcast_to(labels, s.shape)], axis=1)
        top = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s, best_l = np.take_along_axis(s_all, top, 1), np.take_along_axis(l_all, top, 1)
    return best_l


def measure(ix: LoadedIndex, *, queries: int = QUERIES, k: int = K, seed: int = 0) -> dict:
    """Recall@k of every (nprobe, rerank) pair on a sample of the index's own vectors, with its cost;
    each pair searched as ``strata search`` would (``LoadedIndex.set_search``, then ``search``)."""
    p = ix.params
    if p.get("kind") != "ivfpq" or (p.get("dtype") or "float32") != "float32":
        raise IndexBuildError(f"--target-recall tunes float IVF-PQ indexes (this one is {p.get('kind')}, "
                              f"{p.get('dtype') or 'float32'})")
    present = np.array([i for i, v in enumerate(ix.ids) if v is not None], dtype=np.int64)  # Ray: holes
    n = min(queries, len(present))
    own = np.sort(np.random.default_rng(seed).choice(present, size=n, replace=False))
    q = ix.stored(own)
    mine = ix.ids[own]
    # a vector always finds itself: its own id is left out of both lists
    truth = [[i for i in ix.ids[row] if i != me][:k] for row, me in zip(exact_neighbours(ix, present, q, k + 1), mine)]
    nlist, m, dim = int(p["nlist"]), int(p["m"]), int(p["dim"])
    grid = []
    for nprobe in sorted({min(2 ** e, nlist) for e in range(nlist.bit_length() + 1)}):
        for rerank in RERANKS:
            ix.set_search(nprobe=nprobe, rerank=rerank)
            found = [[i for i in row if i != me][:k] for row, me in zip(ix.search(q, k + 1)[1], mine)]
            cost = nprobe / nlist * len(present) * m + k * rerank * dim
            grid.append({"nprobe": nprobe, "rerank": rerank, "recall": recall_at_k(found, truth, k),
                         "cost": round(cost)})
    return {"queries": n, "k": k, "grid": grid}


def choose(grid: list[dict], target: float) -> tuple[dict, bool]:
    """The cheapest pair reaching ``target`` (True), else the best recall found (False)."""
    ok = [g for g in grid if g["recall"] >= target]
    if ok:
        return min(ok, key=lambda g: (g["cost"], -g["recall"])), True
    return max(grid, key=lambda g: (g["recall"], -g["cost"])), False


def tune_loaded(ix: LoadedIndex, target: float, *, queries: int = QUERIES, k: int = K, seed: int = 0,
                name: str = "the index") -> dict:
    """Measure and choose (module doc) for an index in hand: its search settings become the choice and
    its ``params`` gain ``tuned``; returns the ``tuned`` entry."""
    if not 0 < target <= 1:
        raise IndexBuildError(f"--target-recall must be in (0, 1], got {target}")
    result = measure(ix, queries=queries, k=k, seed=seed)
    best, reached = choose(result["grid"], target)
    tuned = {"target_recall": target, "recall": round(best["recall"], 4), "reached": reached,
             "queries": result["queries"], "k": k, "nprobe": best["nprobe"], "rerank": best["rerank"]}
    if not reached:
        log.warning("%s: recall@%d %.3f at best (nprobe %d, rerank %d) is below the target %.3f: recorded; "
                    "a flat or hnsw index reaches it", name, k, best["recall"], best["nprobe"], best["rerank"], target)
    ix.set_search(nprobe=best["nprobe"], rerank=best["rerank"])
    ix.params = {**ix.params, "tuned": tuned}
    return tuned


def tune_index(path: str | Path, target: float, *, queries: int = QUERIES, k: int = K, seed: int = 0) -> dict:
    """Measure, choose and record (module doc); returns the parameters written to the index's JSON."""
    path = Path(path)
    ix = load_index(path)
    tune_loaded(ix, target, queries=queries, k=k, seed=seed, name=path.name)
    _, json_path = sidecars(path)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(ix.params, indent=2) + "\n")
    os.replace(tmp, json_path)
    return ix.params


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

"""Cross-fitting: items dealt into folds by group; each fold scored by pieces fitted on the others."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def fold_ids(groups: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold of every item: whole groups are dealt round-robin in a seeded order, largest first,
    so folds are balanced and items of one group never straddle two folds.

    (scikit-learn's ``GroupKFold`` deals groups in another order, so its folds, and with them every
    cross-fitted score recorded so far, would differ.)"""
    groups = np.asarray(groups)
    uniq, sizes = np.unique(groups, return_counts=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(uniq))
    order = perm[np.argsort(-sizes[perm], kind="stable")]
    load = np.zeros(k, dtype=np.int64)
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    for g in order:
        f = int(np.argmin(load))
        fold_of_group[g] = f
        load[f] += sizes[g]
    return fold_of_group[np.searchsorted(uniq, groups)]


@dataclass
class Fit:
    """One cross-fitting step: pieces fitted on ``fitted`` items scored the ``scored`` items."""

    fold: int
    fitted: np.ndarray
    scored: np.ndarray


def crossfit(n: int, folds: np.ndarray, fit_and_score: Callable[[np.ndarray, np.ndarray], np.ndarray],
             log: list[Fit] | None = None) -> np.ndarray:
    """Per-item predictions where item i's comes from ``fit_and_score(train, test)`` with i in
    ``test`` and never in ``train``."""
    out = np.full(n, np.nan)
    for k in np.unique(folds):
        test = np.flatnonzero(folds == k)
        train = np.flatnonzero(folds != k)
        out[test] = fit_and_score(train, test)
        if log is not None:
            log.append(Fit(int(k), train, test))
    return out

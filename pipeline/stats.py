"""Bootstrap statistics over labelled items: intervals for every score, paired comparisons.

A score is an aggregate over labelled items: Spearman over STS pairs, the mean of per-query
nDCG@10 over retrieval queries. The bootstrap resamples those items with replacement
(``resample_counts``: one row of multiplicities per resample, shared by every variant, so
comparisons between variants are paired) and recomputes the score on each resample.

For STS the resampled Spearman is computed exactly as ``scipy.stats.spearmanr`` would on the
resampled pairs (average ranks for ties, including the ties the duplicates make) but without
sorting per resample: the order of the values is fixed, so an item's average rank in a resample
is the weight below its tie group plus half the weight of its group (``weighted_ranks``).
"""

from __future__ import annotations

import numpy as np

LEVEL = 0.95
RESAMPLES = 1000


def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) multiplicities of a bootstrap resample of n items; each row sums to n."""
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 items, got {n}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def group_counts(groups: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) multiplicities of a cluster bootstrap: the groups (items sharing a text: STS pairs with
    a sentence in common, queries with one text) are resampled, and each item takes its group's count, so
    dependent items move together and the intervals are not too narrow. One item per group is the plain
    bootstrap of ``resample_counts``."""
    _, which = np.unique(np.asarray(groups), return_inverse=True)
    return resample_counts(int(which.max()) + 1, resamples, seed)[:, which]


def weighted_ranks(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per resample (row of ``counts``), each item's average rank (1-based) in the resampled multiset."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    new_group = np.r_[True, sorted_vals[1:] != sorted_vals[:-1]]
    group = np.cumsum(new_group) - 1  # tie-group id of each sorted position
    ends = np.r_[np.flatnonzero(new_group)[1:] - 1, len(values) - 1]
    cum = np.cumsum(counts[:, order], axis=1)[:, ends]  # weight up to the end of each group
    below = np.concatenate([np.zeros((len(counts), 1)), cum[:, :-1]], axis=1)
    rank_of_group = below + (cum - below + 1.0) / 2.0
    out = np.empty_like(counts)
    out[:, order] = rank_of_group[:, group]
    return out


class StsBootstrap:
    """Resampled Spearman (x100) of per-pair similarities against fixed gold scores."""

    def __init__(self, gold: np.ndarray, counts: np.ndarray):
        self.counts = counts
        self.total = counts.sum(axis=1)
        ry = weighted_ranks(np.asarray(gold, dtype=np.float64), counts)
        my = (counts * ry).sum(1, keepdims=True) / self.total[:, None]
        self.w_dy = counts * (ry - my)  # the gold side is the same for every variant
        self.ss_y = (self.w_dy * (ry - my)).sum(1)

    def __call__(self, sims: np.ndarray) -> np.ndarray:
        rx = weighted_ranks(sims, self.counts)
        cov = (self.w_dy * rx).sum(1)  # sum w (rx - mx)(ry - my) = sum w rx (ry - my)
        mx = (self.counts * rx).sum(1) / self.total
        ss_x = (self.counts * rx * rx).sum(1) - self.total * mx * mx
        den = np.sqrt(np.maximum(ss_x, 0) * self.ss_y)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, 100.0 * cov / np.where(den > 0, den, 1.0), np.nan)


def mean_bootstrap(per_item: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Resampled means of per-item scores (retrieval: per-query nDCG@10, already x100)."""
    return counts @ np.asarray(per_item, dtype=np.float64) / counts.sum(axis=1)


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap samples."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if not len(s):
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(s, [a, 1.0 - a])
    return float(lo), float(hi)


def paired(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> dict:
    """a - b over the same resamples: the difference's interval, and whether it excludes 0."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = interval(d, level)
    finite = d[np.isfinite(d)]
    # two-sided bootstrap p-value: how often the resampled difference falls on the other side of 0
    p = float(min(1.0, 2.0 * min((finite <= 0).mean(), (finite >= 0).mean()))) if len(finite) else float("nan")
    return {"diff_low": lo, "diff_high": hi, "p": p, "significant": bool(lo > 0 or hi < 0)}


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]

"""Label-free signals of an embedding, computed on unlabelled texts.

Each is a candidate predictor of which layer embeds best, to be checked against labelled scores
(``strata probe`` measures their rank correlation with the labelled score across the grid):

- ``anisotropy``: mean pairwise cosine similarity (Ethayarajh 2019). High values mean every
  vector points the same way; lower is usually read as better.
- ``entropy``: matrix entropy of the trace-normalised Gram matrix of the unit vectors, divided by
  log(rank bound) so it lies in [0, 1] (Skean et al. 2025, "Layer by Layer": the Shannon case of
  their alpha-entropy). High means information spread over many directions.
- ``uniformity``: log E exp(-2 ||x - y||^2) over pairs of unit vectors (Wang & Isola 2020); more
  negative means more uniform on the sphere.

All three see only the vectors: no labels, no pairs.
"""

from __future__ import annotations

import numpy as np

from .norms import l2_normalize

SIGNALS = ("anisotropy", "entropy", "uniformity")
# The sign under which a signal is expected to agree with quality (higher = better after it).
EXPECTED_SIGN = {"anisotropy": -1.0, "entropy": 1.0, "uniformity": -1.0}


def anisotropy(x: np.ndarray) -> float:
    """Mean cosine over distinct pairs: (||sum z||^2 - n) / (n (n - 1)) for unit rows z."""
    z = l2_normalize(x, np.float64)
    n = len(z)
    s = z.sum(axis=0)
    return float((s @ s - n) / (n * (n - 1)))


def entropy(x: np.ndarray) -> float:
    """Shannon entropy of the eigenvalues of Z Z^T / n (trace 1), over log(min(n, d))."""
    z = l2_normalize(x, np.float64)
    n, d = z.shape
    gram = z.T @ z if d < n else z @ z.T  # same nonzero spectrum
    lam = np.clip(np.linalg.eigvalsh(gram), 0.0, None)
    p = lam / lam.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(min(n, d)))


def uniformity(x: np.ndarray) -> float:
    """log of the mean of exp(-2 ||z_i - z_j||^2) over distinct pairs (||z_i - z_j||^2 = 2 - 2 cos)."""
    z = l2_normalize(x, np.float64)
    n = len(z)
    cos = z @ z.T
    e = np.exp(-2.0 * (2.0 - 2.0 * cos))
    return float(np.log((e.sum() - np.trace(e)) / (n * (n - 1))))


def signals(x: np.ndarray) -> dict[str, float]:
    if len(x) < 3:
        raise ValueError(f"label-free signals need at least 3 texts, got {len(x)}")
    return {"anisotropy": anisotropy(x), "entropy": entropy(x), "uniformity": uniformity(x)}

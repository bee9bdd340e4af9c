"""L2 normalisation of numpy vectors: the one numpy copy (torch code uses ``torch.nn.functional.normalize``,
which has the same 1e-12 floor)."""

from __future__ import annotations

import numpy as np


def l2_normalize(x, dtype=np.float32) -> np.ndarray:
    """Rows (the last axis) of unit length, as ``dtype``; a zero row stays zero (cosine 0 with
    everything, as in scikit-learn): the norm is floored at 1e-12."""
    x = np.asarray(x, dtype=dtype)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

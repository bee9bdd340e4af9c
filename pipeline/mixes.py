"""Layer mixes: a weighted sum of per-layer pooled vectors, each L2-normalised first.

Per-layer norms differ by up to 100x (the first-token massive activation grows through the
middle layers), so a plain sum would be one layer; normalising first lets each layer count by
its weight. Mixes are computed from stored per-layer vectors (no new forward pass):

- uniform: equal weights over a layer range (``8:16``, or ``all``);
- learned: softmax-normalised scalar weights, one per layer (ELMo's scalar mix,
  sentence-transformers' ``WeightedLayerPooling``), fitted on a labelled TRAINING split:
  STS pairs with a cosine-regression loss (sentence-transformers' ``CosineSimilarityLoss``:
  MSE between cosine and the gold score scaled to [0, 1]), or retrieval training qrels with an
  in-batch contrastive loss (``MultipleNegativesRankingLoss``: cross-entropy over scaled
  cosines, the other positives of the batch as negatives). Never fitted on what it is scored on.

A mix is linear in the normalised layer vectors, so for the linear poolings (all but ``max``)
it equals pooling the hidden states mixed with weights w_l / ||pool_l(h)||.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .norms import l2_normalize
from .storage import write_json_atomic

STEPS = 300
LEARNING_RATE = 0.05
CONTRASTIVE_SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default
BATCH = 256


def apply_mix(per_layer: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_l w_l * v_l / ||v_l|| over the layers' (n, d) vectors."""
    if len(per_layer) != len(weights) or not len(weights):
        raise ValueError(f"{len(per_layer)} layer arrays for {len(weights)} weights")
    out = np.zeros_like(np.asarray(per_layer[0], dtype=np.float32))
    for v, w in zip(per_layer, weights):
        out += np.float32(w) * l2_normalize(v)
    return out


@dataclass
class LearnedMix:
    layers: list[int]
    weights: list[float]
    fitted_on: dict = field(default_factory=dict)  # task, data, split, pairs/queries, loss, steps

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        fitted = self.fitted_on
        write_json_atomic(None, path, {**(extra or {}), "layers": self.layers, "weights": self.weights,
                                       "fitted_on": f"{fitted.get('data')}/{fitted.get('split')}, {fitted.get('pairs')} "
                                                    f"labelled pairs ({fitted.get('task')})" if fitted else "",
                                       "fit": fitted})

    @classmethod
    def load(cls, path: str | Path) -> "LearnedMix":
        d = json.loads(Path(path).read_text())
        return cls(list(d["layers"]), list(d["weights"]), d.get("fit", {}))


def _stack(per_layer: Sequence[np.ndarray]):
    import torch

    return torch.from_numpy(np.stack([l2_normalize(v) for v in per_layer]))  # (L, n, d)


def _fit(per_layer: Sequence[np.ndarray], loss, n: int, steps: int, seed: int) -> np.ndarray:
    """Adam on softmax layer logits; ``loss(mixed, batch_rows)`` scores one sampled batch of rows."""
    import torch

    x = _stack(per_layer)
    logits = torch.zeros(x.shape[0], requires_grad=True)
    opt = torch.optim.Adam([logits], lr=LEARNING_RATE)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[:BATCH]
        w = torch.softmax(logits, 0)
        value = loss(lambda rows: torch.einsum("l,lnd->nd", w, x[:, rows]), idx)
        opt.zero_grad()
        value.backward()
        opt.step()
    return torch.softmax(logits, 0).detach().numpy().astype(np.float64)


def fit_sts(per_layer: Sequence[np.ndarray], rows1: np.ndarray, rows2: np.ndarray, gold: np.ndarray, *,
            steps: int = STEPS, seed: int = 0) -> np.ndarray:
    """Softmax layer weights maximising cosine agreement with gold scores on training pairs."""
    import torch

    g = np.asarray(gold, dtype=np.float64)
    target = torch.from_numpy(((g - g.min()) / max(g.max() - g.min(), 1e-12)).astype(np.float32))
    r1, r2 = torch.from_numpy(np.asarray(rows1)), torch.from_numpy(np.asarray(rows2))

    def loss(mixed, idx):
        cos = torch.nn.functional.cosine_similarity(mixed(r1[idx]), mixed(r2[idx]))
        return ((cos - target[idx]) ** 2).mean()

    return _fit(per_layer, loss, len(r1), steps, seed)


def fit_retrieval(per_layer: Sequence[np.ndarray], query_rows: np.ndarray, doc_rows: np.ndarray, *,
                  steps: int = STEPS, seed: int = 0) -> np.ndarray:
    """Softmax layer weights from (query, relevant document) training pairs, in-batch negatives."""
    import torch

    q, d = torch.from_numpy(np.asarray(query_rows)), torch.from_numpy(np.asarray(doc_rows))

    def loss(mixed, idx):
        a = torch.nn.functional.normalize(mixed(q[idx]), dim=-1)
        b = torch.nn.functional.normalize(mixed(d[idx]), dim=-1)
        return torch.nn.functional.cross_entropy(CONTRASTIVE_SCALE * a @ b.T, torch.arange(len(idx)))

    return _fit(per_layer, loss, len(q), steps, seed)

"""The recipe's entries: a chosen variant's sources and its pieces, refitted on the whole sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..derive import learn_mix
from ..mixes import apply_mix
from ..storage import safe_name
from ..transforms import fit as fit_transform
from ..variants import Variant
from .vectors import SampleVectors


def refit(variant: Variant, task, vectors: dict[Variant, np.ndarray], out_dir: Path,
          fit_vectors: dict[Variant, np.ndarray] | None, fit_source: str) -> dict:
    """The recipe entry of a variant: its sources and its pieces refitted on the whole sample."""
    entry = {"variant": variant.name, **variant.row_fields, "sources": [s.name for s in variant.sources]}
    all_items = np.arange(task.n)
    weights = None
    if variant.mix is not None:
        if variant.mix.startswith("learned"):
            w, seen = learn_mix(SampleVectors(task.texts, vectors), variant, task.labels(all_items))
            entry["mix_fitted_on"] = {k: seen[k] for k in ("task", "data", "split", "pairs")}
            weights = w
        else:
            weights = np.full(len(variant.sources), 1.0 / len(variant.sources))
        entry["weights"] = [float(w) for w in weights]
    if variant.transform != "none":
        rows = task.fit_rows(all_items)
        src = fit_vectors if fit_vectors is not None else {v: vectors[v][rows] for v in variant.sources}
        x = apply_mix([src[s] for s in variant.sources], weights) if weights is not None else src[variant.sources[0]]
        t = fit_transform(variant.transform, [x], fitted_on={
            "source": fit_source if fit_vectors is not None else task.fit_label.replace(" of the training folds", "")})
        path = Path("pieces") / safe_name(variant.name)
        t.save(out_dir / path)
        entry["transform_path"] = str(path)
        entry["transform_fitted_on"] = t.fitted_on
    return entry

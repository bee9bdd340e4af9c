"""Every variant's score on the sample, with its bootstrap interval.

Raw cells and uniform mixes (nothing fitted) are scored on every item; learned mixes and
transforms are cross-fitted (``folds.crossfit``); every score gets a 95% bootstrap interval
from resamples shared by all variants, so comparisons are paired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import stats
from ..derive import learn_mix
from ..mixes import apply_mix
from ..transforms import check_fit_size
from ..transforms import fit as fit_transform
from ..variants import SpecError, Variant, mix_variants, parse_mixes
from .defaults import FOLDS, MIN_PER_FOLD, MIXES, TRANSFORMS, ProbeError
from .folds import Fit, crossfit, fold_ids
from .vectors import SampleVectors

SHORTLIST = 8  # transforms are fitted on the best raw cells and on every mix


@dataclass
class Scored:
    variant: Variant
    score: float
    low: float
    high: float
    samples: np.ndarray
    fitted_on: str = ""
    selected_on: str = ""  # a choice made before scoring that saw every item, the scored ones included

    @property
    def depth(self) -> int:
        return self.variant.layer  # a mix's layer is its deepest source (variants.py): where the pass stops

    def row(self) -> dict:
        def num(x):
            return round(float(x), 4) if np.isfinite(x) else None  # undefined: constant similarities

        return {"variant": self.variant.name, **self.variant.row_fields, "score": num(self.score),
                "low": num(self.low), "high": num(self.high), "depth": self.depth,
                "fitted_on": self.fitted_on or "nothing fitted",
                **({"selected_on": self.selected_on} if self.selected_on else {})}


def ranked(scored: list[Scored]) -> list[Scored]:
    """Best first; a variant whose score is undefined (constant vectors: NaN) goes last."""
    return sorted(scored, key=lambda s: (not np.isfinite(s.score), -s.score if np.isfinite(s.score) else 0.0))


def score_variants(task, vectors: dict[Variant, np.ndarray], *, n_layers: int, mixes: str = MIXES,
                   transforms: Sequence[str] = TRANSFORMS, folds: int = FOLDS, resamples: int = stats.RESAMPLES,
                   seed: int = 0, shortlist: int = SHORTLIST, fit_vectors: dict[Variant, np.ndarray] | None = None,
                   fit_source: str = "", log: list[Fit] | None = None, say=print) -> list[Scored]:
    """Every variant's score on ``task``'s items, with its interval (see the module doc).

    ``vectors``: raw vectors of ``task.texts``. ``fit_vectors``: raw vectors of unlabelled texts
    to fit transforms on instead of the training folds' texts (``--corpus``).
    """
    fold = fold_ids(task.groups, folds, seed)
    if hasattr(task, "use_folds"):  # a classifier per fold, fitted on the other folds (classification)
        task.use_folds(fold)
    sizes = np.bincount(fold, minlength=folds)
    if (task.n - sizes.max()) < MIN_PER_FOLD or (sizes == 0).any():
        largest = int(np.bincount(np.unique(task.groups, return_inverse=True)[1]).max())
        raise ProbeError(f"{folds} folds of {task.n} labelled items leave a fold empty or too little to fit on "
                         f"(fold sizes {sizes.tolist()}); items sharing a text stay together and the largest such "
                         f"group has {largest}: use fewer folds or labels whose pairs share fewer sentences")
    counts = stats.group_counts(task.groups, resamples, seed)  # dependent items resampled together
    boot = task.bootstrap(counts)
    all_items = np.arange(task.n)
    out: list[Scored] = []

    def add(v: Variant, per_item: np.ndarray, fitted_on: str = "", selected_on: str = "") -> Scored:
        samples = boot(per_item)
        lo, hi = stats.interval(samples)
        s = Scored(v, task.score(per_item), lo, hi, samples, fitted_on, selected_on)
        out.append(s)
        return s

    raw = [v for v in vectors if v.is_raw]
    for v in raw:
        add(v, task.per_item(vectors[v], all_items))
    say(f"  scored {len(raw)} raw variants")
    by_template: dict[str, list[Variant]] = {}
    for v in raw:
        by_template.setdefault(v.template, []).append(v)
    mix_specs = parse_mixes(mixes, n_layers) if mixes else ()
    if not task.learned_mix:  # no labels a mix could be fitted on (classification, clustering, pairs)
        mix_specs = tuple(m for m in mix_specs if m[0] != "learned")
    top_raw = ranked(out)[0].variant
    enc = SampleVectors(task.texts, vectors)
    learned_weights: dict[tuple[Variant, int], np.ndarray] = {}

    def base_matrix(b: Variant, train: np.ndarray | None) -> np.ndarray:
        if b.mix is None:
            return vectors[b]
        if b.mix.startswith("uniform"):
            return apply_mix([vectors[s] for s in b.sources], np.full(len(b.sources), 1.0 / len(b.sources)))
        key = (b, -1 if train is None else int(fold[np.setdiff1d(all_items, train)[0]]))
        if key not in learned_weights:
            learned_weights[key], _ = learn_mix(enc, b, task.labels(all_items if train is None else train))
        return apply_mix([vectors[s] for s in b.sources], learned_weights[key])

    # uniform mixes for every template and pooling (nothing to fit); learned ones (seconds per fit and
    # fold) for the template and pooling of the best raw cell only
    mixed = [m for t in by_template.values() for m in mix_variants(t, mix_specs)
             if m.mix.startswith("uniform") or (m.template, m.pooling) == (top_raw.template, top_raw.pooling)]
    for b in mixed:
        if b.mix.startswith("uniform"):
            add(b, task.per_item(base_matrix(b, None), all_items))
        else:
            add(b, crossfit(task.n, fold, lambda tr, te: task.per_item(base_matrix(b, tr), te), log),
                f"mix weights cross-fitted: {folds} folds, each fitted on the other folds' labels",
                f"template and pooling those of the best raw cell ({top_raw.name}) on every item, the scored "
                "fold included")
    if mixed:
        say(f"  scored {len(mixed)} layer mixes")
    todo = [t for t in transforms if t != "none"]
    if not todo:
        return out
    dim = next(iter(vectors.values())).shape[1]
    bases = [s.variant for s in ranked(out)[:shortlist]]  # transforms: on the best raw cells and mixes
    n_fit = min(len(task.fit_rows(all_items[fold != k])) for k in range(folds)) if fit_vectors is None else \
        len(next(iter(fit_vectors.values())))
    fittable = []
    for name in todo:
        try:
            check_fit_size(name, n_fit, dim)
            fittable.append(name)
        except SpecError as e:
            say(f"  skipped {name}: {e}")
    shortlisted = (f"its base among the {shortlist} best raw cells and mixes on every item, the scored fold "
                   "included")
    for b in bases:
        for name in fittable:
            v = Variant(b.layer, b.pooling, b.template, b.mix, name)
            if task.unsupervised:  # nothing sees a label: fitted on every text (or --corpus), scored on every item
                x = base_matrix(b, None)
                src = x[task.fit_rows(all_items)] if fit_vectors is None else \
                    apply_mix([fit_vectors[s] for s in b.sources], np.full(len(b.sources), 1.0 / len(b.sources))) \
                    if b.mix is not None else fit_vectors[b]
                t = fit_transform(name, [src])
                add(v, task.per_item(t.apply(x), all_items),
                    f"transform fitted on {task.fit_label if fit_vectors is None else fit_source + ' (no labels)'}",
                    shortlisted)
                continue
            if fit_vectors is not None:
                sample = fit_vectors[b] if b.mix is None else None
                if sample is None:  # a mix of the corpus sample's layers, with this fold's weights
                    def score_fold(tr, te, b=b, name=name):
                        x = base_matrix(b, tr)
                        w = learned_weights.get((b, int(fold[te[0]])))
                        w = w if w is not None else np.full(len(b.sources), 1.0 / len(b.sources))
                        t = fit_transform(name, [apply_mix([fit_vectors[s] for s in b.sources], w)])
                        return task.per_item(t.apply(x), te)
                else:
                    t = fit_transform(name, [sample])

                    def score_fold(tr, te, b=b, t=t):
                        return task.per_item(t.apply(base_matrix(b, tr)), te)
                where = f"transform fitted on {fit_source} (no labels)"
            else:
                def score_fold(tr, te, b=b, name=name):
                    x = base_matrix(b, tr)
                    t = fit_transform(name, [x[task.fit_rows(tr)]])
                    return task.per_item(t.apply(x), te)
                where = f"transform cross-fitted on {task.fit_label}"
            if b.mix and b.mix.startswith("learned"):
                where += "; mix weights cross-fitted on the other folds' labels"
            add(v, crossfit(task.n, fold, score_fold, log), where, shortlisted)
    say(f"  scored transforms {', '.join(fittable)} of the {len(bases)} best bases")
    return out

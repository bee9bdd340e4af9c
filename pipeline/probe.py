"""``strata probe``: choose the embedding on a small labelled sample, with intervals, then commit.

One in-process pass per template over the sample's texts gives every layer x pooling (the
raw cells). From those vectors, with no further forward pass:

- uniform layer mixes (nothing fitted) are scored on every labelled item;
- fitted variants (learned mixes; transforms on a shortlist of bases) are **cross-fitted**: the
  labelled items are split into ``folds`` groups (STS pairs sharing a sentence stay in one
  group); for each group, every fitted piece is fitted on the other groups only and scores this
  one (``crossfit``). Each item's score therefore comes from pieces that never saw it. Learned
  mixes see the training folds' labels; transforms see texts only (STS: the training folds'
  sentences; retrieval: the corpus documents, which carry no labels; ``--corpus``: the user's
  unlabelled sample instead);
- every score gets a bootstrap 95% interval, resampling the labelled items (STS pairs,
  retrieval queries); all variants share the resamples, so comparisons are paired.

The variant with the best score is the **top** one. Variants whose paired difference from it
has an interval containing 0 are **tied** with it; among them the cheapest (the shallowest
layer the pass must reach, then the cheaper template, then fewer fitted pieces) is **chosen**.
The chosen variant's score is the best of many on this sample, so it is optimistic: check it on
other labels with ``strata eval ... --recipe probe.json`` before committing.

Output (``--output DIR``): ``probe.json`` (ranked variants, intervals, comparisons, label-free
signals, the recipe), ``pieces/`` (the chosen variants' fitted pieces, refitted on the whole
sample), ``job.yaml`` (a ``strata run`` spec embedding the chosen variant(s) over a corpus),
``report.md`` with heatmaps.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from . import stats
from .derive import Reader, learn_mix
from .evaldata import BeirData, StsData
from .evaluate import unique_texts
from .metrics import l2_normalize, per_query_scores, search_run
from .mixes import apply_mix
from .signals import EXPECTED_SIGN, SIGNALS, signals
from .storage import safe_name
from .templates import TOKENS_RULE, check_tokens_rule
from .transforms import Transform, check_fit_size
from .transforms import fit as fit_transform
from .variants import SpecError, Variant, mix_variants, parse_mixes

CONTRACT = 2  # the naming contract of ARCHITECTURE.md a recipe was written under (variants.py)
TEMPLATES = ("plain", "prompteol", "echo")
POOLINGS = "last,mean,wmean,mean_nosink,wmean_nosink"
TRANSFORMS = ("center", "abtt1", "whiten128")
MIXES = "all,50%:100%,learned:all"
SHORTLIST = 8  # transforms are fitted on the best raw cells and on every mix
FOLDS = 5
MIN_PER_FOLD = 10
DEFAULT_ITEMS = 500  # labelled items sampled (STS pairs / queries): see README "How big a probe sample"
DEFAULT_DOCS = 1000  # retrieval: corpus documents (every judged one, then distractors)
SIGNAL_TEXTS = 512
TEMPLATE_COST = {"plain": 0, "prompteol": 1, "echo": 2}


class ProbeError(ValueError):
    """A probe that cannot run as asked (one line, naming what would work)."""


# --------------------------------------------------------------------------- budget
@dataclass(frozen=True)
class Budget:
    items: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str | int | None) -> "Budget":
        """``500`` (labelled items), ``5m`` / ``90s`` / ``1.5h`` (wall time for the forward passes)."""
        if text is None:
            return cls(items=DEFAULT_ITEMS)
        s = str(text).strip().lower()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|m|min|h)", s)
        if m:
            value = float(m.group(1)) * {"s": 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]
            if value <= 0:
                raise ProbeError(f"budget {text!r}: the time must be positive")
            return cls(seconds=value)
        if s.isdigit() and int(s) > 0:
            return cls(items=int(s))
        raise ProbeError(f"budget {text!r}: give a number of labelled items (500) or a time (5m, 90s)")


# --------------------------------------------------------------------------- tasks
def fold_ids(groups: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold of every item: whole groups are dealt round-robin in a seeded order, largest first,
    so folds are balanced and items of one group never straddle two folds."""
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


def _components(rows1: np.ndarray, rows2: np.ndarray, n_texts: int) -> np.ndarray:
    """Connected components of pairs that share a text (union-find); one id per pair."""
    parent = np.arange(n_texts)

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(rows1, rows2):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    return np.array([find(a) for a in rows1])


class StsTask:
    kind, metric = "sts", "cosine_spearman"

    def __init__(self, data: StsData):
        self.data = data
        self.texts, (self.rows1, self.rows2) = unique_texts(data.sentence1, data.sentence2)
        self.gold = np.asarray(data.scores, dtype=np.float64)
        self.n = len(data)
        self.groups = _components(self.rows1, self.rows2, len(self.texts))

    def per_item(self, m: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Cosine of each pair in ``idx``."""
        a, b = l2_normalize(m[self.rows1[idx]]), l2_normalize(m[self.rows2[idx]])
        return np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))

    def score(self, per_item: np.ndarray, idx: np.ndarray | None = None) -> float:
        gold = self.gold if idx is None else self.gold[idx]
        sims = per_item if idx is None else per_item[idx]
        return _spearman(sims, gold)

    def bootstrap(self, counts: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return stats.StsBootstrap(self.gold, counts)

    def labels(self, idx: np.ndarray) -> StsData:
        d = self.data
        return StsData(d.name, [d.sentence1[i] for i in idx], [d.sentence2[i] for i in idx], self.gold[idx],
                       split=d.split)

    def fit_rows(self, idx: np.ndarray) -> np.ndarray:
        """Texts a transform may be fitted on when scoring other items: these pairs' sentences."""
        return np.unique(np.r_[self.rows1[idx], self.rows2[idx]])

    @property
    def fit_label(self) -> str:
        return f"{self.data.name}/{self.data.split} sentences of the training folds (no labels)"


def _spearman(sims: np.ndarray, gold: np.ndarray) -> float:
    from scipy import stats as st

    if np.ptp(sims) == 0 or np.ptp(gold) == 0:
        return float("nan")  # constant similarities (e.g. the last token of a template at layer 0)
    return 100.0 * float(st.spearmanr(gold, sims).statistic)


class RetrievalTask:
    kind, metric = "retrieval", "ndcg_at_10"

    def __init__(self, data: BeirData):
        self.data = data
        self.texts, (self.doc_rows, query_rows) = unique_texts(data.doc_texts, data.query_texts)
        row_of = dict(zip(data.query_ids, query_rows))
        self.query_ids = sorted(data.qrels)  # items, in per_query_scores' order
        self.query_rows = np.array([row_of[q] for q in self.query_ids])
        self.n = len(self.query_ids)
        self.groups = self.query_rows  # queries with the same text stay in one fold

    def per_item(self, m: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """nDCG@10 (x100) of each query in ``idx`` (sorted) by exact search over every document."""
        idx = np.sort(idx)
        ids = [self.query_ids[i] for i in idx]
        run = search_run(m[self.query_rows[idx]], m[self.doc_rows], ids, self.data.doc_ids)
        return per_query_scores(run, {q: self.data.qrels[q] for q in ids})["ndcg_at_10"]

    def score(self, per_item: np.ndarray, idx: np.ndarray | None = None) -> float:
        return float(np.mean(per_item if idx is None else per_item[idx]))

    def bootstrap(self, counts: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return lambda per_item: stats.mean_bootstrap(per_item, counts)

    def labels(self, idx: np.ndarray) -> BeirData:
        d = self.data
        ids = [self.query_ids[i] for i in idx]
        qtext = dict(zip(d.query_ids, d.query_texts))
        return BeirData(d.name, d.doc_ids, d.doc_texts, ids, [qtext[q] for q in ids],
                        {q: d.qrels[q] for q in ids}, split=d.split)

    def fit_rows(self, idx: np.ndarray) -> np.ndarray:
        return np.unique(self.doc_rows)  # the corpus: unlabelled, the same for every fold

    @property
    def fit_label(self) -> str:
        return f"{self.data.name} corpus documents ({len(self.data.doc_ids)}, no labels)"


def make_task(data: StsData | BeirData):
    return StsTask(data) if isinstance(data, StsData) else RetrievalTask(data)


def check_labels(data: StsData | BeirData, folds: int) -> None:
    """Refuse labels the probe cannot use, naming the problem and the minimum."""
    if isinstance(data, StsData):
        empty = [i for i, (a, b) in enumerate(zip(data.sentence1, data.sentence2)) if not a.strip() or not b.strip()]
        if empty:
            raise ProbeError(f"{data.name}: {len(empty)} labelled pair(s) have an empty sentence (first: pair "
                             f"{empty[0] + 1}); remove them or fill in the text")
        n, unit = len(data), "pairs"
        if len(set(np.round(data.scores, 9))) < 2:
            raise ProbeError(f"{data.name}: every gold score is the same; a correlation needs varied labels")
    else:
        docs = set(data.doc_ids)
        no_text = [q for q, t in zip(data.query_ids, data.query_texts) if q in data.qrels and not t.strip()]
        if no_text:
            raise ProbeError(f"{data.name}: {len(no_text)} labelled quer(y/ies) have no text (first: {no_text[0]!r})")
        missing = sorted(q for q in data.qrels if q not in set(data.query_ids))
        if missing:
            raise ProbeError(f"{data.name}: {len(missing)} quer(y/ies) in the qrels are not in queries.jsonl (first: "
                             f"{missing[0]!r})")
        unjudged = sorted(q for q, rel in data.qrels.items() if not any(r > 0 and d in docs for d, r in rel.items()))
        if unjudged:
            raise ProbeError(f"{data.name}: {len(unjudged)} quer(y/ies) have no relevant document in the corpus (first:"
                             f" {unjudged[0]!r}); their texts are missing from corpus.jsonl")
        n, unit = len(data.qrels), "queries"
    if folds < 2:
        raise ProbeError(f"--folds {folds}: cross-fitting needs at least 2 folds (each fitted piece is scored on "
                         f"the fold it did not see)")
    need = max(folds * MIN_PER_FOLD, 2 * MIN_PER_FOLD)
    if n < need:
        raise ProbeError(f"{data.name}: {n} labelled {unit}, too few for {folds}-fold cross-fitting and the "
                         f"bootstrap: at least {need} are needed ({MIN_PER_FOLD} per fold)")


def sample_labels(data: StsData | BeirData, items: int, max_docs: int | None, seed: int = 0):
    """A seeded sample of ``items`` labelled items (all when fewer); retrieval keeps every judged
    document of the sampled queries, then distractors up to ``max_docs``."""
    if isinstance(data, StsData):
        if items >= len(data):
            return data
        keep = np.sort(np.random.default_rng(seed).choice(len(data), size=items, replace=False))
        return StsData(data.name, [data.sentence1[i] for i in keep], [data.sentence2[i] for i in keep],
                       np.asarray(data.scores)[keep], split=data.split)
    judged = BeirData(data.name, data.doc_ids, data.doc_texts,
                      [q for q in data.query_ids if q in data.qrels], [t for q, t in zip(data.query_ids,
                                                                                         data.query_texts)
                                                                       if q in data.qrels],
                      data.qrels, split=data.split)
    if items >= len(judged.query_ids) and (max_docs is None or max_docs >= len(data.doc_ids)):
        return judged
    return judged.subset(min(items, len(judged.query_ids)), max_docs, seed=seed, name=data.name)


# --------------------------------------------------------------------------- cross-fitting
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


class _Vectors:
    """An encoder over vectors already computed for ``texts`` (what learn_mix needs)."""

    def __init__(self, texts: Sequence[str], vectors: dict[Variant, np.ndarray]):
        self.row = {t: i for i, t in enumerate(texts)}
        self.vectors = vectors

    def encode(self, texts: Sequence[str]) -> "_Rows":
        return _Rows(self.vectors, np.array([self.row[t] for t in texts], dtype=np.int64))


class _Rows(Mapping):
    """{variant: its vectors of some rows}, sliced only when a variant is read (a mix reads its layers)."""

    def __init__(self, vectors: dict[Variant, np.ndarray], idx: np.ndarray):
        self.vectors, self.idx = vectors, idx

    def __getitem__(self, v: Variant) -> np.ndarray:
        return self.vectors[v][self.idx]

    def __iter__(self):
        return iter(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)


# --------------------------------------------------------------------------- the probe
@dataclass
class Scored:
    variant: Variant
    score: float
    low: float
    high: float
    samples: np.ndarray
    fitted_on: str = ""

    @property
    def depth(self) -> int:
        return self.variant.layer  # a mix's layer is its deepest source (variants.py): where the pass stops

    @property
    def cost(self) -> tuple:
        v = self.variant
        fitted = int(v.transform != "none") + int(bool(v.mix) and v.mix.startswith("learned"))
        return (self.depth, TEMPLATE_COST.get(v.template, 3), fitted, int(bool(v.mix)), -self.score)

    def row(self) -> dict:
        def num(x):
            return round(float(x), 4) if np.isfinite(x) else None  # undefined: constant similarities

        return {"variant": self.variant.name, **self.variant.row_fields, "score": num(self.score),
                "low": num(self.low), "high": num(self.high), "depth": self.depth,
                "fitted_on": self.fitted_on or "nothing fitted"}


def score_variants(task, vectors: dict[Variant, np.ndarray], *, n_layers: int, mixes: str = MIXES,
                   transforms: Sequence[str] = TRANSFORMS, folds: int = FOLDS, resamples: int = stats.RESAMPLES,
                   seed: int = 0, shortlist: int = SHORTLIST, fit_vectors: dict[Variant, np.ndarray] | None = None,
                   fit_source: str = "", log: list[Fit] | None = None, say=print) -> list[Scored]:
    """Every variant's score on ``task``'s items, with its interval (see the module doc).

    ``vectors``: raw vectors of ``task.texts``. ``fit_vectors``: raw vectors of unlabelled texts
    to fit transforms on instead of the training folds' texts (``--corpus``).
    """
    counts = stats.resample_counts(task.n, resamples, seed)
    boot = task.bootstrap(counts)
    fold = fold_ids(task.groups, folds, seed)
    sizes = np.bincount(fold, minlength=folds)
    if (task.n - sizes.max()) < MIN_PER_FOLD or (sizes == 0).any():
        largest = int(np.bincount(np.unique(task.groups, return_inverse=True)[1]).max())
        raise ProbeError(f"{folds} folds of {task.n} labelled items leave a fold empty or too little to fit on "
                         f"(fold sizes {sizes.tolist()}); items sharing a text stay together and the largest such "
                         f"group has {largest}: use fewer folds or labels whose pairs share fewer sentences")
    all_items = np.arange(task.n)
    out: list[Scored] = []

    def add(v: Variant, per_item: np.ndarray, fitted_on: str = "") -> Scored:
        samples = boot(per_item)
        lo, hi = stats.interval(samples)
        s = Scored(v, task.score(per_item), lo, hi, samples, fitted_on)
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
    top_raw = _ranked(out)[0].variant
    enc = _Vectors(task.texts, vectors)
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
                f"mix weights cross-fitted: {folds} folds, each fitted on the other folds' labels")
    if mixed:
        say(f"  scored {len(mixed)} layer mixes")
    todo = [t for t in transforms if t != "none"]
    if not todo:
        return out
    dim = next(iter(vectors.values())).shape[1]
    bases = [s.variant for s in _ranked(out)[:shortlist]]  # transforms: on the best raw cells and mixes
    n_fit = min(len(task.fit_rows(all_items[fold != k])) for k in range(folds)) if fit_vectors is None else \
        len(next(iter(fit_vectors.values())))
    fittable = []
    for name in todo:
        try:
            check_fit_size(name, n_fit, dim)
            fittable.append(name)
        except SpecError as e:
            say(f"  skipped {name}: {e}")
    for b in bases:
        for name in fittable:
            v = Variant(b.layer, b.pooling, b.template, b.mix, name)
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
            add(v, crossfit(task.n, fold, score_fold, log), where)
    say(f"  scored transforms {', '.join(fittable)} of the {len(bases)} best bases")
    return out


def _ranked(scored: list[Scored]) -> list[Scored]:
    """Best first; a variant whose score is undefined (constant vectors: NaN) goes last."""
    return sorted(scored, key=lambda s: (not np.isfinite(s.score), -s.score if np.isfinite(s.score) else 0.0))


@dataclass
class Choice:
    top: Scored
    chosen: Scored
    runner_up: Scored | None
    default: Scored | None
    tied: list[Scored]
    vs_default: dict | None
    vs_runner_up: dict | None
    vs_top: dict | None


def choose(scored: list[Scored], n_layers: int) -> Choice:
    """The top variant, those statistically tied with it, and the cheapest of those."""
    ranked = [s for s in _ranked(scored) if np.isfinite(s.score)]
    if not ranked:
        raise ProbeError("no variant has a defined score on this sample (every similarity is constant)")
    top = ranked[0]
    tied = [s for s in ranked if s is top or not stats.paired(top.samples, s.samples)["significant"]]
    chosen = min(tied, key=lambda s: s.cost)
    # the runner-up: the best other variant that is not the same embedding under another name
    # (echo's mean and mean_nosink, say, pool the same span)
    others = [s for s in ranked if s is not chosen and not np.array_equal(s.samples, chosen.samples)]
    runner_up = others[0] if others else None
    default = next((s for s in scored if s.variant == Variant(n_layers, "last")), None)
    return Choice(top, chosen, runner_up, default, tied,
                  stats.paired(chosen.samples, default.samples) if default and default is not chosen else None,
                  stats.paired(chosen.samples, runner_up.samples) if runner_up else None,
                  stats.paired(top.samples, chosen.samples) if top is not chosen else None)


# --------------------------------------------------------------------------- signals
def signal_table(vectors: dict[Variant, np.ndarray], seed: int = 0) -> dict[Variant, dict[str, float]]:
    """Label-free signals of every raw variant on (a seeded sample of) unlabelled texts' vectors."""
    n = len(next(iter(vectors.values())))
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, SIGNAL_TEXTS), replace=False))
    return {v: signals(m[rows]) for v, m in vectors.items() if v.is_raw}


def signal_agreement(table: dict[Variant, dict[str, float]], scored: list[Scored]) -> dict:
    """Per signal: Spearman (x100) between the signal (signed so higher should be better) and the
    labelled score over the raw cells; and the cell the signal alone would pick, with its labelled rank."""
    from scipy import stats as st

    score = {s.variant: s.score for s in scored if s.variant in table}
    cells = [s.variant for s in _ranked([s for s in scored if s.variant in table])]  # undefined scores last
    out = {}
    for name in SIGNALS:
        x = np.array([EXPECTED_SIGN[name] * table[v][name] for v in cells])
        y = np.array([score[v] for v in cells])
        ok = np.isfinite(x) & np.isfinite(y)
        rho = float(st.spearmanr(x[ok], y[ok]).statistic) if ok.sum() > 2 else float("nan")
        pick = cells[int(np.nanargmax(np.where(ok, x, -np.inf)))]
        best_layer = _best_layer_by(lambda v: score[v], cells)
        sig_layer = _best_layer_by(lambda v: EXPECTED_SIGN[name] * table[v][name], cells)
        within = []  # per (template, pooling): rank correlation across layers
        for key in best_layer:
            vs = [v for v in cells if f"{v.template}/{v.pooling}" == key and np.isfinite(score[v])]
            a = np.array([EXPECTED_SIGN[name] * table[v][name] for v in vs])
            b = np.array([score[v] for v in vs])
            if len(vs) > 2 and np.ptp(a) > 0 and np.ptp(b) > 0:
                within.append(st.spearmanr(a, b).statistic)
        out[name] = {"spearman_x100": round(100 * rho, 2) if np.isfinite(rho) else None, "pick": pick.name, "pick_score": round(score[pick], 4),
                     "pick_rank": cells.index(pick) + 1, "of": len(cells),
                     "within_curves_spearman_x100": round(100 * float(np.mean(within)), 2) if within else None,
                     "same_best_layer": sum(sig_layer.get(k) == lay for k, lay in best_layer.items()),
                     "curves": len(best_layer),
                     "best_layer_by_signal": sig_layer, "best_layer_by_labels": best_layer}
    return out


def _best_layer_by(key, cells: list[Variant]) -> dict[str, int]:
    """Per (template, pooling): the layer the key ranks first."""
    best: dict[str, tuple[float, int]] = {}
    for v in cells:
        k = f"{v.template}/{v.pooling}"
        val = key(v)
        if np.isfinite(val) and (k not in best or val > best[k][0]):
            best[k] = (val, v.layer)
    return {k: lay for k, (_, lay) in sorted(best.items())}


# --------------------------------------------------------------------------- recipe
def refit(variant: Variant, task, vectors: dict[Variant, np.ndarray], out_dir: Path,
          fit_vectors: dict[Variant, np.ndarray] | None, fit_source: str) -> dict:
    """The recipe entry of a variant: its sources and its pieces refitted on the whole sample."""
    entry = {"variant": variant.name, **variant.row_fields, "sources": [s.name for s in variant.sources]}
    all_items = np.arange(task.n)
    weights = None
    if variant.mix is not None:
        if variant.mix.startswith("learned"):
            w, seen = learn_mix(_Vectors(task.texts, vectors), variant, task.labels(all_items))
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


@dataclass
class Recipe:
    """What ``probe.json`` says to embed: the model, its settings, and variants with their pieces."""

    path: Path
    model: dict
    settings: dict
    templates: dict[str, str]
    entries: list[dict]
    probe_sha256: str
    labels: dict | None = None  # the labelled sample the variants were chosen on: data, split, items, of

    @classmethod
    def load(cls, path: str | Path, top: int = 1) -> "Recipe":
        path = Path(path)
        if path.is_dir():
            path = path / "probe.json"
        try:
            blob = path.read_bytes()
            d = json.loads(blob)
        except FileNotFoundError:
            raise ProbeError(f"recipe {path}: no such file (strata probe writes OUTPUT/probe.json)") from None
        except json.JSONDecodeError as e:
            raise ProbeError(f"recipe {path}: not JSON ({e})") from None
        if not isinstance(d, dict) or "recipe" not in d:
            raise ProbeError(f"recipe {path}: not a probe.json (no 'recipe' entry)")
        if d.get("contract") != CONTRACT:
            raise ProbeError(f"recipe {path}: written under naming contract {d.get('contract')!r}, this strata reads "
                             f"contract {CONTRACT}; run the probe again")
        entries = d["recipe"]
        if top < 1:
            raise ProbeError(f"--top {top}: must be at least 1")
        if top > len(entries):
            raise ProbeError(f"recipe {path}: --top {top}, but it holds {len(entries)} variant(s)")
        recipe = cls(path, d["model"], d["settings"], d["settings"]["templates"], entries[:top],
                     hashlib.sha256(blob).hexdigest(), d.get("labels"))
        try:
            check_tokens_rule(recipe.templates, (s.template for s in recipe.sources()),
                              d["settings"].get("template_tokens"), f"recipe {path}")
        except ValueError as e:
            raise ProbeError(f"{e} (run the probe again)") from None
        return recipe

    def held_out_from(self, data) -> tuple["Recipe", list[str], str | None]:
        """This recipe for scoring on ``data``: without the entries whose mix weights were fitted on
        ``data``'s labels (same name and split), the lines saying which were left out, and a note
        when the variants were chosen on a sample of ``data`` (their scores there are optimistic)."""
        same = (lambda seen: seen and (seen.get("data"), seen.get("split")) == (data.name, data.split))
        kept, dropped = [], []
        for e in self.entries:
            if same(e.get("mix_fitted_on")):
                m = e["mix_fitted_on"]
                dropped.append(f"left out {e['variant']}: its mix weights were fitted on {m['data']}/{m['split']} "
                               f"labels, the data scored here")
            else:
                kept.append(e)
        if not kept:
            raise ProbeError(f"recipe {self.path}: every variant asked for has mix weights fitted on "
                             f"{data.name}/{data.split}, the data to score: evaluate on other labels, or raise --top")
        chosen = None
        if same(self.labels):
            chosen = (f"chosen by the probe on {self.labels.get('items')} of {self.labels.get('of')} items of "
                      f"{data.name}/{data.split}: optimistic here")
        return replace(self, entries=kept), dropped, chosen

    @property
    def variants(self) -> list[Variant]:
        return [Variant.parse(e["variant"]) for e in self.entries]

    def sources(self) -> list[Variant]:
        return list(dict.fromkeys(Variant.parse(s) for e in self.entries for s in e["sources"]))

    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.sources()})

    def poolings(self) -> list[str]:
        return sorted({s.pooling for s in self.sources()})

    def readers(self) -> list[Reader]:
        out = []
        for e in self.entries:
            t = Transform.load(self.path.parent / e["transform_path"]) if e.get("transform_path") else None
            w = tuple(e["weights"]) if e.get("weights") else None
            out.append(Reader(Variant.parse(e["variant"]), tuple(e["sources"]), w, t))
        return out

    def template_specs(self) -> list[str]:
        """The sources' templates as ``resolve`` takes them: built-in names, user templates by text."""
        return [t if not t.startswith("t_") else self.templates[t]
                for t in dict.fromkeys(s.template for s in self.sources())]

    def check_model(self, request) -> None:
        """Refuse a request for other weights or settings than the probe's, naming the difference."""
        mine, theirs = self.model.get("weights_digest"), request.model.weights_digest
        if mine and theirs and mine != theirs:
            raise ProbeError(f"recipe {self.path}: probed on model {self.model['name']} ({mine[:19]}…), not "
                             f"{request.model.name} ({theirs[:19]}…)")

    def request(self, *, digest: bool = True, **kw):
        """The request that embeds exactly the recipe's sources (truncated at its deepest layer)."""
        from .request import resolve

        req = resolve(self.model["name"], layers=",".join(map(str, self.layers())), poolings=",".join(self.poolings()),
                      templates=self.template_specs(),
                      max_length=self.settings["max_length"], append_eos=self.settings.get("append_eos", False),
                      digest=digest, **kw)
        self.check_model(req)
        return req

    def fitted_on(self, entry: dict) -> str:
        parts = []
        if entry.get("mix_fitted_on"):
            m = entry["mix_fitted_on"]
            parts.append(f"mix weights fitted on {m['data']}/{m['split']} ({m['pairs']} labelled pairs)")
        if entry.get("transform_fitted_on"):
            t = entry["transform_fitted_on"]
            parts.append(f"transform fitted on {t.get('source')} ({t.get('texts')} texts, no labels)")
        return "; ".join(parts)


class RecipeEncoder:
    """``encode(texts)`` giving the recipe's variants: raw vectors from ``encoder``, then each
    variant's recorded mix weights and fitted transform (nothing refitted)."""

    def __init__(self, recipe: Recipe, encoder):
        self.recipe, self.encoder, self.readers = recipe, encoder, recipe.readers()

    def encode(self, texts: Sequence[str]) -> dict[Variant, np.ndarray]:
        raw = self.encoder.encode(texts)
        by_name = {v.name: m for v, m in raw.items()}
        return {r.variant: r.apply([by_name[c] for c in r.columns]) for r in self.readers}


# --------------------------------------------------------------------------- running it
def _encode_with_progress(encoder, texts: list[str], say, label: str) -> dict[Variant, np.ndarray]:
    """Encode in chunks, printing progress and the time left (by tokens)."""
    toks = encoder.tokenize_templates(texts)
    per_text = sum(np.asarray([len(i) for i in t.ids]) for t in toks.values())
    total = float(per_text.sum())
    chunks = max(1, min(20, len(texts) // 64))
    bounds = np.linspace(0, len(texts), chunks + 1).astype(int)
    parts: list[dict] = []
    t0, done = time.perf_counter(), 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        res = encoder.encode(texts[a:b])
        parts.append(dict(res.items()))
        done += float(per_text[a:b].sum())
        el = time.perf_counter() - t0
        left = el / done * (total - done) if done else 0.0
        say(f"  {label}: {b:,}/{len(texts):,} texts, {done / el:,.0f} tok/s, ~{left:.0f}s left", end="\r")
    say("")
    return {v: np.concatenate([p[v] for p in parts]) for v in parts[0]}


def _sample_size(budget: Budget, data, encoder, say, max_docs: int | None = DEFAULT_DOCS) -> int:
    """Items that fit the budget: measured tokens/s on a warm-up, exact token counts per item."""
    n_all = len(data) if isinstance(data, StsData) else len(data.qrels)
    if budget.seconds is None:
        return min(budget.items, n_all)
    task = make_task(data)
    probe_texts = task.texts[: min(len(task.texts), 2000)]
    toks = encoder.tokenize_templates(probe_texts)
    per_text = float(np.mean(sum(np.asarray([len(i) for i in t.ids]) for t in toks.values())))
    warm = probe_texts[:48]
    encoder.encode(warm[:8])
    t0 = time.perf_counter()
    res = encoder.encode(warm)
    rate = res.stats.tokens / max(time.perf_counter() - t0, 1e-6)  # tokens of every template pass
    texts_per_item = len(task.texts) / n_all
    if isinstance(data, BeirData):  # the corpus is embedded whatever the number of queries
        docs = len(data.doc_ids)
        room = budget.seconds * 0.8 * rate / per_text - min(docs, max_docs or docs)
        items = int(room / max(texts_per_item - docs / n_all, 1.0))
    else:
        items = int(budget.seconds * 0.8 * rate / (per_text * texts_per_item))
    need = FOLDS * MIN_PER_FOLD
    if items < need:
        need_s = need * per_text * texts_per_item / (0.8 * rate)
        raise ProbeError(f"budget {budget.seconds / 60:.1f} min fits about {max(items, 0)} labelled items at the "
                         f"measured {rate:,.0f} tok/s over {len(encoder.templates)} template(s); the minimum, "
                         f"{need}, needs about {need_s / 60:.1f} min: raise --budget or use fewer --templates")
    say(f"  budget {budget.seconds / 60:.1f} min: {min(items, n_all):,} labelled items at {rate:,.0f} tok/s")
    return min(items, n_all)


def run_probe(model: str, labels, output: str | Path, *, budget: Budget | None = None, corpus: str | None = None,
              text_column: str = "text", templates: Sequence[str] = TEMPLATES, poolings: str = POOLINGS,
              transforms: Sequence[str] = TRANSFORMS, mixes: str = MIXES, max_length: int = 128,
              max_docs: int | None = DEFAULT_DOCS, folds: int = FOLDS, resamples: int = stats.RESAMPLES,
              top: int = 3, seed: int = 0, say=print) -> dict:
    """The probe (module doc). ``labels``: StsData or BeirData, already loaded."""
    from .encoder import Encoder
    from .request import resolve

    t0 = time.perf_counter()
    out = Path(output)
    budget = budget or Budget(items=DEFAULT_ITEMS)
    check_labels(labels, folds)
    request = resolve(model, layers="all", poolings=poolings, templates=list(templates), max_length=max_length)
    encoder = Encoder.from_request(request)
    n_layers = request.model.n_layers
    items = _sample_size(budget, labels, encoder, say, max_docs)
    data = sample_labels(labels, items, max_docs, seed)
    check_labels(data, folds)
    task = make_task(data)
    unit = "pairs" if task.kind == "sts" else "queries"
    say(f"probe {request.model.name} on {data.name}/{data.split}: {task.n:,} labelled {unit}, {len(task.texts):,} "
        f"texts, {len(request.templates)} template(s) x {n_layers + 1} layers x {len(poolings.split(','))} poolings")
    vectors = _encode_with_progress(encoder, task.texts, say, "embedding the sample")
    t_embed = time.perf_counter() - t0
    fit_vectors, fit_source, signal_vectors, corpus_note = None, "", vectors, None
    if corpus:
        from .evaldata import read_texts

        texts = list(dict.fromkeys(t for t in read_texts(corpus, text_column) if t.strip()))
        rng = np.random.default_rng(seed)
        texts = [texts[i] for i in np.sort(rng.choice(len(texts), size=min(len(texts), SIGNAL_TEXTS),
                                                        replace=False))]
        if len(texts) < 3:
            raise ProbeError(f"--corpus {corpus}: {len(texts)} non-empty text(s); at least 3 are needed")
        fit_vectors = _encode_with_progress(encoder, texts, say, "embedding the corpus sample")
        fit_source = f"{len(texts)} texts sampled from {corpus}"
        signal_vectors, corpus_note = fit_vectors, fit_source
    say("scoring")
    scored = score_variants(task, vectors, n_layers=n_layers, mixes=mixes, transforms=transforms, folds=folds,
                            resamples=resamples, seed=seed, fit_vectors=fit_vectors, fit_source=fit_source, say=say)
    choice = choose(scored, n_layers)
    say("label-free signals")
    table = signal_table(signal_vectors, seed)
    agreement = signal_agreement(table, scored)
    ranked = _ranked(scored)
    picks = [choice.chosen] + [s for s in ranked if s is not choice.chosen][: max(0, top - 1)]
    out.mkdir(parents=True, exist_ok=True)
    recipe = [refit(s.variant, task, vectors, out, fit_vectors, fit_source) for s in picks]
    result = {
        "contract": CONTRACT,
        "model": {"name": request.model.name, "path": request.model.path, "weights_digest":
                  request.model.weights_digest, "n_layers": n_layers, "dim": request.model.dim},
        "settings": {"max_length": max_length, "append_eos": request.settings.append_eos,
                     "templates": request.template_texts(), "template_tokens": TOKENS_RULE,
                     "poolings": poolings.split(","),
                     "transforms": list(transforms), "mixes": mixes, "folds": folds, "resamples": resamples,
                     "seed": seed, "level": stats.LEVEL},
        "labels": {"task": task.kind, "metric": task.metric, "data": data.name, "split": data.split,
                   "items": task.n, "of": len(labels) if isinstance(labels, StsData) else len(labels.qrels),
                   "texts": len(task.texts), "subset": getattr(data, "subset_note", None)},
        "corpus": corpus_note,
        "chosen": _choice_dict(choice),
        "signals": {"on": corpus_note or f"the {len(task.texts)} sample texts, labels unused", "agreement": agreement},
        "recipe": recipe,
        "seconds": {"embed": round(t_embed, 1), "total": round(time.perf_counter() - t0, 1)},
        "ranked": [s.row() for s in ranked],
    }
    _write_json(out / "probe.json", result)
    (out / "job.yaml").write_text(job_yaml(result, out / "probe.json", text_column))
    write_probe_report(result, scored, choice, out)
    result["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    _write_json(out / "probe.json", result)
    return result


def _choice_dict(c: Choice) -> dict:
    def name(s):
        return None if s is None else {"variant": s.variant.name, "score": round(s.score, 4),
                                        "low": round(s.low, 4), "high": round(s.high, 4)}

    return {"variant": c.chosen.variant.name, "score": round(c.chosen.score, 4), "low": round(c.chosen.low, 4),
            "high": round(c.chosen.high, 4), "depth": c.chosen.depth, "fitted_on": c.chosen.fitted_on or
            "nothing fitted", "top": name(c.top), "runner_up": name(c.runner_up), "default": name(c.default),
            "tied_with_top": len(c.tied), "tied": [s.variant.name for s in c.tied[:50]],
            "vs_default": c.vs_default, "vs_runner_up": c.vs_runner_up, "top_vs_chosen": c.vs_top}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def job_yaml(result: dict, probe_path: Path, text_column: str) -> str:
    """A ``strata run`` spec embedding the recipe's variants over a corpus."""
    r = Recipe.load(probe_path, top=1)
    templates = r.template_specs()
    lines = [
        f"# Written by strata probe: the chosen variant {result['chosen']['variant']} of {result['model']['name']}",
        f"# (score {result['chosen']['score']:.2f} on the probe sample). Set input.location to the corpus, then",
        "#   strata run job.yaml --dry-run && strata run job.yaml",
        f"name: {safe_name(Path(result['model']['name']).name).lower()}-probe-winner",
        "input:",
        "  location: CORPUS_URL  # the Parquet corpus to embed (any fsspec URL)",
        f"  text_column: {text_column}",
        f"model: {json.dumps(result['model']['name'])}",
        "variants:",
        f"  layers: [{', '.join(map(str, r.layers()))}]",
        f"  poolings: [{', '.join(r.poolings())}]",
        f"  templates: {json.dumps(templates)}",
        f"  recipe: {json.dumps(str(probe_path.resolve()))}  # mix weights and fitted transform, as probed",
        "embedding:",
        f"  max_length: {result['settings']['max_length']}",
        "output: out/jobs",
        "indexes:",
        "  variants: all",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- report
def summary_lines(result: dict) -> list[str]:
    c = result["chosen"]
    lab = result["labels"]
    lines = [f"probe of {result['model']['name']} on {lab['data']}/{lab['split']} ({lab['items']:,} labelled "
             f"{'pairs' if lab['task'] == 'sts' else 'queries'}; {lab['metric']} x100, 95% bootstrap intervals)",
             f"  chosen:  {c['variant']}  {c['score']:.2f} [{c['low']:.2f}, {c['high']:.2f}]  ({c['fitted_on']})"]
    if c["top"]["variant"] != c["variant"]:
        d = c["top_vs_chosen"]
        lines.append(f"  top:     {c['top']['variant']}  {c['top']['score']:.2f}: statistically tied with "
                     f"{c['tied_with_top'] - 1} other(s) (difference [{d['diff_low']:+.2f}, {d['diff_high']:+.2f}]);"
                     f" the chosen one is the cheapest of them (depth {c['depth']})")
    elif c["tied_with_top"] > 1:
        lines.append(f"  tied:    {c['tied_with_top'] - 1} other variant(s) are not significantly worse")
    else:
        lines.append("  no other variant is statistically tied with it")
    if c["default"] and c["vs_default"]:
        d = c["vs_default"]
        lines.append(f"  default: {c['default']['variant']}  {c['default']['score']:.2f}; gain "
                     f"{c['score'] - c['default']['score']:+.2f} [{d['diff_low']:+.2f}, {d['diff_high']:+.2f}]"
                     f"{'' if d['significant'] else ' (not significant)'}")
    if c["runner_up"] and c["vs_runner_up"]:
        d = c["vs_runner_up"]
        lines.append(f"  runner-up: {c['runner_up']['variant']}  {c['runner_up']['score']:.2f}; difference "
                     f"[{d['diff_low']:+.2f}, {d['diff_high']:+.2f}]{'' if d['significant'] else ' (a tie)'}")
    lines.append("  the chosen score is the best of many on this sample (optimistic): check it on other labels "
                 "with `strata eval ... --recipe probe.json`")
    return lines


def write_probe_report(result: dict, scored: list[Scored], choice: Choice, out: Path) -> Path:
    from .report import md_cell, plot_heatmap

    metric = result["labels"]["metric"]
    rows = [{"task": result["labels"]["task"], "metric": metric, **s.variant.row_fields, "score": s.score}
            for s in scored]
    win = (choice.chosen.low, choice.chosen.high)
    lines = ["# Probe", "", *[f"    {line}" for line in summary_lines(result)], ""]
    c = result["chosen"]
    lines += ["## Ranking (top 20)", "",
              "| rank | variant | score | 95% interval | depth | fitted on |", "|---:|---|---:|---|---:|---|"]
    for i, r in enumerate([r for r in result["ranked"] if r["score"] is not None][:20], 1):
        mark = " (chosen)" if r["variant"] == c["variant"] else ""
        lines.append(f"| {i} | `{md_cell(r['variant'])}`{mark} | {r['score']:.2f} | [{r['low']:.2f}, {r['high']:.2f}] "
                     f"| {r['depth']} | {md_cell(r['fitted_on'])} |")
    lines += ["", "## Heatmaps", "",
              "Raw cells per template; a dot marks a cell whose 95% interval overlaps the chosen variant's (a "
              "looser test than the paired one that decides ties).", ""]
    for template in dict.fromkeys(s.variant.template for s in scored if s.variant.is_raw):
        marked = {(s.variant.layer, s.variant.pooling) for s in scored
                  if s.variant.is_raw and s.variant.template == template and stats.overlaps((s.low, s.high), win)}
        best = None
        if choice.chosen.variant.is_raw and choice.chosen.variant.template == template:
            best = {"metric": metric, **choice.chosen.variant.row_fields}
        path = plot_heatmap(rows, metric, f"{result['model']['name']} / {result['labels']['data']} ({template})",
                            out / f"heatmap_{safe_name(template)}.png", best, template, marked=marked)
        lines.append(f"![{template}]({path.name})")
    lines += ["", "## Label-free signals", "", f"Computed on {result['signals']['on']}. Spearman x100 between "
              "the signal (signed so that higher should be better) and the labelled score across the raw cells.", "",
              "| signal | Spearman x100, all cells | mean Spearman x100 along each layer curve | best layer right "
              "| the signal's pick | its score | its rank |", "|---|---:|---:|---:|---|---:|---:|"]
    for name, a in result["signals"]["agreement"].items():
        within = "–" if a["within_curves_spearman_x100"] is None else f"{a['within_curves_spearman_x100']:.1f}"
        rho = "–" if a["spearman_x100"] is None else f"{a['spearman_x100']:.1f}"
        lines.append(f"| {name} | {rho} | {within} | {a['same_best_layer']} of {a['curves']} | "
                     f"`{md_cell(a['pick'])}` | {a['pick_score']:.2f} | {a['pick_rank']} of {a['of']} |")
    lines += ["", "## What each piece saw", "",
              f"- Labels: {result['labels']['items']:,} of {result['labels']['of']:,} items of "
              f"{result['labels']['data']}/{result['labels']['split']}, {result['settings']['folds']}-fold "
              "cross-fitting: every fitted variant's score on an item comes from pieces fitted without it.",
              "- The recipe's pieces (`pieces/`) are refitted on the whole sample; evaluate them on other labels "
              "with `strata eval ... --recipe probe.json`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path

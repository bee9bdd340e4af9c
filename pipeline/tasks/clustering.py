"""Clustering: k-means on the embeddings against the labels, V-measure, MTEB's two protocols exactly.

``original`` (MTEB's ``AbsTaskClustering`` with its ``ClusteringEvaluator``, mteb 1.12; MasakhaNEWS
clustering runs it): per clustering set, ``MiniBatchKMeans(n_clusters = the set's number of labels,
batch_size=500, n_init="auto")`` on the raw vectors, V-measure of its assignment against the labels; the
score is the mean over sets (``v_measure``), with the population standard deviation (``v_measure_std``).
MTEB passes no ``random_state`` but builds each set's evaluator right after ``np.random.seed(42)``, so
each set's k-means draws from a fresh seed-42 generator: ``random_state=RandomState(42)`` here.

``fast`` (MTEB's ``AbsTaskClusteringFast``): all records at once (sets ignored), at most
``max_documents_to_embed = 16,384`` of them (``random.Random(42).sample``), then ``n_clusters = 10``
bootstrap subsets of ``max_documents_per_cluster = 2,048`` drawn WITH replacement
(``rng.choices`` on the same ``random.Random``), each clustered by ``MiniBatchKMeans(batch_size=512,
n_init="auto")``; the ten fits draw in turn from one generator seeded 42 (MTEB's global numpy state). The
score is the mean V-measure over the subsets. Labels are one level (MTEB's hierarchy, lists of labels, is
not read).

Nothing is fitted on the labels: k-means sees the vectors only (a fitted transform sees every text, no
labels), and the labels only score its assignment.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..evaldata import EvalDataError
from .records import data_name, find_file, labels_of, read_records, require, text_of

PROTOCOLS = ("original", "fast")
SEED = 42
BATCH_SIZE = 500  # original
FAST_MAX_DOCUMENTS = 16_384
FAST_PER_CLUSTER = 2_048
FAST_SUBSETS = 10
FAST_BATCH_SIZE = 512


@dataclass
class ClusteringData:
    name: str
    texts: list[str]
    labels: np.ndarray  # int codes
    sets: np.ndarray  # the clustering set of each text (0 when the data has none)
    split: str = "test"
    left_out: str | None = None

    def __len__(self) -> int:
        return len(self.texts)


def load(path: str | Path, *, name: str | None = None, split: str | None = None) -> ClusteringData:
    """``{"text", "label"}`` records, optionally with ``set`` (several clustering sets, averaged); a folder
    is read through its test file."""
    from ..evaldata import _infer_split

    path = Path(path)
    file = find_file(path, "test") if path.is_dir() else path
    records = read_records(file)
    require(records, file, ("text", "label"))
    labels = labels_of(records)
    has_sets = any("set" in r.fields for r in records)
    sets = labels_of(records, "set") if has_sets else [0] * len(records)
    texts = [text_of(r) for r in records]
    keep = [i for i, t in enumerate(texts) if t is not None]
    if not keep:
        raise EvalDataError(f"{file}: every text is empty: nothing to cluster")
    classes = sorted(set(labels[i] for i in keep))
    set_names = sorted(set(sets[i] for i in keep))
    code, set_code = {c: i for i, c in enumerate(classes)}, {s: i for i, s in enumerate(set_names)}
    data = ClusteringData(name or data_name(file), [texts[i] for i in keep],
                          np.array([code[labels[i]] for i in keep]), np.array([set_code[sets[i]] for i in keep]),
                          split or ("test" if path.is_dir() else _infer_split(file.stem)),
                          f"{len(records) - len(keep)} record(s) with an empty text left out"
                          if len(keep) < len(records) else None)
    for s, set_name in enumerate(set_names):
        rows = data.sets == s
        n_labels = len(np.unique(data.labels[rows]))
        where = f"{file}" + (f" (set {set_name!r})" if has_sets else "")
        if n_labels < 2:
            raise EvalDataError(f"{where}: one label: clustering is scored against at least 2 labels")
        if rows.sum() <= n_labels:
            raise EvalDataError(f"{where}: {int(rows.sum())} text(s) for {n_labels} labels: k-means needs more "
                                "texts than clusters; merge sets or add texts")
    return data


def kmeans_labels(x: np.ndarray, k: int, batch_size: int, random_state) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans

    model = MiniBatchKMeans(n_clusters=k, batch_size=batch_size, n_init="auto", random_state=random_state)
    return model.fit(x).labels_


def original_scores(m: np.ndarray, labels: np.ndarray, sets: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import v_measure_score

    v = []
    for s in np.unique(sets):
        rows = sets == s
        y = labels[rows]
        v.append(v_measure_score(y, kmeans_labels(m[rows], len(np.unique(y)), BATCH_SIZE, np.random.RandomState(SEED))))
    return {"v_measure": 100.0 * float(np.mean(v)), "v_measure_std": 100.0 * float(np.std(v))}


def fast_rows(n: int, seed: int = SEED) -> tuple[np.ndarray, list[np.ndarray]]:
    """The records MTEB's fast protocol embeds, and its bootstrap subsets (positions in them)."""
    rng = random.Random(seed)
    rows = np.array(sorted(rng.sample(range(n), k=FAST_MAX_DOCUMENTS)) if n > FAST_MAX_DOCUMENTS else range(n))
    size = min(FAST_PER_CLUSTER, len(rows))
    return rows, [np.array(rng.choices(range(len(rows)), k=size)) for _ in range(FAST_SUBSETS)]


def fast_scores(m: np.ndarray, labels: np.ndarray, subsets: list[np.ndarray]) -> dict[str, float]:
    from sklearn.metrics import v_measure_score

    state = np.random.RandomState(SEED)  # one generator through the ten fits, as MTEB's global state
    k = len(np.unique(labels))
    v = [v_measure_score(labels[s], kmeans_labels(m[s], k, FAST_BATCH_SIZE, state)) for s in subsets]
    return {"v_measure": 100.0 * float(np.mean(v)), "v_measure_std": 100.0 * float(np.std(v))}


class Prepared:
    def __init__(self, data: ClusteringData, *, protocol: str = "original"):
        from ..evaluate import unique_texts

        if protocol not in PROTOCOLS:
            raise EvalDataError(f"clustering protocol {protocol!r}: choose from {', '.join(PROTOCOLS)}")
        self.data, self.protocol = data, protocol
        if protocol == "fast":
            self.records, self.subsets = fast_rows(len(data))
        else:
            self.records, self.subsets = np.arange(len(data)), None
        self.texts, (self.rows,) = unique_texts([data.texts[i] for i in self.records])
        self.fit_rows = None  # every clustered text (no labels)
        self.fit_label = f"{data.name}/{data.split} texts (no labels)"

    def score(self, m: np.ndarray) -> dict[str, float]:
        x, labels = m[self.rows], self.data.labels[self.records]
        if self.protocol == "fast":
            return fast_scores(x, labels, self.subsets)
        return original_scores(x, labels, self.data.sets[self.records])

    def describe(self) -> str:
        d = self.data
        n_sets = len(np.unique(d.sets))
        return (f"{len(d):,} texts, {len(np.unique(d.labels))} labels"
                + (f" in {n_sets} sets" if n_sets > 1 and self.protocol == "original" else "")
                + f", protocol {self.protocol}")


# --------------------------------------------------------------------------- the probe's labelled items


def weighted_v_measure(labels: np.ndarray, clusters: np.ndarray, weights: np.ndarray) -> float:
    """V-measure (x100) of ``clusters`` against ``labels`` with item multiplicities ``weights``: scikit-learn's
    ``v_measure_score`` of the multiset (entropies of the weighted contingency table)."""
    _, c = np.unique(labels, return_inverse=True)
    _, k = np.unique(clusters, return_inverse=True)
    n_c, n_k = c.max() + 1, k.max() + 1
    table = np.bincount(c * n_k + k, weights=weights, minlength=n_c * n_k).reshape(n_c, n_k)
    n = table.sum()
    if n <= 0:
        return float("nan")

    def entropy(x):
        p = x[x > 0] / x.sum()
        return float(-(p * np.log(p)).sum())

    h_c, h_k = entropy(table.sum(1)), entropy(table.sum(0))
    nz = table > 0
    joint = table[nz] / n
    h_c_given_k = float(-(joint * np.log(table[nz] / np.broadcast_to(table.sum(0), table.shape)[nz])).sum())
    h_k_given_c = float(-(joint * np.log(table[nz] / np.broadcast_to(table.sum(1)[:, None], table.shape)[nz])).sum())
    homogeneity = 1.0 if h_c == 0 else 1.0 - h_c_given_k / h_c
    completeness = 1.0 if h_k == 0 else 1.0 - h_k_given_c / h_k
    if homogeneity + completeness == 0:
        return 0.0
    return 100.0 * 2 * homogeneity * completeness / (homogeneity + completeness)


PROBE_DATA = ClusteringData


def load_labels(path, split=None) -> ClusteringData:
    return load(path)


class Items:
    """Labelled texts as the probe's clustering items: an item's output is its k-means cluster (the
    original protocol, per set, on the items scored), the score the mean V-measure over sets. Nothing is
    fitted on labels, so nothing is cross-fitted: transforms are fitted on every text (no labels) and scored
    on every item, and no learned mix is offered."""

    kind, metric = "clustering", "v_measure"
    learned_mix, unsupervised = False, True

    def __init__(self, data: ClusteringData):
        from ..evaluate import unique_texts

        self.data = data
        self.texts, (self.rows,) = unique_texts(data.texts)
        self.y, self.sets = np.asarray(data.labels), np.asarray(data.sets)
        self.n = len(data)
        self.groups = self.rows

    def per_item(self, m: np.ndarray, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        out = np.zeros(len(idx))
        for s in np.unique(self.sets[idx]):
            here = self.sets[idx] == s
            k = len(np.unique(self.y[idx[here]]))
            if 2 <= k < here.sum():
                out[here] = kmeans_labels(m[self.rows[idx[here]]], k, BATCH_SIZE, np.random.RandomState(SEED))
        return out

    def _mean_over_sets(self, per_item: np.ndarray, idx: np.ndarray, weights: np.ndarray) -> float:
        v = [weighted_v_measure(self.y[idx][here], per_item[idx][here], weights[here])
             for s in np.unique(self.sets[idx]) for here in [self.sets[idx] == s] if weights[here].sum() > 0]
        return float(np.mean(v)) if v else float("nan")

    def score(self, per_item: np.ndarray, idx: np.ndarray | None = None) -> float:
        idx = np.arange(self.n) if idx is None else np.asarray(idx)
        return self._mean_over_sets(per_item, idx, np.ones(len(idx)))

    def bootstrap(self, counts: np.ndarray):
        every = np.arange(self.n)
        return lambda per_item: np.array([self._mean_over_sets(per_item, every, w) for w in counts])

    def fit_rows(self, idx: np.ndarray) -> np.ndarray:
        return np.arange(len(self.texts))  # every text: nothing fitted sees a label

    @property
    def fit_label(self) -> str:
        return f"{self.data.name}/{self.data.split} texts (no labels)"

"""Classification: a linear probe on the embeddings, MTEB's protocol exactly.

MTEB (``AbsTaskClassification`` with its ``logRegClassificationEvaluator``, mteb 1.12):

- ``n_experiments = 10`` and ``samples_per_label = 8`` unless a task sets its own (EmotionClassification:
  16); ``--experiments`` and ``--samples-per-label`` set them here;
- the task's seed is 42 (``AbsTask.seed``). Each experiment shuffles the SAME index array again, in place,
  with numpy's global legacy generator (``np.random.shuffle``), which every evaluator's constructor has
  just reseeded with 42 (``Evaluator.__init__``): so experiment k's order is experiment k-1's order
  permuted by ``RandomState(42).permutation(n)``. It keeps, in that order, the first
  ``samples_per_label`` training rows of each label (``_undersample_data``);
- ``LogisticRegression(random_state=42, max_iter=100)`` (lbfgs, C = 1) on the raw vectors (no
  normalisation), fitted on the sample's vectors and labels, predicting every test text;
- ``accuracy`` (the main score), macro ``f1`` and ``f1_weighted`` are the means over the experiments, x100.

Only the sampled training texts and the test texts are embedded (MTEB embeds the same), so a fitted
transform sees the sampled training texts (no labels); the test set is never seen by anything fitted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..evaldata import EvalDataError
from .records import find_file, labels_of, read_records, require, text_of

N_EXPERIMENTS = 10
SAMPLES_PER_LABEL = 8
SEED = 42
MAX_ITER = 100
METRICS = ("accuracy", "f1", "f1_weighted")


@dataclass
class ClassificationData:
    name: str
    train_texts: list[str]
    train_labels: np.ndarray  # int codes into ``classes``
    test_texts: list[str]
    test_labels: np.ndarray
    classes: list = field(default_factory=list)
    split: str = "test"
    left_out: str | None = None

    def __len__(self) -> int:
        return len(self.test_texts)


def _split(path: Path) -> tuple[list[str], list, int]:
    records = read_records(path)
    require(records, path, ("text", "label"))
    labels = labels_of(records)
    texts = [text_of(r) for r in records]
    keep = [i for i, t in enumerate(texts) if t is not None]
    return [texts[i] for i in keep], [labels[i] for i in keep], len(records) - len(keep)


def load(path: str | Path, *, split: str = "test", name: str | None = None) -> ClassificationData:
    """A folder with ``train`` and ``test`` (or ``split``) files of ``{"text", "label"}`` records
    (``.jsonl``, ``.csv`` or ``.parquet``; ``validation`` may stand beside them)."""
    directory = Path(path)
    if not directory.is_dir():
        raise EvalDataError(f"{directory}: classification reads a folder with train and {split} files "
                            "({\"text\", \"label\"} records), not a file")
    train_path, test_path = find_file(directory, "train"), find_file(directory, split)
    train_texts, train_labels, lost_train = _split(train_path)
    test_texts, test_labels, lost_test = _split(test_path)
    kinds = {type(v) for v in train_labels} | {type(v) for v in test_labels}
    if len(kinds) > 1:
        raise EvalDataError(f"{test_path}: labels are {'strings' if str in {type(v) for v in test_labels} else 'integers'}"
                            f" but {train_path.name}'s are not: use one kind of label in both files")
    classes = sorted(set(train_labels))
    if len(classes) < 2:
        raise EvalDataError(f"{train_path}: one class ({classes[0] if classes else 'none'}): classification needs "
                            "at least 2 labels in train")
    code = {c: i for i, c in enumerate(classes)}
    absent = sorted(set(test_labels) - set(classes), key=str)
    if absent:
        raise EvalDataError(f"{test_path}: label(s) {', '.join(map(repr, absent[:5]))} absent from "
                            f"{train_path.name}: a classifier cannot predict a class it never saw; drop those rows "
                            "or add training examples")
    if not test_texts:
        raise EvalDataError(f"{test_path}: every text is empty: nothing to evaluate")
    lost = [f"{n} {what} record(s) with an empty text left out" for n, what in
            ((lost_train, "train"), (lost_test, split)) if n]
    return ClassificationData(name or directory.name, train_texts, np.array([code[v] for v in train_labels]),
                              test_texts, np.array([code[v] for v in test_labels]), classes, split,
                              "; ".join(lost) or None)


def experiment_samples(labels: np.ndarray, samples_per_label: int = SAMPLES_PER_LABEL,
                       experiments: int = N_EXPERIMENTS, seed: int = SEED) -> list[np.ndarray]:
    """The training rows of each experiment, drawn as MTEB's ``_undersample_data`` draws them."""
    perm = np.random.RandomState(seed).permutation(len(labels))  # a shuffle from a fresh seed-42 state
    idxs = np.arange(len(labels))
    out = []
    for _ in range(experiments):
        idxs = idxs[perm]
        count: dict[int, int] = {}
        take = []
        for i in idxs:
            c = count.get(labels[i], 0)
            if c < samples_per_label:
                take.append(i)
                count[labels[i]] = c + 1
        out.append(np.array(take, dtype=np.int64))
    return out


def fit_classifier(x: np.ndarray, y: np.ndarray):
    """MTEB's logistic regression, fitted on ``x`` and ``y``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(random_state=SEED, max_iter=MAX_ITER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # MTEB's 100 iterations often stop short
        return clf.fit(x, y)


def scores(train_x: list[np.ndarray], train_y: list[np.ndarray], test_x: np.ndarray,
           test_y: np.ndarray) -> dict[str, float]:
    """Mean accuracy and macro F1 (x100) of one logistic regression per experiment."""
    from sklearn.metrics import accuracy_score, f1_score

    acc, f1, f1w = [], [], []
    for x, y in zip(train_x, train_y):
        pred = fit_classifier(x, y).predict(test_x)
        acc.append(accuracy_score(test_y, pred))
        f1.append(f1_score(test_y, pred, average="macro"))
        f1w.append(f1_score(test_y, pred, average="weighted"))
    return {m: 100.0 * float(np.mean(v)) for m, v in zip(METRICS, (acc, f1, f1w))}


class Prepared:
    """Banking77-style data made ready to score any matrix of its texts' vectors."""

    def __init__(self, data: ClassificationData, *, samples_per_label: int = SAMPLES_PER_LABEL,
                 experiments: int = N_EXPERIMENTS):
        from ..evaluate import unique_texts

        if samples_per_label < 1 or experiments < 1:
            raise EvalDataError(f"--samples-per-label and --experiments must be positive, got "
                                f"{samples_per_label} and {experiments}")
        self.data = data
        self.samples = experiment_samples(data.train_labels, samples_per_label, experiments)
        used = np.unique(np.concatenate(self.samples))
        self.texts, (train_rows, self.test_rows) = unique_texts([data.train_texts[i] for i in used], data.test_texts)
        row_of = dict(zip(used.tolist(), train_rows.tolist()))
        self.sample_rows = [np.array([row_of[i] for i in s], dtype=np.int64) for s in self.samples]
        self.fit_rows = np.unique(train_rows)
        self.fit_label = f"{data.name}/train texts sampled for the classifier ({len(self.fit_rows)}, no labels)"
        self.settings = {"samples_per_label": samples_per_label, "experiments": experiments}
        self.protocol = f"logreg, {samples_per_label} per label x {experiments}"  # in the rows: scores differ by it

    def score(self, m: np.ndarray) -> dict[str, float]:
        y = self.data.train_labels
        return scores([m[r] for r in self.sample_rows], [y[s] for s in self.samples], m[self.test_rows],
                      self.data.test_labels)

    def describe(self) -> str:
        d = self.data
        return (f"{len(d.test_texts):,} {d.split} texts, {len(d.classes)} labels, classifier on "
                f"{self.settings['samples_per_label']} per label x {self.settings['experiments']} experiments")


# --------------------------------------------------------------------------- the probe's labelled items


@dataclass
class LabelledTexts:
    """One split's ``{"text", "label"}`` records: the probe's labelled sample."""

    name: str
    texts: list[str]
    labels: np.ndarray  # int codes into ``classes``
    classes: list = field(default_factory=list)
    split: str = "train"
    left_out: str | None = None

    def __len__(self) -> int:
        return len(self.texts)


def load_split(path: str | Path, split: str | None = "train", *, name: str | None = None) -> LabelledTexts:
    """The ``split`` file of a classification folder, for the probe (which cross-fits on it)."""
    directory = Path(path)
    if not directory.is_dir():
        raise EvalDataError(f"{directory}: classification reads a folder with train and test files, not a file")
    split = split or "train"
    file = find_file(directory, split)
    texts, labels, lost = _split(file)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise EvalDataError(f"{file}: one class ({classes[0] if classes else 'none'}): classification needs at "
                            "least 2 labels")
    code = {c: i for i, c in enumerate(classes)}
    return LabelledTexts(name or directory.name, texts, np.array([code[v] for v in labels]), classes, split,
                         f"{lost} record(s) with an empty text left out" if lost else None)


PROBE_DATA = LabelledTexts
load_labels = load_split


class Items:
    """Labelled texts as the probe's items: each item's output is whether a logistic regression (MTEB's
    settings) fitted on the OTHER folds' vectors and labels predicts its label. ``folds`` must be set
    (``use_folds``) before ``per_item``: the classifier of fold k sees every item outside fold k, and
    nothing of fold k, so every score is held out (the probe's cross-fitting)."""

    kind, metric = "classification", "accuracy"
    learned_mix, unsupervised = False, False

    def __init__(self, data: LabelledTexts):
        from ..evaluate import unique_texts

        self.data = data
        self.texts, (self.rows,) = unique_texts(data.texts)
        self.y = np.asarray(data.labels)
        self.n = len(data)
        self.groups = self.rows  # one text, one group
        self.fold: np.ndarray | None = None

    def use_folds(self, fold: np.ndarray) -> None:
        self.fold = np.asarray(fold)

    def per_item(self, m: np.ndarray, idx: np.ndarray) -> np.ndarray:
        if self.fold is None:
            raise RuntimeError("classification items need their folds (use_folds) before scoring")
        idx = np.asarray(idx)
        out = np.empty(len(idx))
        for k in np.unique(self.fold[idx]):
            here = self.fold[idx] == k
            train = np.flatnonzero(self.fold != k)
            if len(np.unique(self.y[train])) < 2:
                out[here] = (self.y[idx[here]] == self.y[train][0]).astype(float)
                continue
            clf = fit_classifier(m[self.rows[train]], self.y[train])
            out[here] = (clf.predict(m[self.rows[idx[here]]]) == self.y[idx[here]]).astype(float)
        return 100.0 * out

    def score(self, per_item: np.ndarray, idx: np.ndarray | None = None) -> float:
        return float(np.mean(per_item if idx is None else per_item[idx]))

    def bootstrap(self, counts: np.ndarray):
        from .. import stats

        return lambda per_item: stats.mean_bootstrap(per_item, counts)

    def fit_rows(self, idx: np.ndarray) -> np.ndarray:
        """A transform of fold k sees the other folds' texts (no labels), as the classifier does."""
        return np.unique(self.rows[idx])

    @property
    def fit_label(self) -> str:
        return f"{self.data.name}/{self.data.split} texts of the training folds (no labels)"

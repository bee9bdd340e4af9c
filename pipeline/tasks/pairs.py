"""Pair classification: is a pair a paraphrase (duplicate, entailment)? MTEB's protocol exactly.

MTEB (``AbsTaskPairClassification`` with its ``PairClassificationEvaluator``, mteb 1.12, which is
sentence-transformers' ``BinaryClassificationEvaluator``): the two sentences' raw vectors are compared by
four similarity functions: cosine, dot product, and the negated Euclidean and Manhattan distances. For
each, over the pairs sorted by similarity:

- ``accuracy``: the best accuracy of a threshold between two consecutive scores
  (``find_best_acc_and_threshold``);
- ``f1``, ``precision``, ``recall``: at the threshold of the best F1 (``find_best_f1_and_threshold``);
- ``ap``: scikit-learn's ``average_precision_score`` of the labels against the similarity.

Each is reported per function (``cosine_ap``, ``dot_f1``, ...), and accuracy, F1 and AP also as the best
over the four (``max_accuracy``, ``max_f1``, ``max_ap``), x100; the main score is ``max_ap``. Nothing is fitted on the labels: the thresholds
are read off the scored pairs themselves, as MTEB does (its accuracy and F1 are in-sample; AP is not
thresholded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..evaldata import EvalDataError
from . import sts
from .records import data_name, read_records, require, text_of

FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")
MEASURES = ("accuracy", "f1", "precision", "recall", "ap")


@dataclass
class PairsData:
    name: str
    sentence1: list[str]
    sentence2: list[str]
    labels: np.ndarray  # 0 or 1
    split: str = "test"
    left_out: str | None = None

    def __len__(self) -> int:
        return len(self.labels)


def load(path: str | Path, *, name: str | None = None, split: str | None = None) -> PairsData:
    """``{"sentence1", "sentence2", "label"}`` records, label 0 or 1 (``.jsonl``, ``.csv`` or ``.parquet``)."""
    from ..evaldata import _infer_split

    path = Path(path)
    if path.is_dir():
        raise EvalDataError(f"{path}: pairs reads one file of {{sentence1, sentence2, label}} records, not a folder")
    records = read_records(path)
    require(records, path, ("sentence1", "sentence2", "label"))
    s1, s2, labels, lost = [], [], [], 0
    for r in records:
        value = r.fields["label"]
        if isinstance(value, str) and value.strip() in ("0", "1"):
            value = int(value)
        if isinstance(value, float) and value in (0.0, 1.0):
            value = int(value)
        if isinstance(value, bool) or value not in (0, 1) or not isinstance(value, int):
            raise EvalDataError(f"{r.where}: label {value!r} must be 0 or 1 (1: the sentences are paraphrases)")
        a, b = text_of(r, "sentence1"), text_of(r, "sentence2")
        if a is None or b is None:
            lost += 1
            continue
        s1.append(a), s2.append(b), labels.append(value)
    labels = np.array(labels, dtype=np.int64)
    if len(set(labels.tolist())) < 2:
        raise EvalDataError(f"{path}: every pair with two non-empty sentences has label "
                            f"{labels[0] if len(labels) else 'none'}: pair classification needs both 0 and 1")
    return PairsData(name or data_name(path), s1, s2, labels, split or _infer_split(path.stem),
                     f"{lost} pair(s) with an empty sentence left out" if lost else None)


def best_accuracy(scores: np.ndarray, labels: np.ndarray, high_more_similar: bool = True) -> tuple[float, float]:
    """sentence-transformers' ``find_best_acc_and_threshold``: the best accuracy of predicting 1 for the
    first i pairs in similarity order (i < n), and its threshold."""
    order = np.argsort(-scores if high_more_similar else scores, kind="stable")
    s, y = scores[order], labels[order]
    pos = np.cumsum(y == 1)[:-1]
    neg_left = (y == 0).sum() - np.cumsum(y == 0)[:-1]
    acc = (pos + neg_left) / len(y)
    if not len(acc) or acc.max() <= 0:
        return 0.0, -1.0
    i = int(np.argmax(acc))
    return float(acc[i]), float((s[i] + s[i + 1]) / 2)


def best_f1(scores: np.ndarray, labels: np.ndarray, high_more_similar: bool = True
            ) -> tuple[float, float, float, float]:
    """sentence-transformers' ``find_best_f1_and_threshold``: (f1, precision, recall, threshold)."""
    order = np.argsort(-scores if high_more_similar else scores, kind="stable")
    s, y = scores[order], labels[order]
    correct = np.cumsum(y == 1)[:-1]
    extracted = np.arange(1, len(y))
    total = (y == 1).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = correct / extracted
        recall = correct / total
        f1 = np.where(correct > 0, 2 * precision * recall / (precision + recall), 0.0)
    if not len(f1) or f1.max() <= 0:
        return 0.0, 0.0, 0.0, 0.0
    i = int(np.argmax(f1))
    return float(f1[i]), float(precision[i]), float(recall[i]), float((s[i] + s[i + 1]) / 2)


def similarities(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """The four pairwise similarities MTEB compares (distances negated: higher is more similar)."""
    from ..norms import l2_normalize

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cos = np.einsum("ij,ij->i", l2_normalize(a), l2_normalize(b))
    return {"cosine": cos, "dot": np.einsum("ij,ij->i", a, b),
            "euclidean": -np.sqrt(((a - b) ** 2).sum(axis=1)), "manhattan": -np.abs(a - b).sum(axis=1)}


def scores(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score

    out: dict[str, float] = {}
    for fn, sims in similarities(a, b).items():
        acc, _ = best_accuracy(sims, labels)
        f1, precision, recall, _ = best_f1(sims, labels)
        ap = average_precision_score(labels, sims)
        for measure, value in zip(MEASURES, (acc, f1, precision, recall, ap)):
            out[f"{fn}_{measure}"] = 100.0 * float(value)
    for measure in ("accuracy", "f1", "ap"):  # MTEB's "max" scores
        out[f"max_{measure}"] = max(out[f"{fn}_{measure}"] for fn in FUNCTIONS)
    return out


class Prepared:
    def __init__(self, data: PairsData):
        from ..evaluate import unique_texts

        self.data = data
        self.texts, (self.rows1, self.rows2) = unique_texts(data.sentence1, data.sentence2)
        self.fit_rows = None  # every sentence (texts, no labels)
        self.fit_label = f"{data.name}/{data.split} sentences (no labels)"

    def score(self, m: np.ndarray) -> dict[str, float]:
        return scores(m[self.rows1], m[self.rows2], self.data.labels)

    def describe(self) -> str:
        return f"{len(self.data):,} pairs ({int(self.data.labels.sum()):,} positive)"


# --------------------------------------------------------------------------- the probe's labelled items


def weighted_ap(scores: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Average precision (x100) of ``scores`` against 0/1 ``labels`` per row of item multiplicities
    ``counts`` (a bootstrap's resamples): scikit-learn's step-wise AP, ties as one threshold."""
    order = np.argsort(-scores, kind="stable")
    s, y, w = scores[order], labels[order].astype(np.float64), counts[:, order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the end of each run of tied scores
    tp = np.cumsum(w * y, axis=1)[:, last]
    seen = np.cumsum(w, axis=1)[:, last]
    positives = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(seen > 0, tp / seen, 0.0)
        recall = tp / positives
    gain = np.diff(np.c_[np.zeros(len(w)), recall], axis=1)
    return 100.0 * (gain * precision).sum(axis=1)


PROBE_DATA = PairsData


def load_labels(path, split=None) -> PairsData:
    return load(path)


class Items(sts.Items):
    """Labelled pairs as the probe's items, as STS pairs are (their cosine per item, pairs sharing a
    sentence one group, transforms on the training folds' sentences), with labels 0/1 as gold and
    ``cosine_ap`` as the score (the average precision of the labels against the cosine; ``strata eval
    pairs`` also reports the other similarities and their best, ``max_ap``). No learned mix."""

    kind, metric = "pairs", "cosine_ap"
    learned_mix, unsupervised = False, False

    @staticmethod
    def targets(data: PairsData) -> np.ndarray:
        return data.labels

    def score(self, per_item: np.ndarray, idx: np.ndarray | None = None) -> float:
        idx = np.arange(self.n) if idx is None else idx
        y = self.gold[idx]
        if len(np.unique(y)) < 2:
            return float("nan")
        return float(weighted_ap(per_item[idx], y, np.ones((1, len(idx))))[0])

    def bootstrap(self, counts: np.ndarray):
        return lambda per_item: weighted_ap(per_item, self.gold, counts)

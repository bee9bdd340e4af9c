"""Task types as declarations, in MTEB's shape: a task type names its data format and main metric and
scores any matrix of its texts' vectors; evaluators take any encoder.

A task type is one module here and one ``TaskType`` line in ``REGISTRY``. Its module has:

- ``load(path, **options) -> data`` (strict: a bad file is a one-line ``EvalDataError`` naming the
  file and line; empty texts are left out and counted in ``data.left_out``);
- ``Prepared(data, **options)``: ``texts`` (every text to embed, once), ``fit_rows`` and
  ``fit_label`` (the texts a fitted transform may see, never the scored labels), ``score(m) ->
  {metric: value x100}`` for the vectors ``m`` of ``texts``, and ``describe()``.

STS and retrieval keep their own evaluators (``evaluate.evaluate_sts`` / ``evaluate_retrieval``: asymmetric
templates, index-backed and quantised search); their entries say so with ``own_evaluator``.
``strata eval``, ``strata report`` and a job's ``evaluations`` read this registry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskType:
    name: str
    metric: str  # the main score (MTEB's main_score)
    unit: str  # what one item is, for messages
    module: str  # pipeline.tasks.{module}: load, Prepared
    data_help: str
    metric_help: str  # the main score in words, for reports
    own_evaluator: bool = False  # sts, retrieval: evaluate.evaluate_sts / evaluate_retrieval
    learned_mix: bool = False  # its labels can fit a learned mix (--mix-labels); any task scores such a mix
    split_option: bool = False  # --split chooses a file or qrels split of its data (retrieval, classification)

    @property
    def impl(self):
        return importlib.import_module(f"{__name__}.{self.module}")


REGISTRY: dict[str, TaskType] = {t.name: t for t in (
    TaskType("sts", "cosine_spearman", "pairs", "sts", "sts-*.csv or a pairs file (jsonl/tsv/parquet)",
             "Spearman of cosine similarity", own_evaluator=True, learned_mix=True),
    TaskType("retrieval", "ndcg_at_10", "queries", "retrieval", "a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)",
             "nDCG@10, trec_eval", own_evaluator=True, learned_mix=True, split_option=True),
    TaskType("classification", "accuracy", "texts", "classification",
             "a folder with train and test files of {text, label} (jsonl/csv/parquet)",
             "test accuracy of a logistic regression on a few training texts per label", split_option=True),
    TaskType("clustering", "v_measure", "texts", "clustering",
             "a file (or a folder's test file) of {text, label[, set]} (jsonl/csv/parquet)",
             "V-measure of k-means against the labels"),
    TaskType("pairs", "max_ap", "pairs", "pairs", "a file of {sentence1, sentence2, label 0/1} (jsonl/csv/parquet)",
             "average precision, the best of four similarities"),
    TaskType("reranking", "map", "queries", "reranking",
             "a file of {query, positive: [...], negative: [...]} (jsonl/parquet)",
             "mean average precision of each query's candidates"),
)}

MAIN_METRIC = {t.name: t.metric for t in REGISTRY.values()}


def probe_tasks() -> list[str]:
    """The task types ``strata probe`` chooses for: those whose module has ``Items`` and ``load_labels``."""
    return [t.name for t in REGISTRY.values() if hasattr(t.impl, "load_labels")]


def prepare(name: str, path: str | Path, split: str | None = None, **options):
    """A task type's data loaded from ``path`` (its ``split`` file where it takes one) and made ready to score
    (``Prepared``, with its protocol options): what ``strata eval`` and a job's evaluations both score."""
    impl = get(name).impl
    data = impl.load(path, **({"split": split} if split and get(name).split_option else {}))
    return impl.Prepared(data, **options)


def refuse_split(name: str) -> None:
    """``--split`` given to a task type whose data names its own split: one line naming those that take it."""
    takes = [t.name for t in REGISTRY.values() if t.split_option]
    if not get(name).split_option:
        raise ValueError(f"--split applies to {' and '.join(takes)}, not {name}: its split is read from the file name")


def get(name: str) -> TaskType:
    from ..evaldata import EvalDataError

    try:
        return REGISTRY[name]
    except KeyError:
        raise EvalDataError(f"unknown task {name!r}: choose from {', '.join(REGISTRY)}") from None


def infer(path: str | Path) -> str:
    """The task type a data path holds, where its fields tell it unambiguously."""
    from ..evaldata import EvalDataError
    from .records import first_fields

    path = Path(path)
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv", ".txt"):
        with open(path, "rb") as f:
            first = f.readline().decode("utf-8", "replace")
        if len(first.split("\t")) >= 7:
            return "sts"  # the STS Benchmark's own layout: no header, tab-separated
    fields = first_fields(path)
    if "_beir" in fields:
        return "retrieval"
    if {"query", "positive", "negative"} <= fields:
        return "reranking"
    if {"sentence1", "sentence2", "score"} <= fields:
        return "sts"
    if {"sentence1", "sentence2", "label"} <= fields:
        return "pairs"
    if {"text", "label"} <= fields:
        return "classification" if path.is_dir() and "_train" in fields else "clustering"
    raise EvalDataError(f"{path}: cannot tell the task from its fields ({', '.join(sorted(fields)) or 'none'}): "
                        "expected {sentence1, sentence2, score} (sts), {sentence1, sentence2, label} (pairs), "
                        "{text, label} (a folder with train and test: classification; a file: clustering), "
                        "{query, positive, negative} (reranking) or a BEIR folder (retrieval); or name the task")


def check(name: str, path: str | Path) -> None:
    """``--task`` against the data: a one-line error when the data's fields say another task."""
    from ..evaldata import EvalDataError

    try:
        found = infer(path)
    except EvalDataError:
        return  # the task's own loader names what is wrong with the data
    compatible = {("clustering", "classification")}  # a labelled folder can be clustered by its labels
    if found != name and (name, found) not in compatible:
        raise EvalDataError(f"{path}: holds {found} data ({REGISTRY[found].data_help}), not {name}: "
                            f"use `{found}` or other data")

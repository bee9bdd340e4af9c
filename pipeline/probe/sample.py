"""The labelled sample: the budget, the labels' checks, the seeded sample and its size."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np

from ..evaldata import BeirData, StsData
from ..tasks.records import subset
from .defaults import DEFAULT_DOCS, DEFAULT_ITEMS, FOLDS, MIN_PER_FOLD, ProbeError
from .tasks import make_task


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


def check_labels(data, folds: int) -> None:
    """Refuse labels the probe cannot use, naming the problem and the minimum."""
    if not isinstance(data, (StsData, BeirData)):  # classification, clustering, pairs: loaded strictly already
        n, unit = len(data), "pairs" if hasattr(data, "sentence1") else "texts"
        labels = np.asarray(data.labels)
        if len(np.unique(labels)) < 2:
            raise ProbeError(f"{data.name}: every label is the same; the probe needs at least 2")
    elif isinstance(data, StsData):
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


def sample_labels(data, items: int, max_docs: int | None, seed: int = 0):
    """A seeded sample of ``items`` labelled items (all when fewer); retrieval keeps every judged
    document of the sampled queries, then distractors up to ``max_docs``."""
    if not isinstance(data, (StsData, BeirData)):
        if items >= len(data):
            return data
        keep = np.sort(np.random.default_rng(seed).choice(len(data), size=items, replace=False))
        return subset(data, keep)
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


def sample_size(budget: Budget, data, encoder, say, max_docs: int | None = DEFAULT_DOCS) -> int:
    """Items that fit the budget: measured tokens/s on a warm-up, exact token counts per item."""
    n_all = len(data.qrels) if isinstance(data, BeirData) else len(data)
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

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
``report.md`` with heatmaps. The recipe's format, and how it is read and applied, is
``pipeline/recipe.py``.

Modules: ``tasks`` (STS pairs and retrieval queries as labelled items), ``sample`` (budget,
checks, the seeded sample), ``folds`` (cross-fitting), ``scoring`` (every variant's score and
interval), ``choice`` (the tie rule), ``agreement`` (label-free signals against the labels),
``pieces`` (the recipe's pieces refitted on the whole sample), ``report`` (summary, report.md),
``run`` (``run_probe``: the whole probe and its output, the corpus job).
"""

from .agreement import signal_agreement, signal_table
from .choice import Choice, choose
from .defaults import (DEFAULT_DOCS, DEFAULT_ITEMS, FOLDS, MIN_PER_FOLD, MIXES, POOLINGS, SIGNAL_TEXTS, TEMPLATES,
                       TRANSFORMS, ProbeError)
from .folds import Fit, crossfit, fold_ids
from .report import summary_lines, write_probe_report
from .run import encode_with_progress, job_yaml, run_probe
from .sample import Budget, check_labels, sample_labels
from .scoring import Scored, score_variants
from .tasks import make_task

__all__ = ["Budget", "Choice", "DEFAULT_DOCS", "DEFAULT_ITEMS", "FOLDS", "Fit", "MIN_PER_FOLD", "MIXES", "POOLINGS",
           "ProbeError", "SIGNAL_TEXTS", "Scored", "TEMPLATES", "TRANSFORMS", "check_labels", "choose", "crossfit",
           "encode_with_progress", "fold_ids", "job_yaml", "make_task", "run_probe", "sample_labels",
           "score_variants", "signal_agreement", "signal_table", "summary_lines", "write_probe_report"]

"""The probe's defaults (what ``strata probe`` offers) and its error."""

from __future__ import annotations

TEMPLATES = ("plain", "prompteol", "echo")
POOLINGS = "last,mean,wmean,mean_nosink,wmean_nosink"
TRANSFORMS = ("center", "abtt1", "whiten128")
MIXES = "all,50%:100%,learned:all"
FOLDS = 5
MIN_PER_FOLD = 10
DEFAULT_ITEMS = 500  # labelled items sampled (STS pairs / queries): see docs/probe.md "How big a probe sample"
DEFAULT_DOCS = 1000  # retrieval: corpus documents (every judged one, then distractors)
SIGNAL_TEXTS = 512


class ProbeError(ValueError):
    """A probe that cannot run as asked (one line, naming what would work)."""

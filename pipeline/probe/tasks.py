"""The probe's labelled items of each task type: ``Items`` of its module in ``pipeline/tasks/``.

Items have ``texts`` (every unique text to embed), ``n`` items, ``groups`` (items sharing a text: kept in
one fold and resampled together), per-item outputs of a matrix of vectors (``per_item``), the task's score
over items and its bootstrap, the labels of some items (for learned mixes, where ``learned_mix``) and the
texts a transform may be fitted on when other items are scored (``fit_rows``). ``unsupervised`` items
(clustering) use no labels to fit anything: their transforms are fitted on every text and scored on every item.
"""

from __future__ import annotations


def task_name(data) -> str:
    """The task type of loaded labels (the registered module whose ``PROBE_DATA`` they are)."""
    from ..tasks import REGISTRY, probe_tasks

    for name in probe_tasks():
        if isinstance(data, REGISTRY[name].impl.PROBE_DATA):
            return name
    raise TypeError(f"no probe items for {type(data).__name__}")


def make_task(data):
    from ..tasks import get

    return get(task_name(data)).impl.Items(data)

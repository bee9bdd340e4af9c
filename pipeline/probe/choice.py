"""The choice and the tie rule: the top variant, those statistically tied with it, the cheapest of them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import stats
from ..variants import Variant
from .defaults import ProbeError
from .scoring import Scored, ranked

TEMPLATE_COST = {"plain": 0, "prompteol": 1, "echo": 2}


def cost(s: Scored) -> tuple:
    """What a variant costs, compared first to last: the layer the pass must reach, the template,
    the fitted pieces, a mix at all; then the better score."""
    v = s.variant
    fitted = int(v.transform != "none") + int(bool(v.mix) and v.mix.startswith("learned"))
    return (s.depth, TEMPLATE_COST.get(v.template, 3), fitted, int(bool(v.mix)), -s.score)


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
    best_first = [s for s in ranked(scored) if np.isfinite(s.score)]
    if not best_first:
        raise ProbeError("no variant has a defined score on this sample (every similarity is constant)")
    top = best_first[0]
    tied = [s for s in best_first if s is top or not stats.paired(top.samples, s.samples)["significant"]]
    chosen = min(tied, key=cost)
    # the runner-up: the best other variant that is not the same embedding under another name
    # (echo's mean and mean_nosink, say, pool the same span)
    others = [s for s in best_first if s is not chosen and not np.array_equal(s.samples, chosen.samples)]
    runner_up = others[0] if others else None
    default = next((s for s in scored if s.variant == Variant(n_layers, "last")), None)
    return Choice(top, chosen, runner_up, default, tied,
                  stats.paired(chosen.samples, default.samples) if default and default is not chosen else None,
                  stats.paired(chosen.samples, runner_up.samples) if runner_up else None,
                  stats.paired(top.samples, chosen.samples) if top is not chosen else None)


def choice_dict(c: Choice) -> dict:
    """The choice as ``probe.json`` records it (``chosen``)."""
    def name(s):
        return None if s is None else {"variant": s.variant.name, "score": round(s.score, 4),
                                        "low": round(s.low, 4), "high": round(s.high, 4)}

    return {"variant": c.chosen.variant.name, "score": round(c.chosen.score, 4), "low": round(c.chosen.low, 4),
            "high": round(c.chosen.high, 4), "depth": c.chosen.depth, "fitted_on": c.chosen.fitted_on or
            "nothing fitted", "top": name(c.top), "runner_up": name(c.runner_up), "default": name(c.default),
            "tied_with_top": len(c.tied), "tied": [s.variant.name for s in c.tied[:50]],
            "vs_default": c.vs_default, "vs_runner_up": c.vs_runner_up, "top_vs_chosen": c.vs_top}

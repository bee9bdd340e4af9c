"""Label-free signals of every raw cell, and how well each agrees with the labelled scores."""

from __future__ import annotations

import numpy as np

from ..signals import EXPECTED_SIGN, SIGNALS, signals
from ..variants import Variant
from .defaults import SIGNAL_TEXTS
from .scoring import Scored, ranked


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
    cells = [s.variant for s in ranked([s for s in scored if s.variant in table])]  # undefined scores last
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

"""Report: results rows -> ``eval/results.json``, ``report.md`` and one layer x pooling heatmap per dataset.

The rows are the tidy format of DESIGN.md, ``{"task", "dataset", "split", "metric", "layer",
"pooling", "score"}`` with scores x100. The report answers the question Strata exists for:
which (layer, pooling) is best for this model and data, and how much it beats the usual
default, the last layer's last token (``L{N}.last``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .storage import write_json_atomic
from .variants import POOLINGS, Variant

ROW_KEYS = ("task", "dataset", "split", "metric", "layer", "pooling", "score")
RESULTS = Path("eval") / "results.json"


class ResultsError(ValueError):
    """Results rows that do not follow the tidy format."""


def _pooling_rank(name: str) -> tuple[int, str]:
    return (POOLINGS.index(name), name) if name in POOLINGS else (len(POOLINGS), name)


def _row_key(r: dict) -> tuple:
    return (r["task"], r["dataset"], r["split"], r.get("quantization") or "", r.get("protocol") or "", r["metric"], r["template"] != "plain",
            r["template"],
            r["mix"] is not None, r["mix"] or "", r["transform"] != "none", r["transform"], r["layer"],
            _pooling_rank(r["pooling"]))


def _is_raw(r: dict) -> bool:
    return r["mix"] is None and r["transform"] == "none" and "~" not in r["template"]


def validate_rows(rows: Iterable[dict]) -> list[dict]:
    """Rows with checked keys and types, sorted deterministically; duplicates are errors."""
    out, seen = [], set()
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ResultsError(f"results row {i} lacks {', '.join(missing)}: {row}")
        try:
            r = {k: str(row[k]) for k in ("task", "dataset", "split", "metric", "pooling")}
            r["layer"], r["score"] = int(row["layer"]), float(row["score"])
            # rows written before templates, mixes and transforms are raw plain variants
            r["template"], r["mix"] = str(row.get("template") or "plain"), row.get("mix")
            r["transform"] = str(row.get("transform") or "none")
            Variant.from_row(r)
        except (TypeError, ValueError) as e:
            raise ResultsError(f"results row {i}: not a valid variant, or layer not an integer or score not a "
                               f"number ({e}): {row}") from None
        if row.get("fitted_on"):
            r["fitted_on"] = str(row["fitted_on"])
        if row.get("selected_on"):  # a probe recipe scored on the labels it was chosen on
            r["selected_on"] = str(row["selected_on"])
        if row.get("left_out"):  # texts not evaluated (empty documents, pairs with an empty sentence)
            r["left_out"] = str(row["left_out"])
        if row.get("quantization"):  # scored as a quantised (int8/binary) output: its own group
            r["quantization"] = str(row["quantization"])
        if row.get("protocol"):  # how a task type scored (clustering: original or fast): its own group
            r["protocol"] = str(row["protocol"])
        key = _row_key(r)
        if key in seen:
            raise ResultsError(f"results row {i} repeats {r['dataset']}/{r['split']} {r['metric']} "
                               f"{Variant.from_row(r).name}")
        seen.add(key)
        out.append(r)
    return sorted(out, key=_row_key)


def write_results(path: str | Path, rows: list[dict]) -> Path:
    """Replace a results file atomically (``storage.write_json_atomic``)."""
    path = Path(path)
    write_json_atomic(None, path, rows)
    return path


def merge_results(out_dir: str | Path, rows: list[dict]) -> list[dict]:
    """Add rows to ``out_dir/eval/results.json``; a row replaces an older one with the same key."""
    path = Path(out_dir) / RESULTS
    merged = {_row_key(r): r for r in (load_results(path) if path.exists() else [])}
    merged.update({_row_key(r): r for r in validate_rows(rows)})
    out = sorted(merged.values(), key=_row_key)
    write_results(path, out)
    return out


def load_results(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(rows, list):
        raise ResultsError(f"{path}: expected a list of result rows")
    return validate_rows(rows)


def main_metric(task: str, metrics: Iterable[str] = ()) -> str | None:
    """The task's headline metric (MTEB's main score); for an unknown task, a known one present."""
    from .tasks import MAIN_METRIC

    if task.lower() in MAIN_METRIC:
        return MAIN_METRIC[task.lower()]
    return next((m for m in MAIN_METRIC.values() if m in set(metrics)), None)


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows per (task, dataset, split, quantisation, protocol), labelled by dataset alone unless it has
    several splits (``dataset/split``) or is scored by several task types (``dataset (clustering)``);
    quantised scores (``quantization``: int8, binary, ...) and a task's protocols (clustering: original,
    fast) are groups of their own, ``dataset [int8]``, ``dataset [fast]``."""
    def key(r):
        return r["task"], r["dataset"], r["split"], r.get("quantization") or "", r.get("protocol") or ""

    keys = sorted({key(r) for r in rows})
    splits: dict[str, set] = {}
    tasks: dict[str, set] = {}
    for task, dataset, split, _, _ in keys:
        splits.setdefault(dataset, set()).add(split)
        tasks.setdefault(dataset, set()).add(task)
    label = {k: (k[1] if len(splits[k[1]]) == 1 else f"{k[1]}/{k[2]}") + (f" ({k[0]})" if len(tasks[k[1]]) > 1 else "")
             + "".join(f" [{x}]" for x in k[3:] if x) for k in keys}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(label[key(r)], []).append(r)
    return groups


def best_variants(rows: Iterable[dict], n_layers: int | None = None) -> dict[str, dict]:
    """Per dataset: the best variant on the main metric and its gain over ``L{last}.last``.

    ``last`` is ``n_layers`` when given, else the deepest layer present. Ties go to the
    shallower layer (a shallower variant stops the forward pass earlier), then to the
    pooling listed first.
    """
    rows = validate_rows(rows)
    out = {}
    for label, group in _groups(rows).items():
        metric = main_metric(group[0]["task"], (r["metric"] for r in group))
        scored = [r for r in group if r["metric"] == metric and math.isfinite(r["score"])]
        if not scored:
            continue
        best = _best(scored)
        last = n_layers if n_layers is not None else max(r["layer"] for r in group)
        default = next((r for r in scored if r["layer"] == last and r["pooling"] == "last" and _is_raw(r)
                        and r["template"] == "plain"), None)
        out[label] = {
            "task": best["task"], "dataset": best["dataset"], "split": best["split"], "metric": metric,
            "variant": Variant.from_row(best).name, "layer": best["layer"], "pooling": best["pooling"],
            "template": best["template"], "mix": best["mix"], "transform": best["transform"],
            "fitted_on": best.get("fitted_on"), "score": best["score"], "default": Variant(last, "last").name,
            "default_score": default["score"] if default else None,
            "gain": best["score"] - default["score"] if default else None,
        }
    return out


def _best(rows: list[dict]) -> dict:
    """Highest score; ties to the shallower layer (a shallower variant stops the forward pass earlier),
    then to fewer fitted pieces, then to the pooling listed first."""
    return min(rows, key=lambda r: (-r["score"], r["layer"], not _is_raw(r), _pooling_rank(r["pooling"])))


FAMILIES = (
    ("best raw cell", lambda r: _is_raw(r) and r["template"] == "plain"),
    ("best with post-processing", lambda r: r["transform"] != "none" and r["mix"] is None),
    ("best uniform mix", lambda r: (r["mix"] or "").startswith("uniform:")),
    ("best learned mix", lambda r: (r["mix"] or "").startswith("learned:")),
)


def family_rules(rows: list[dict]) -> list[tuple]:
    """(label, membership test) of every family present: FAMILIES, then one per template other than
    plain (a query~document pair included), its raw cells only."""
    def of_template(t):
        return lambda r: r["template"] == t and r["mix"] is None and r["transform"] == "none"

    templates = sorted({r["template"] for r in rows if r["template"] != "plain"})
    return list(FAMILIES) + [(f"best with template {t}", of_template(t)) for t in templates]


def families(rows: list[dict], metric: str, default: float | None) -> list[dict]:
    """The best of each family of variants, with its gain over the default and over the best raw cell."""
    rows = [r for r in rows if r["metric"] == metric and math.isfinite(r["score"])]
    fams = family_rules(rows)
    raw = [r for r in rows if FAMILIES[0][1](r)]
    raw_best = _best(raw)["score"] if raw else None
    out = []
    for label, member in fams:
        found = [r for r in rows if member(r)]
        if not found:
            continue
        b = _best(found)
        out.append({"family": label, "variant": Variant.from_row(b).name, "score": b["score"],
                    "gain_default": None if default is None else b["score"] - default,
                    "gain_raw": None if raw_best is None else b["score"] - raw_best,
                    "fitted_on": b.get("fitted_on") or "nothing fitted"})
    return out


def _grid(rows: list[dict], metric: str, template: str = "plain") -> tuple[list[int], list[str], np.ndarray]:
    cells = {(r["layer"], r["pooling"]): r["score"] for r in rows
             if r["metric"] == metric and _is_raw(r) and r["template"] == template}
    layers = sorted({lay for lay, _ in cells})
    pools = sorted({p for _, p in cells}, key=_pooling_rank)
    grid = np.full((len(layers), len(pools)), np.nan)
    for (lay, p), score in cells.items():
        grid[layers.index(lay), pools.index(p)] = score
    return layers, pools, grid


def _is_best_cell(best: dict | None, metric: str, template: str, layer: int, pooling: str) -> bool:
    return bool(best) and best["metric"] == metric and best["mix"] is None and best["transform"] == "none" \
        and best["template"] == template and (layer, pooling) == (best["layer"], best["pooling"])


def _md_table(rows: list[dict], metric: str, best: dict | None, template: str = "plain") -> str:
    layers, pools, grid = _grid(rows, metric, template)
    lines = ["| layer | " + " | ".join(pools) + " |", "|---:|" + "---:|" * len(pools)]
    for i, lay in enumerate(layers):
        cells = []
        for j, p in enumerate(pools):
            v = grid[i, j]
            text = "–" if math.isnan(v) else f"{v:.2f}"
            cells.append(f"**{text}**" if _is_best_cell(best, metric, template, lay, p) else text)
        lines.append(f"| {lay} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "dataset"


def plot_heatmap(rows: list[dict], metric: str, title: str, path: str | Path, best: dict | None = None,
                 template: str = "plain", marked: set[tuple[int, str]] | None = None) -> Path:
    """Layers down, poolings across, every cell annotated, the best one outlined (one template's raw cells);
    ``marked`` (layer, pooling) cells get a dot (the probe: intervals overlapping the chosen one's)."""
    layers, pools, grid = _grid(rows, metric, template)
    fig = Figure(figsize=(2.6 + 0.95 * len(pools), 1.6 + 0.34 * len(layers)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    finite = grid[np.isfinite(grid)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", vmin=lo, vmax=hi if hi > lo else lo + 1)
    ax.set_xticks(range(len(pools)), labels=pools, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), labels=[str(lay) for lay in layers])
    ax.set_xlabel("pooling")
    ax.set_ylabel("layer")
    for i in range(len(layers)):
        for j in range(len(pools)):
            v = grid[i, j]
            if math.isnan(v):
                ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="#555555")
                continue
            r, g, b, _ = cmap(im.norm(v))
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color=color)
            if marked and (layers[i], pools[j]) in marked:
                ax.plot(j + 0.36, i - 0.22, marker="o", markersize=3.5, color=color)
    if best and best["layer"] in layers and best["pooling"] in pools and \
            _is_best_cell(best, metric, template, best["layer"], best["pooling"]):
        i, j = layers.index(best["layer"]), pools.index(best["pooling"])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#e41a1c", linewidth=2.5))
    fig.colorbar(im, ax=ax, label=f"{metric} (x100)")
    ax.set_title(title, fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path


MIXES = "mixes"  # learned mix weights, one JSON per variant and dataset (written by the evaluators)


def md_cell(text: str) -> str:
    """Text for a Markdown table cell: a transform's ``|`` would end the cell."""
    return text.replace("|", "\\|")


def _families_table(fams: list[dict], b: dict) -> list[str]:
    def gain(x):
        return "–" if x is None else f"{x:+.2f}"

    lines = [f"| family | variant | {b['metric']} | vs `{b['default']}` | vs best raw cell | fitted on |",
             "|---|---|---:|---:|---:|---|"]
    for f in fams:
        lines.append(f"| {f['family']} | `{md_cell(f['variant'])}` | {f['score']:.2f} | "
                     f"{gain(f['gain_default'])} | "
                     f"{gain(f['gain_raw'])} | {f['fitted_on']} |")
    return lines + [""]


def plot_mix(mix: dict, path: str | Path) -> Path:
    """A learned mix's layer weights as a bar chart."""
    fig = Figure(figsize=(1.5 + 0.22 * len(mix["layers"]), 2.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar([str(x) for x in mix["layers"]], mix["weights"], color="#3b6fb6")
    ax.axhline(1.0 / len(mix["layers"]), color="#999999", linewidth=1, linestyle="--", label="uniform")
    ax.set_xlabel("layer")
    ax.set_ylabel("weight")
    ax.legend(fontsize=7)
    ax.set_title(f"{mix['variant']}: learned layer weights", fontsize=9)
    path = Path(path)
    fig.savefig(path)
    return path


def _fmt_gain(b: dict) -> str:
    if b["gain"] is None:
        return f"the default `{b['default']}` was not evaluated, so no gain is given."
    return f"default `{b['default']}` = {b['default_score']:.2f}, gain **{b['gain']:+.2f}**."


def write_report(rows: Iterable[dict], out_dir: str | Path, n_layers: int | None = None) -> dict:
    """Write ``eval/results.json``, ``report.md`` and ``heatmap_{dataset}.png``; returns their paths."""
    rows = validate_rows(rows)
    if not rows:
        raise ResultsError("no results rows to report")
    out_dir = Path(out_dir)
    results_path = write_results(out_dir / RESULTS, rows)

    bests = best_variants(rows, n_layers)
    from .tasks import REGISTRY

    present = [t for t in REGISTRY.values() if any(r["task"] == t.name for r in rows)] or list(REGISTRY.values())[:2]
    mains = ", ".join(f"{t.name} = {t.metric_help} (`{t.metric}`)" for t in present)
    md = ["# Strata evaluation report", "",
          f"Scores x100. Main metrics: {mains}. Best cells are in bold; the default is the last layer's last token. "
          "\"Best\" is picked on these same scores, so it is the top of many on this data (optimistic); "
          "`strata probe` chooses on a labelled sample, with intervals, for scoring elsewhere.",
          ""]
    if bests:
        md += ["| dataset | metric | best variant | score | default | gain |", "|---|---|---|---:|---|---:|"]
        for label, b in bests.items():
            gain = "–" if b["gain"] is None else f"{b['gain']:+.2f}"
            default = "–" if b["default_score"] is None else f"{b['default_score']:.2f}"
            md.append(f"| {label} | {b['metric']} | `{md_cell(b['variant'])}` | {b['score']:.2f} | "
                      f"`{b['default']}` {default} | {gain} |")
        md.append("")
    heatmaps = []
    for label, group in _groups(rows).items():
        b = bests.get(label)
        md += [f"## {label} ({group[0]['task']}, split {group[0]['split']})", ""]
        left = sorted({r["left_out"] for r in group if r.get("left_out")})
        if left:  # empty documents or pairs with an empty sentence: not in these scores
            md += [f"Not evaluated: {'; '.join(left)}.", ""]
        chosen_here = sorted({f"`{Variant.from_row(r).name}` {r['selected_on']}" for r in group if r.get("selected_on")})
        if chosen_here:
            md += [f"Scored on the labels they were chosen on: {'; '.join(chosen_here)}.", ""]
        templates = sorted({r["template"] for r in group if _is_raw(r)}, key=lambda t: (t != "plain", t))
        if b:
            md += [f"Best: **`{b['variant']}`**, {b['metric']} = {b['score']:.2f}; {_fmt_gain(b)}", ""]
            if b.get("fitted_on"):
                md += [f"The best variant's fitted pieces: {b['fitted_on']}.", ""]
            fams = families(group, b["metric"], b["default_score"])
            if any(f["family"] != "best raw cell" for f in fams):
                md += _families_table(fams, b)
            for template in templates:
                suffix = "" if template == "plain" else f"_{_safe(template)}"
                png = out_dir / f"heatmap_{_safe(label)}{suffix}.png"
                plot_heatmap(group, b["metric"], f"{label} ({b['split']}), template {template}: {b['metric']} x100"
                             f"\nbest {b['variant']} = {b['score']:.2f}", png, b, template)
                heatmaps.append(png)
                md += [f"![{label} heatmap, template {template}]({png.name})", ""]
            for path in sorted((out_dir / MIXES).glob("*.json")) if (out_dir / MIXES).is_dir() else []:
                mix = json.loads(path.read_text())
                if mix.get("dataset") == b["dataset"]:
                    png = plot_mix(mix, out_dir / f"mix_{_safe(path.stem)}.png")
                    heatmaps.append(png)
                    md += [f"Learned weights of `{mix['variant']}` ({mix['fitted_on']}):", "",
                           f"![weights of {mix['variant']}]({png.name})", ""]
        else:
            md += ["No finite main-metric score: no best variant.", ""]
        metrics = sorted({r["metric"] for r in group}, key=lambda m: (b is None or m != b["metric"], m))
        for metric in metrics:
            main = " (main)" if b and metric == b["metric"] else ""
            for template in templates if main else templates[:1]:
                title = "" if template == "plain" else f", template {template}"
                md += [f"### {metric}{main}{title}", "", _md_table(group, metric, b, template), ""]
    report_path = out_dir / "report.md"
    report_path.write_text("\n".join(md), encoding="utf-8")
    return {"results": results_path, "report": report_path, "heatmaps": heatmaps}

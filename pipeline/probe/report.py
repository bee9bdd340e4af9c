"""The probe's summary lines and ``report.md`` (ranking, heatmaps, signals, what each piece saw)."""

from __future__ import annotations

from pathlib import Path

from .. import stats
from ..storage import safe_name
from .choice import Choice
from .scoring import Scored


def summary_lines(result: dict) -> list[str]:
    from ..tasks import REGISTRY

    c = result["chosen"]
    lab = result["labels"]
    lines = [f"probe of {result['model']['name']} on {lab['data']}/{lab['split']} ({lab['items']:,} labelled "
             f"{REGISTRY[lab['task']].unit}; {lab['metric']} x100, 95% bootstrap intervals)",
             f"  chosen:  {c['variant']}  {c['score']:.2f} [{c['low']:.2f}, {c['high']:.2f}]  ({c['fitted_on']})"]
    if c["top"]["variant"] != c["variant"]:
        d = c["top_vs_chosen"]
        lines.append(f"  top:     {c['top']['variant']}  {c['top']['score']:.2f}: statistically tied with "
                     f"{c['tied_with_top'] - 1} other(s) (difference [{d['diff_low']:+.2f}, {d['diff_high']:+.2f}]);"
                     f" the chosen one is the cheapest of them (depth {c['depth']})")
    elif c["tied_with_top"] > 1:
        lines.append(f"  tied:    {c['tied_with_top'] - 1} other variant(s) are not significantly worse")
    else:
        lines.append("  no other variant is statistically tied with it")
    if c["default"] and c["vs_default"]:
        d = c["vs_default"]
        lines.append(f"  default: {c['default']['variant']}  {c['default']['score']:.2f}; gain "
                     f"{c['score'] - c['default']['score']:+.2f} [{d['diff_low']:+.2f}, {d['diff_high']:+.2f}]"
                     f"{'' if d['significant'] else ' (not significant)'}")
    if c["runner_up"] and c["vs_runner_up"]:
        d = c["vs_runner_up"]
        lines.append(f"  runner-up: {c['runner_up']['variant']}  {c['runner_up']['score']:.2f}; difference "
                     f"[{d['diff_low']:+.2f}, {d['diff_high']:+.2f}]{'' if d['significant'] else ' (a tie)'}")
    serves = {r["variant"]: r.get("serving") for r in result["ranked"]}
    std = next((r for r in result["ranked"] if r.get("serving") == "standard" and r["score"] is not None), None)
    if std is not None and serves.get(c["variant"]) == "custom":
        lines.append(f"  best standard export: {std['variant']}  {std['score']:.2f} (`strata export probe.json DIR "
                     f"--standard`; the chosen one needs Strata's modules to serve)")
    lines.append("  the chosen score is the best of many on this sample (optimistic): check it on other labels "
                 "with `strata eval ... --recipe probe.json`")
    return lines


def write_probe_report(result: dict, scored: list[Scored], choice: Choice, out: Path) -> Path:
    from ..report import md_cell, plot_heatmap

    metric = result["labels"]["metric"]
    rows = [{"task": result["labels"]["task"], "metric": metric, **s.variant.row_fields, "score": s.score}
            for s in scored]
    win = (choice.chosen.low, choice.chosen.high)
    lines = ["# Probe", "", *[f"    {line}" for line in summary_lines(result)], ""]
    c = result["chosen"]
    lines += ["## Ranking (top 20)", "",
              "`serving`: standard when `strata export` writes the variant with sentence-transformers' own "
              "modules (Text Embeddings Inference and vLLM serve it), custom when it needs Strata's.", "",
              "| rank | variant | score | 95% interval | depth | fitted on | serving |",
              "|---:|---|---:|---|---:|---|---|"]
    for i, r in enumerate([r for r in result["ranked"] if r["score"] is not None][:20], 1):
        mark = " (chosen)" if r["variant"] == c["variant"] else ""
        lines.append(f"| {i} | `{md_cell(r['variant'])}`{mark} | {r['score']:.2f} | [{r['low']:.2f}, {r['high']:.2f}] "
                     f"| {r['depth']} | {md_cell(r['fitted_on'])} | {r.get('serving', '')} |")
    lines += ["", "## Heatmaps", "",
              "Raw cells per template; a dot marks a cell whose 95% interval overlaps the chosen variant's (a "
              "looser test than the paired one that decides ties).", ""]
    for template in dict.fromkeys(s.variant.template for s in scored if s.variant.is_raw):
        marked = {(s.variant.layer, s.variant.pooling) for s in scored
                  if s.variant.is_raw and s.variant.template == template and stats.overlaps((s.low, s.high), win)}
        best = None
        if choice.chosen.variant.is_raw and choice.chosen.variant.template == template:
            best = {"metric": metric, **choice.chosen.variant.row_fields}
        path = plot_heatmap(rows, metric, f"{result['model']['name']} / {result['labels']['data']} ({template})",
                            out / f"heatmap_{safe_name(template)}.png", best, template, marked=marked)
        lines.append(f"![{template}]({path.name})")
    lines += ["", "## Label-free signals", "", f"Computed on {result['signals']['on']}. Spearman x100 between "
              "the signal (signed so that higher should be better) and the labelled score across the raw cells.", "",
              "| signal | Spearman x100, all cells | mean Spearman x100 along each layer curve | best layer right "
              "| the signal's pick | its score | its rank |", "|---|---:|---:|---:|---|---:|---:|"]
    for name, a in result["signals"]["agreement"].items():
        within = "–" if a["within_curves_spearman_x100"] is None else f"{a['within_curves_spearman_x100']:.1f}"
        rho = "–" if a["spearman_x100"] is None else f"{a['spearman_x100']:.1f}"
        lines.append(f"| {name} | {rho} | {within} | {a['same_best_layer']} of {a['curves']} | "
                     f"`{md_cell(a['pick'])}` | {a['pick_score']:.2f} | {a['pick_rank']} of {a['of']} |")
    lines += ["", "## What each piece saw", "",
              f"- Labels: {result['labels']['items']:,} of {result['labels']['of']:,} items of "
              f"{result['labels']['data']}/{result['labels']['split']}, {result['settings']['folds']}-fold "
              "cross-fitting: every fitted variant's score on an item comes from pieces fitted without it.",
              "- The recipe's pieces (`pieces/`) are refitted on the whole sample; evaluate them on other labels "
              "with `strata eval ... --recipe probe.json`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path

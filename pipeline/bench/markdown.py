"""The Markdown report (``BENCHMARKS.md``, ``bench-quick.md``) rendered from the JSON report.

A pure function of the report dict: one table per grid, the batch-token sweep, the Ray
memory-scaling table and the notes.
"""

from __future__ import annotations

from .measure import ratio


def fmt(x, digits=1, unit=""):
    """A number for a table cell: '-' for None, k/M/G/T for large or tiny floats."""
    if x is None:
        return "-"
    if isinstance(x, float) and (abs(x) >= 1e4 or (abs(x) < 1e-2 and x != 0)):
        for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(x) >= div:
                return f"{x / div:.{digits}f} {suffix}{unit}".strip()
        return f"{x:.2e}{unit}"
    return f"{x:.{digits}f}{unit}" if isinstance(x, float) else f"{x}{unit}"


def mib(x):
    return f"{x / 2**20:.0f}" if x else "-"


def to_markdown(report: dict) -> str:
    m, v, st = report["machine"], report["versions"], report["settings"]
    lines = [f"# Strata benchmark{' (quick)' if st['quick'] else ''}", ""]
    lines.append(f"- date: {report['date']}")
    lines.append(f"- command: `{report.get('command') or 'strata bench'}`")
    lines.append(f"- machine: {m.get('cpu')}, {m.get('usable_cpus', m.get('logical_cpus'))} usable CPU cores"
                 + (f", {m['memory_bytes'] / 2**30:.0f} GiB RAM" if m.get("memory_bytes") else "")
                 + (f", GPU {report['hardware'].get('gpu')}" if report.get("hardware", {}).get("gpu") else ""))
    lines.append("- versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "transformers", "ray") if v.get(k))
                 + (f", commit {v['git_commit']}" if v.get("git_commit") else ""))
    d = report.get("data", {})
    lines.append(f"- model: {st['model']} ({st['model_dtype']} on {st['device']}), max length {st['max_length']}; "
                 f"data: {d.get('docs')} SciFact abstracts + {d.get('sentences')} STS-B sentences, shuffled; "
                 f"repeats {st['repeats']} (median), naive/hf batches of {st['batch_size']} in input order")
    hw = report.get("hardware")
    if hw and hw.get("status") == "ok":
        mm = ", ".join(f"{k} {fmt(x['flops_per_second'], 1, 'FLOP/s')} ({x['size']}^2)" for k, x in hw["matmul"].items())
        lines.append(f"- dense matmul peak (torch.matmul, median): {mm}; {hw['threads']} torch threads")
    loads = [r[k] for g in report["grids"] for r in g["modes"].values()
             for k in ("load_average_before", "load_average_after") if r.get(k) is not None]
    if loads:
        lines.append(f"- 1-minute load average around the runs: {min(loads):.1f} to {max(loads):.1f} "
                     f"(other work on the machine slows every mode; CPU seconds per mode are in the JSON)")
    lines.append("")
    for g in report["grids"]:
        dd = g.get("data", {})
        lines.append(f"## Grid `{g['name']}`: layers {','.join(map(str, g['layers']))} x "
                     f"{','.join(g['poolings'])} = {g['n_variants']} variants (deepest {g['deepest']}, "
                     f"{g['depth_fraction']:.0%} of depth)")
        lines.append("")
        if dd:
            lp = dd["length_percentiles"]
            lines.append(f"{dd['rows']} texts, {dd['tokens']} tokens; length p0/p10/p50/p90/p100 = "
                         f"{lp['p0']}/{lp['p10']}/{lp['p50']}/{lp['p90']}/{lp['p100']}, {dd['at_max_length']} at max length.")
            lines.append("")
        lines.append("| mode | passes | seconds | tokens/s | rows/s | padding eff. | peak RSS MiB | load s "
                     "| executed FLOP/s (% peak) | useful FLOP/s (% peak) | CPU s / s | max rel. err vs ref |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for mode, r in g["modes"].items():
            if r.get("status") != "ok":
                why = r.get("reason") or r.get("error") or ""
                lines.append(f"| {mode} | {r.get('status')}: {why} |  |  |  |  |  |  |  |  |  |  |")
                continue
            passes = str(r["passes"])
            if r.get("extrapolated"):
                passes += f" ({r['variants_measured']} timed)"
            ex = (f"{fmt(r['executed_flops_per_second'], 1)} ({r['fraction_of_peak']:.0%})"
                  if r.get("fraction_of_peak") is not None else fmt(r.get("executed_flops_per_second")))
            us = (f"{fmt(r['useful_flops_per_second'], 1)} ({r['useful_fraction_of_peak']:.0%})"
                  if r.get("useful_fraction_of_peak") is not None else fmt(r.get("useful_flops_per_second")))
            err = r.get("max_rel_err")
            errs = "ref" if mode == g.get("reference") else (f"{err:.1e}" if err is not None else "-")
            rss = mib(r.get("peak_rss_bytes"))
            busy = f"{r['cpu_seconds'] / r['seconds']:.2f}" if r.get("cpu_seconds") and r["seconds"] else "-"
            if r.get("peak_tree_pss_bytes"):
                rss += f" (all Ray processes: {mib(r['peak_tree_pss_bytes'])} PSS)"
            lines.append(f"| {mode} | {passes} | {r['seconds']:.2f} | {r['tokens_per_second']:.0f} "
                         f"| {r['rows_per_second']:.2f} | {fmt(r.get('padding_efficiency'), 2)} "
                         f"| {rss} | {fmt(r.get('load_seconds'), 1)} | {ex} | {us} | {busy} | {errs} |")
        lines.append("")
        rat = ", ".join(f"{k} = {x:.2f}x" for k, x in g["ratios"].items() if x is not None)
        lines.append(f"Ratios (tokens/s): {rat or '-'}."
                     + (f" ({', '.join(g['ratios_borrow'])} as timed on grid `{report['grids'][0]['name']}`.)"
                        if g.get("ratios_borrow") else ""))
        ray = g["modes"].get("strata-ray", {})
        if ray.get("status") == "ok":
            lines.append(f"Ray: {ray.get('shards')} Parquet shard(s); start-up {fmt(ray.get('startup_seconds'), 1)} s "
                         f"of {ray['seconds']:.1f} s; steady {fmt(ray.get('steady_tokens_per_second'), 0)} tokens/s "
                         "('-': too few blocks for a steady state).")
        lines.append(f"Reference: {g.get('reference')}; tolerance {g['tolerance']:g} (relative L2 per row).")
        lines.append("")
    bt = report.get("batch_tokens", {})
    if bt.get("status") == "ok":
        default = next((r for r in bt["budgets"] if r["batch_tokens"] == bt["default"]), None)
        lines.append(f"## Batch token budget (strata-encoder, grid `{bt['grid']}`)")
        lines.append("")
        lines.append(f"Padded tokens per forward pass; all budgets interleaved in one process, median of "
                     f"{len(bt['budgets'][0]['seconds_samples'])}. Default {bt['default']}; fastest here {bt['best']}.")
        lines.append("")
        lines.append("| batch tokens | batches | padding eff. | seconds | tokens/s | vs default | peak GPU memory MiB |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in bt["budgets"]:
            rel = ratio(r["tokens_per_second"], default["tokens_per_second"]) if default else None
            lines.append(f"| {r['batch_tokens']} | {r['batches']} | {r['padding_efficiency']:.2f} | {r['seconds']:.2f} "
                         f"| {r['tokens_per_second']:.0f} | {fmt(rel, 2)}{'x' if rel else ''} "
                         f"| {mib(r.get('peak_gpu_memory_bytes'))} |")
        lines.append("")
    ms = report.get("memory_scaling", {})
    lines.append("## Memory scaling (strata-ray)")
    lines.append("")
    if ms.get("status") in ("ok", "failed") and "1x" in ms:
        lines.append("| corpus | rows | seconds | tokens/s | start-up s | steady tokens/s | driver peak RSS MiB "
                     "| tree peak RSS MiB | tree peak PSS MiB |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for k in ("1x", "4x"):
            r = ms[k]
            lines.append(f"| {k} | {r.get('rows', '-')} | {fmt(r.get('seconds'), 1)} | {fmt(r.get('tokens_per_second'), 0)} "
                         f"| {fmt(r.get('startup_seconds'), 1)} | {fmt(r.get('steady_tokens_per_second'), 0)} "
                         f"| {mib(r.get('peak_rss_bytes'))} | {mib(r.get('peak_tree_rss_bytes'))} "
                         f"| {mib(r.get('peak_tree_pss_bytes'))} |")
        rat = ", ".join(f"{k} = {x:.2f}x" for k, x in ms.get("ratios", {}).items() if x is not None)
        if rat:
            lines.append("")
            lines.append(f"Ratios: {rat}. The driver's peak is taken when `embed` returns, before the benchmark "
                         "reads the output back to check it.")
    else:
        lines.append(f"{ms.get('status')}: {ms.get('reason', '')}")
    lines.append("")
    if report["notes"]:
        lines.append("Notes:")
        lines.extend(f"- {n}" for n in report["notes"])
        lines.append("")
    return "\n".join(lines)

"""``strata report``: results table, best variant and layer x pooling heatmaps of an output."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="results table, best variant and layer x pooling heatmaps of an output")
    p.add_argument("dir")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from ..report import load_results, write_report
    from ..storage import Output

    manifest = Output(args.dir).read_manifest() or {}
    n_layers = manifest.get("model", {}).get("n_layers")  # absent in outputs written before it was recorded
    written = write_report(load_results(f"{args.dir}/eval/results.json"), args.dir, n_layers=n_layers)
    print(f"report: {written['report']}")
    for png in written["heatmaps"]:
        print(f"heatmap: {png}")
    return 0

"""``strata demo``: the default model on STS-B test and a SciFact subset: report + heatmaps."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="the default model on STS-B test and a SciFact subset: report + heatmaps")
    p.add_argument("--output", default="demo-output")
    p.add_argument("--quick", action="store_true", help="fewer texts, for a smoke test")
    p.add_argument("--model", default="smollm2-135m", help="the model (default: %(default)s; gemma3-270m is the "
                                                           "second bundled decoder)")
    p.add_argument("--data", default=None,
                   help="evaluation data folder with stsb/sts-test.csv and scifact/ (default: the demo data "
                        "vendored in the package, pipeline/demo_data)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from ..demo import DEMO_DATA, run_demo

    return run_demo(args.output, quick=args.quick, data=Path(args.data) if args.data else DEMO_DATA,
                    model=args.model)

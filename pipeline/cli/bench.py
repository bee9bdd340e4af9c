"""``strata bench``: the parser and the handler are ``pipeline.bench``'s (``add_arguments``, ``run``)."""

from __future__ import annotations


def register(sub) -> None:
    from ..bench import add_arguments, run as cmd_bench

    p = sub.add_parser("bench", help="throughput: naive per-variant passes vs one HF pass vs Strata vs Strata on Ray",
                       description="Measures every mode in one run on the same data; writes JSON and a Markdown table "
                                   "(BENCHMARKS.md for the default run).")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)

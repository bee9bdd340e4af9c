"""``strata run``: the parser and the handler are ``pipeline.jobs``' (``add_run_arguments``, ``cmd_run``)."""

from __future__ import annotations


def register(sub) -> None:
    from ..jobs import add_run_arguments, cmd_run

    p = sub.add_parser("run", help="run a job spec (jobs/*.yaml): embed -> index -> evaluate -> report, versioned",
                       description="Run a job spec; --dry-run prints the plan and writes nothing. Relative paths in "
                                   "the spec resolve against the current directory.")
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)

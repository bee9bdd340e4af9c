"""The entry of ``strata``: the root parser (one subcommand per verb module, each with its ``register``)
and the error routing: every failure is one redacted, bounded line ``strata VERB: error: ...`` on
stderr, its traceback in the log file (and on stderr with ``-v``). Nothing heavy is imported here:
each handler imports the library it calls."""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from . import bench, demo, embed, encode, export, index, probe, report, run, search  # noqa: E402
from . import eval as eval_  # noqa: E402 - the module of `strata eval`, named as its verb

DESCRIPTION = "``strata``: a thin command line over the library. Errors print one line, not a traceback."
VERBS = (encode, embed, index, search, eval_, probe, export, report, demo, bench, run)  # in `strata --help` order
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, TypeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        verb.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .. import errors

    level = logging.INFO if args.verbose else logging.WARNING
    log = errors.LogFile(args.command)
    if not args.verbose:  # Ray's native notices (core_worker.cc ...) go to the log file; -v shows them
        errors.route_native_stderr(log)
    errors.CliLogHandler(log, level).install(level)
    errors.install_sigterm()
    from ..runner import EmbedError
    from ..storage import OutputInUse

    try:
        from .options import use_storage_options

        use_storage_options(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"strata {args.command}: interrupted", file=sys.stderr)
        return 130
    except errors.Terminated:
        print(f"strata {args.command}: terminated", file=sys.stderr)
        return 143
    except Exception as e:  # noqa: BLE001 - every error is one line; the traceback goes to the log file
        cause = errors.unwrap(e)
        expected = isinstance(cause, (*EXPECTED_ERRORS, EmbedError, OutputInUse))
        full = errors.redact_text(errors.describe(cause, expected=expected))
        line = errors.bound(full)
        path = log.exception(e)
        if path is not None:
            log.write(f"error: {full}")
        if (not expected or line != " ".join(full.split())) and path is not None:
            line += f" (details: {path})"
        if args.verbose:
            import traceback

            print(errors.redact_text("".join(traceback.format_exception(type(e), e, e.__traceback__))),
                  end="", file=sys.stderr)
        print(f"strata {args.command}: error: {line}", file=sys.stderr)
        return 2

"""The one-line messages of job specs: ``FILE: FIELD: what was expected``.

pydantic's error list becomes one line naming the field, with the allowed keys and a
did-you-mean for an unknown key; a cross-field ``Problem`` becomes the same kind of line.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from .spec import SECTIONS, TASKS, JobSpec


class JobSpecError(ValueError):
    """A job spec that cannot run; the message is one line: ``FILE: FIELD: what was expected``."""


class Problem(Exception):
    """A cross-field problem found after pydantic validation: (field path, message)."""

    def __init__(self, loc: str, message: str):
        super().__init__(message)
        self.loc, self.message = loc, message


def _loc_text(loc: tuple, data: Any) -> str:
    """('variants', 'poolings', 1) -> 'variants.poolings[1]'; union tags pydantic inserts are dropped."""
    out, node = "", data
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        last = i == len(loc) - 1
        if not last and not (isinstance(node, dict) and part in node):
            continue  # a tag such as 'retrieval' in ('evaluations', 0, 'retrieval', 'split')
        out += f".{part}" if out else str(part)
        node = node.get(part) if isinstance(node, dict) else None
    return out or "(top level)"


def _section_fields(loc: tuple, data: Any) -> list[str]:
    """Allowed keys of the section in which an unknown key was found."""
    section: Any = JobSpec
    node = data
    for part in loc[:-1]:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if section == "evaluations":
                task = node.get("task") if isinstance(node, dict) else None
                section = TASKS.get(task) or "evaluation"
            continue
        if not (isinstance(node, dict) and part in node):
            continue  # a union tag pydantic put in the path
        node = node[part]
        section = "evaluations" if part == "evaluations" else SECTIONS.get(part)
    if section == "evaluation":
        return sorted({f for model in TASKS.values() for f in model.model_fields})
    return list(section.model_fields) if isinstance(section, type) else []


_MISSING_HINTS = {
    ("input",): ": input.location (a Parquet corpus to embed), input.embeddings (an existing output to index or "
                "evaluate), or `input: null` for an evaluation-only job",
    ("name",): ": a name for the job; it names the folder {output}/{name}",
    ("data",): ": the evaluation data (an STS pairs file, a BEIR folder for retrieval, a labelled folder or file "
               "for classification, clustering, pairs or reranking)",
    ("task",): ": " + ", ".join(repr(t) for t in TASKS),
}


def _describe(err: dict, data: Any) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        return "missing (required)" + _MISSING_HINTS.get(tuple(p for p in err["loc"] if isinstance(p, str))[-1:], "")
    if kind == "extra_forbidden":
        key = err["loc"][-1]
        allowed = _section_fields(err["loc"], data)
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key ({hint}expected one of: {', '.join(allowed)})" if allowed else "unknown key"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "literal_error":
        return f"{value!r} is not allowed (choose from {ctx.get('expected')})"
    if kind == "union_tag_invalid":
        return f"unknown task {ctx.get('tag')!r} (choose from {ctx.get('expected_tags')})"
    if kind == "union_tag_not_found":
        return f"missing 'task' (choose from {', '.join(repr(t) for t in TASKS)})"
    expected = {"int_type": "an integer", "int_parsing": "an integer", "float_type": "a number",
                "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
                "dict_type": "a mapping", "model_type": "a mapping", "greater_than": f"a number > {ctx.get('gt')}",
                "greater_than_equal": f"a number >= {ctx.get('ge')}", "too_short": "at least one item"}.get(kind)
    if expected:
        return f"expected {expected}, got {type(value).__name__} {value!r}" if kind != "too_short" else \
            f"expected {expected}"
    return f"{err['msg']} (got {value!r})"


def one_line(source: str, loc: str, message: str, more: int = 0) -> str:
    extra = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
    return f"{source}: {loc}: {message}{extra}".replace("\n", " ")


def validation_line(source: str, data: Any, error: ValidationError) -> str:
    """pydantic's errors of ``data`` (read from ``source``) as one line: the first one, and how many more."""
    errs = error.errors()
    return one_line(source, _loc_text(errs[0]["loc"], data), _describe(errs[0], data), len(errs) - 1)


def short_list(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", … ({len(items)} in all)" if len(items) > n else "")

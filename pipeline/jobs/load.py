"""Reading a job spec: a bounded YAML loader (no ``!!python`` tags, no alias bombs, a page of
text at most), then validation into a ``JobSpec`` with every problem as one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .. import models
from ..stores import set_storage_options
from .checks import check_variants, cross_checks
from .messages import JobSpecError, Problem, one_line, validation_line
from .spec import JobSpec

MAX_SPEC_BYTES = 1 << 20  # a job spec is a page of YAML
MAX_NODES = 100_000  # values once aliases are expanded
MAX_ALIASES = 100  # anchors are handy; thousands of aliases are an alias bomb ("billion laughs")


def parse_spec(data: Any, source: str = "<spec>", *, check_model: bool = True) -> JobSpec:
    """Validate already-parsed YAML; raises JobSpecError with one line."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise JobSpecError(f"{source}: expected a mapping of job settings (name, input, ...), got {got}")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        raise JobSpecError(validation_line(source, data, e)) from None
    spec._source = source
    for url, options in spec.storage.items():  # before anything opens a URL of this job
        set_storage_options(url, options)
    try:
        cross_checks(spec)
        if check_model:
            depth = models.depth(spec.model.spec, trust_remote_code=spec.model.trust_remote_code, load=False) \
                if spec.mode != "existing" else None
            if depth is not None:
                check_variants(spec, depth)
    except Problem as p:
        raise JobSpecError(one_line(source, p.loc, p.message)) from None
    return spec


class SpecLoader(yaml.SafeLoader):
    """``yaml.safe_load`` (no ``!!python`` tags) that refuses alias bombs: more than MAX_ALIASES aliases, or
    more than MAX_NODES values once they are expanded."""

    aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_ALIASES} aliases (*name): refused",
                                                  self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def compose_document(self):
        node = super().compose_document()
        sizes: dict[int, int] = {}

        def size(n) -> int:  # nodes once aliases are expanded; each shared node counted per use
            if id(n) not in sizes:
                sizes[id(n)] = 1  # a recursive alias counts once
                kids = [x for kv in n.value for x in kv] if isinstance(n, yaml.MappingNode) else (
                    n.value if isinstance(n, yaml.SequenceNode) else [])
                sizes[id(n)] = min(1 + sum(size(k) for k in kids), MAX_NODES + 1)
            return sizes[id(n)]

        if node is not None and size(node) > MAX_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_NODES:,} values once its aliases "
                                              "(*name) are expanded: refused (an alias bomb?)", node.start_mark)
        return node


def load_spec(path: str | os.PathLike, *, check_model: bool = True) -> JobSpec:
    """Read and validate a job spec file.

    ``check_model`` also checks the layers against the model's depth when that is cheap to
    know (a built-in alias, or a model directory's config.json); otherwise at run start.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobSpecError(f"{source}: job spec not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JobSpecError(f"{source}: cannot read the job spec ({e})") from None
    if len(text) > MAX_SPEC_BYTES:
        raise JobSpecError(f"{source}: job spec of {len(text):,} characters refused (at most {MAX_SPEC_BYTES:,})")
    try:
        data = yaml.load(text, Loader=SpecLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(top level)"
        problem = getattr(e, "problem", None) or str(e)
        raise JobSpecError(one_line(source, where, f"invalid YAML: {problem}")) from None
    return parse_spec(data, source, check_model=check_model)

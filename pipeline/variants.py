"""What a variant is, and the only place its names are made and parsed (ARCHITECTURE.md).

A ``Variant`` is one embedding a model gives: today a (layer, pooling) cell. Everything
downstream (the writer's columns, manifests, results rows, reports, the bench) is keyed by
``Variant`` and gets its strings from here: ``name`` (``L15.mean``), ``column``
(``emb_15_mean``) and ``row_fields`` (the ``layer``/``pooling`` keys of a results row);
``parse`` and ``from_row`` are the inverses. A new axis (a prompt template, a layer mix, a
fitted transform) is a new field with a default that keeps today's names, and touches this
module and the code that computes it, not the readers.

Layer numbering follows Hugging Face ``hidden_states``: 0 is the embedding output and
N (the model's block count) is the last block, after the final norm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterable, Literal, Sequence, get_args

Pooling = Literal["last", "first", "mean", "wmean", "max", "mean_nosink", "wmean_nosink"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


class SpecError(ValueError):
    """A layer, pooling or variant specification that cannot be satisfied."""


TRANSFORM_NAME = re.compile(r"none|center|abtt[1-9]\d*|whiten[1-9]\d*")
TEMPLATE_NAME = re.compile(r"[a-z][a-z0-9_]*")
_POOL = "|".join(sorted(POOLINGS, key=len, reverse=True))
_NAME = re.compile(r"(?:(?P<t>[a-z][a-z0-9_]*(?:~[a-z][a-z0-9_]*)?)/)?"
                   r"(?:L(?P<l>\d+)|(?P<m>[MW])(?P<lo>\d+)-(?P<hi>\d+))\.(?P<p>" + _POOL + r")"
                   r"(?:\|(?P<x>[a-z0-9]+))?")
_COLUMN = re.compile(r"emb_(?P<l>\d+)_(?P<p>" + _POOL + r")(?:__(?P<t>[a-z][a-z0-9_]*))?")
MIX_KINDS = {"M": "uniform", "W": "learned"}


@dataclass(frozen=True)
class Variant:
    """One embedding: a pooling of one layer (or a mix of layers) under a prompt template, with an
    optional fitted transform. Defaults are today's raw grid cell, whose names never change.

    - ``layer``: the layer; for a mix, its deepest layer (what the forward pass must reach);
    - ``template``: a template name (``plain``, ``prompteol``, ``echo``, ``t_…`` for a user's),
      or ``QUERY~DOC`` for retrieval with asymmetric templates;
    - ``mix``: None, or ``uniform:A-B`` / ``learned:A-B`` over layers A..B of this pooling;
    - ``transform``: ``none``, ``center``, ``abtt{k}`` or ``whiten{k}``.

    Names: ``[TEMPLATE/]L15.mean[|TRANSFORM]``, a mix ``M8-16.mean`` (uniform) or ``W8-16.mean``
    (learned). Only raw variants (no mix, no transform, one template) are stored as columns:
    ``emb_15_mean``, with ``__TEMPLATE`` appended for a template other than ``plain``.
    """

    layer: int
    pooling: str
    template: str = "plain"
    mix: str | None = None
    transform: str = "none"

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise SpecError(f"unknown pooling {self.pooling!r}: choose from {', '.join(POOLINGS)}")
        if not all(TEMPLATE_NAME.fullmatch(t) for t in self.template.split("~")) or self.template.count("~") > 1:
            raise SpecError(f"not a template name: {self.template!r}")
        if not TRANSFORM_NAME.fullmatch(self.transform):
            raise SpecError(f"unknown transform {self.transform!r}: choose from none, center, abtt{{k}}, whiten{{k}}")
        if self.mix is not None:
            kind, lo, hi = self.mix_range
            if kind not in MIX_KINDS.values() or not 0 <= lo <= hi or hi != self.layer:
                raise SpecError(f"not a mix: {self.mix!r} (expected uniform:A-B or learned:A-B ending at layer "
                                f"{self.layer})")

    @property
    def mix_range(self) -> tuple[str, int, int]:
        kind, _, rng = (self.mix or "").partition(":")
        lo, _, hi = rng.partition("-")
        try:
            return kind, int(lo), int(hi)
        except ValueError:
            raise SpecError(f"not a mix: {self.mix!r} (expected uniform:A-B or learned:A-B)") from None

    @property
    def is_raw(self) -> bool:
        """Embedded and stored as a column (not computed from other variants)."""
        return self.mix is None and self.transform == "none" and "~" not in self.template

    @property
    def name(self) -> str:
        if self.mix is None:
            core = f"L{self.layer}.{self.pooling}"
        else:
            kind, lo, hi = self.mix_range
            core = f"{'M' if kind == 'uniform' else 'W'}{lo}-{hi}.{self.pooling}"
        prefix = "" if self.template == "plain" else f"{self.template}/"
        suffix = "" if self.transform == "none" else f"|{self.transform}"
        return prefix + core + suffix

    @property
    def column(self) -> str:
        """The Parquet column of a raw variant."""
        if not self.is_raw:
            raise SpecError(f"{self.name} is computed from stored variants, not stored as a column "
                            f"(it is made from {', '.join(v.name for v in self.sources)})")
        return f"emb_{self.layer}_{self.pooling}" + ("" if self.template == "plain" else f"__{self.template}")

    @property
    def base(self) -> "Variant":
        """This variant before its transform."""
        return replace(self, transform="none")

    @property
    def sources(self) -> tuple["Variant", ...]:
        """The raw variants this one is computed from (itself, for a raw variant)."""
        templates = self.template.split("~")
        if self.mix is None:
            layers = [self.layer]
        else:
            _, lo, hi = self.mix_range
            layers = list(range(lo, hi + 1))
        return tuple(Variant(layer, self.pooling, t) for t in dict.fromkeys(templates) for layer in layers)

    def __str__(self) -> str:
        return self.name

    @property
    def row_fields(self) -> dict:
        """The keys that name this variant in a tidy results row."""
        return {"layer": self.layer, "pooling": self.pooling, "template": self.template, "mix": self.mix,
                "transform": self.transform}

    @classmethod
    def from_row(cls, row: dict) -> "Variant":
        """The variant a results row (or a manifest's variant entry) describes; rows written before
        templates, mixes and transforms existed are raw plain variants."""
        return cls(int(row["layer"]), str(row["pooling"]), row.get("template") or "plain", row.get("mix"),
                   row.get("transform") or "none")

    @classmethod
    def parse(cls, name: "str | Variant") -> "Variant":
        """Parse a name (``L15.mean``, ``prompteol/L30.last``, ``M8-16.mean|whiten128``) or a column
        (``emb_15_mean``, ``emb_30_last__prompteol``); a Variant is returned as is."""
        if isinstance(name, Variant):
            return name
        m = _COLUMN.fullmatch(name)
        if m:
            return cls(int(m["l"]), m["p"], m["t"] or "plain")
        m = _NAME.fullmatch(name)
        if not m:
            raise SpecError(f"not a variant name: {name!r} (expected like 'L15.mean', 'prompteol/L30.last', "
                            f"'M8-16.mean|whiten128' or the column form 'emb_15_mean')")
        template, transform = m["t"] or "plain", m["x"] or "none"
        if m["l"] is not None:
            return cls(int(m["l"]), m["p"], template, None, transform)
        return cls(int(m["hi"]), m["p"], template, f"{MIX_KINDS[m['m']]}:{int(m['lo'])}-{int(m['hi'])}", transform)

    @staticmethod
    def is_column(name: str) -> bool:
        """Whether a Parquet column name is a variant column (``emb_…``)."""
        return name.startswith("emb_")


def _split(spec: str | int | Iterable) -> list[str]:
    if isinstance(spec, int):
        return [str(spec)]
    if isinstance(spec, str):
        return [p.strip() for p in spec.split(",") if p.strip()]
    out: list[str] = []
    for item in spec:
        out.extend(_split(item))
    return out


def _one_layer(token: str, n_layers: int) -> int:
    if token.endswith("%"):
        try:
            frac = float(token[:-1]) / 100.0
        except ValueError:
            raise SpecError(f"layer {token!r}: not a percentage") from None
        if not 0.0 <= frac <= 1.0:
            raise SpecError(f"layer {token!r}: percentage must be within 0%..100%")
        return int(round(frac * n_layers))
    try:
        value = int(token)
    except ValueError:
        raise SpecError(
            f"layer {token!r}: expected an integer, a negative index, 'P%', 'a:b' or 'all'"
        ) from None
    if value < 0:
        value = n_layers + 1 + value  # -1 -> N (the last block), -(N+1) -> 0
    if not 0 <= value <= n_layers:
        raise SpecError(
            f"layer {token} is out of range: this model has layers 0..{n_layers} "
            f"(0 = embeddings, {n_layers} = last block)"
        )
    return value


def parse_layers(spec: str | int | Sequence, n_layers: int) -> list[int]:
    """Resolve a layer spec to sorted unique layer numbers in ``0..n_layers``.

    Accepts integers, negatives (-1 = N), fractions of depth ("50%"), ranges ("8:16",
    inclusive of both ends, each end any of the other forms) and ``all``; comma-separated
    or as a list.
    """
    tokens = _split(spec)
    if not tokens:
        raise SpecError("empty layer spec: name at least one layer (e.g. '-1', '50%', '8:16', 'all')")
    layers: set[int] = set()
    for token in tokens:
        if token == "all":
            layers.update(range(n_layers + 1))
        elif ":" in token:
            lo_s, _, hi_s = token.partition(":")
            if ":" in hi_s:
                raise SpecError(f"layer range {token!r}: expected 'a:b'")
            lo = _one_layer(lo_s or "0", n_layers)
            hi = _one_layer(hi_s or str(n_layers), n_layers)
            if lo > hi:
                raise SpecError(f"layer range {token!r} is empty ({lo} > {hi})")
            layers.update(range(lo, hi + 1))
        else:
            layers.add(_one_layer(token, n_layers))
    return sorted(layers)


def parse_poolings(spec: str | Sequence[str]) -> list[str]:
    names = _split(spec)
    if not names:
        raise SpecError(f"empty pooling list: choose from {', '.join(POOLINGS)}")
    for name in names:
        if name not in POOLINGS:
            raise SpecError(f"unknown pooling {name!r}: choose from {', '.join(POOLINGS)}")
    return list(dict.fromkeys(names))


def make_variants(layers: str | int | Sequence, poolings: str | Sequence[str], n_layers: int,
                  templates: Sequence[str] = ("plain",)) -> tuple[Variant, ...]:
    """The raw grid templates x layers x poolings, in a stable order (by template, layer, then
    pooling order given)."""
    ls = parse_layers(layers, n_layers)
    ps = parse_poolings(poolings)
    return tuple(Variant(layer, pooling, t) for t in templates for layer in ls for pooling in ps)


def parse_mixes(spec: str | Sequence[str] | None, n_layers: int) -> tuple[tuple[str, int, int], ...]:
    """Mix specs -> (kind, lo, hi): ``8:16`` or ``all`` (uniform), ``learned:8:16`` / ``learned:all``.

    Layer ends take any single-layer form (integers, negatives, ``P%``).
    """
    if spec is None:
        return ()
    items = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p).strip() for p in spec]
    out = []
    for item in filter(None, items):
        kind, rng = ("learned", item[len("learned:"):]) if item.startswith("learned:") else ("uniform", item)
        if rng != "all" and ":" not in rng:
            raise SpecError(f"mix {item!r}: expected a layer range 'a:b' or 'all' (optionally 'learned:a:b')")
        layers = parse_layers(rng, n_layers)
        if len(layers) < 2:
            raise SpecError(f"mix {item!r}: a mix needs at least two layers, got {layers}")
        out.append((kind, layers[0], layers[-1]))
    return tuple(dict.fromkeys(out))


def mix_variants(raw: Sequence[Variant], mixes: Sequence[tuple[str, int, int]]) -> tuple[Variant, ...]:
    """One mix variant per (mix, template, pooling) of the raw grid; every layer it needs must be in it."""
    have = set(raw)
    out = []
    for kind, lo, hi in mixes:
        for template, pooling in dict.fromkeys((v.template, v.pooling) for v in raw):
            v = Variant(hi, pooling, template, f"{kind}:{lo}-{hi}")
            missing = [s.layer for s in v.sources if s not in have]
            if missing:
                raise SpecError(f"mix {kind}:{lo}:{hi} needs layers {lo}..{hi}, but layers {missing} are not "
                                f"embedded: add them to --layers (e.g. --layers {lo}:{hi})")
            out.append(v)
    return tuple(out)

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
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence, get_args

Pooling = Literal["last", "first", "mean", "wmean", "max", "mean_nosink", "wmean_nosink"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


class SpecError(ValueError):
    """A layer, pooling or variant specification that cannot be satisfied."""


@dataclass(frozen=True, order=True)
class Variant:
    layer: int
    pooling: str

    @property
    def name(self) -> str:
        return f"L{self.layer}.{self.pooling}"

    @property
    def column(self) -> str:
        return f"emb_{self.layer}_{self.pooling}"

    def __str__(self) -> str:
        return self.name

    @property
    def row_fields(self) -> dict:
        """The keys that name this variant in a tidy results row."""
        return {"layer": self.layer, "pooling": self.pooling}

    @classmethod
    def from_row(cls, row: dict) -> "Variant":
        """The variant a results row (or a manifest's variant entry) describes."""
        return cls(int(row["layer"]), str(row["pooling"]))

    @classmethod
    def parse(cls, name: "str | Variant") -> "Variant":
        """Parse ``L15.mean`` or the column form ``emb_15_mean`` (a Variant is returned as is)."""
        if isinstance(name, Variant):
            return name
        m = re.fullmatch(r"L(\d+)\.([a-z_]+)", name) or re.fullmatch(r"emb_(\d+)_([a-z_]+)", name)
        if not m or m.group(2) not in POOLINGS:
            raise SpecError(f"not a variant name: {name!r} (expected like 'L15.mean' or 'emb_15_mean')")
        return cls(int(m.group(1)), m.group(2))

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


def make_variants(layers: str | int | Sequence, poolings: str | Sequence[str], n_layers: int) -> tuple[Variant, ...]:
    """The grid layers x poolings, in a stable order (by layer, then pooling order given)."""
    ls = parse_layers(layers, n_layers)
    ps = parse_poolings(poolings)
    return tuple(Variant(layer, pooling) for layer in ls for pooling in ps)

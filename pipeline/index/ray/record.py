"""The Ray engine's build record, ``indexes/{variant}.build.json``: what a resumed build may reuse.

Pure types (``BuildKey``, ``BuildRecord``: no file access, no Ray) and the small functions that read
and write them. The record holds:

- ``user`` (``BuildKey``): what must match to reuse the trained quantiser and any part: the options
  as given, the source columns, the dim, and ``fitted``, the digest of the fitted pieces the vectors
  are made with (``index/fitted.py``: transform matrices, mix weights, by content; a refit into the
  same transform path changes it). Any difference starts a new record: retrain, re-encode every part.
- ``options``: the concrete IVF-PQ parameters (``params.ivfpq_options``);
- ``trained_at``: set once ``parts/trained.faiss`` is in place; ``trained_on``: the parts (key ->
  fingerprint) the output held then, against which ``drift`` counts rows added and removed since;
- ``shards``: per committed part (``Shard.key``) its ``Part``: fingerprint (path relative to the
  output, size, rows), label offset, rows and part index file; a part counts as done only once
  recorded here;
- ``allocated`` and ``next_offset``: label ranges handed out, kept across a killed build so its
  parts reuse their range (no hole, nothing twice); a changed part gets a new range.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from ...storage import safe_name, write_json_atomic
from ...variants import Variant
from ..layout import INDEXES, IndexBuildError

VECTORS_SUFFIX = ".f32"  # a part's (and the merged index's) float vectors for exact re-ranking

TRAINED = "trained.faiss"
OPTION_NAMES = ("nlist", "m", "nbits", "nprobe", "train_rows", "seed")


@dataclass(frozen=True)
class Shard:
    """One committed embedding part as the Ray build sees it."""

    rel: str  # the committed part, relative to the output root
    size: int
    rows: int

    @property
    def key(self) -> str:
        return f"{safe_name(Path(self.rel).stem, 40)}-{hashlib.sha256(self.rel.encode()).hexdigest()[:10]}"

    @property
    def fingerprint(self) -> dict:
        return {"rel": self.rel, "size": self.size, "rows": self.rows}


@dataclass(frozen=True)
class BuildKey:
    """What a record was built for; a record is reused only under an equal key."""

    nlist: int | None = None
    m: int | None = None
    nbits: int = 8
    nprobe: int | None = None
    train_rows: int | None = None
    seed: int = 0
    columns: tuple[str, ...] = ()
    dim: int = 0
    fitted: str | None = None  # fitted.pieces_digest of the variant's mix weights and transform

    def to_json(self) -> dict:
        return {**asdict(self), "columns": list(self.columns)}

    @classmethod
    def from_json(cls, d: dict) -> "BuildKey":
        d = dict(d)
        if "fitted" not in d:  # a record from before the digest: it knew the transform's path only
            path = d.get("transform")
            d["fitted"] = None if path is None else f"unknown: transform {path} of an older record"
        return cls(**{k: d.get(k) for k in (*OPTION_NAMES, "dim", "fitted")}, columns=tuple(d.get("columns") or ()))


@dataclass
class Allocation:
    fingerprint: dict
    offset: int
    rows: int


@dataclass
class Part:
    """A part's lists, encoded and recorded: labels ``offset .. offset + rows`` in file ``part``."""

    fingerprint: dict
    offset: int
    rows: int
    part: str
    encoded_at: str = ""
    seconds: float = 0.0

    @property
    def ids_file(self) -> str:
        return str(Path(self.part).with_suffix(".ids.parquet"))

    @property
    def vectors_file(self) -> str:
        """The part's normalised vectors, float32 rows in label order (``tasks.encode_shard``)."""
        return str(Path(self.part).with_suffix(VECTORS_SUFFIX))


def _pick(cls, d: dict):
    return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class BuildRecord:
    key: BuildKey
    options: dict
    shards: dict[str, Part] = field(default_factory=dict)
    allocated: dict[str, Allocation] = field(default_factory=dict)
    next_offset: int = 0
    trained_at: str | None = None
    trained_on: dict[str, dict] = field(default_factory=dict)

    def trained(self, at: str, shards: Iterable[Shard] = ()) -> None:
        """A new quantiser is in place, trained on ``shards``: no list encoded before is valid, no range is kept."""
        self.trained_at, self.shards, self.allocated, self.next_offset = at, {}, {}, 0
        self.trained_on = {s.key: s.fingerprint for s in shards}

    def drift(self, shards: Iterable[Shard]) -> tuple[int, int] | None:
        """(rows added or removed since the quantiser was trained, rows it was trained on), counted by
        part against ``trained_on``; None for a record from before it was kept."""
        if not self.trained_on:
            return None
        now = {s.key: s.fingerprint for s in shards}
        added = sum(fp["rows"] for k, fp in now.items() if self.trained_on.get(k) != fp)
        removed = sum(fp["rows"] for k, fp in self.trained_on.items() if now.get(k) != fp)
        return added + removed, sum(fp["rows"] for fp in self.trained_on.values())

    def reusable(self, shard: Shard) -> Part | None:
        """The recorded part of this shard, if recorded with its current fingerprint."""
        got = self.shards.get(shard.key)
        return got if got is not None and got.fingerprint == shard.fingerprint else None

    def allocate(self, shard: Shard) -> int:
        """The label offset for (re-)encoding ``shard``: its range from a killed build when the
        fingerprint still matches, else a new range (a changed shard's old one is given up)."""
        self.shards.pop(shard.key, None)
        got = self.allocated.get(shard.key)
        if got is not None and got.fingerprint == shard.fingerprint:
            return got.offset
        offset = self.next_offset
        self.next_offset += shard.rows
        self.allocated[shard.key] = Allocation(shard.fingerprint, offset, shard.rows)
        return offset

    def done(self, shard: Shard, offset: int, part: str, at: str, seconds: float = 0.0) -> Part:
        self.shards[shard.key] = Part(shard.fingerprint, offset, shard.rows, part, at, seconds)
        return self.shards[shard.key]

    def forget(self, current: Iterable[str]) -> list[Part]:
        """Drop the ranges and parts of shards no longer committed; returns the dropped parts."""
        current = set(current)
        self.allocated = {k: a for k, a in self.allocated.items() if k in current}
        gone = [p for k, p in self.shards.items() if k not in current]
        self.shards = {k: p for k, p in self.shards.items() if k in current}
        return gone

    @property
    def labels(self) -> int:
        """One past the highest label any recorded part holds."""
        return max((p.offset + p.rows for p in self.shards.values()), default=0)

    def to_json(self) -> dict:
        return {"user": self.key.to_json(), "options": self.options, "trained_at": self.trained_at,
                "trained_on": self.trained_on,
                "next_offset": self.next_offset, "shards": {k: asdict(p) for k, p in self.shards.items()},
                "allocated": {k: asdict(a) for k, a in self.allocated.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "BuildRecord":
        return cls(BuildKey.from_json(d.get("user") or {}), dict(d.get("options") or {}),
                   {k: _pick(Part, p) for k, p in (d.get("shards") or {}).items()},
                   {k: _pick(Allocation, a) for k, a in (d.get("allocated") or {}).items()},
                   int(d.get("next_offset") or 0), d.get("trained_at"), dict(d.get("trained_on") or {}))


def parts_dir(out_dir: Path, v: Variant) -> Path:
    return Path(out_dir) / INDEXES / f"{safe_name(v.name)}.parts"


def build_record_path(out_dir: Path, v: Variant) -> Path:
    return Path(out_dir) / INDEXES / f"{safe_name(v.name)}.build.json"


def read_build_record(out_dir: Path, v: Variant) -> BuildRecord | None:
    """The variant's record, or None. A record is data (copied, restored, edited by hand): every part
    file it names must be a plain file name inside ``{variant}.parts/``, since a build deletes the
    parts of shards that went away; a record that steers elsewhere is refused, naming the entry."""
    p = build_record_path(out_dir, v)
    if not p.is_file():
        return None
    try:
        record = BuildRecord.from_json(json.loads(p.read_text()))
    except (ValueError, TypeError, AttributeError) as e:
        raise IndexBuildError(f"build record {p} cannot be read ({type(e).__name__}: {e}); delete it to "
                              f"rebuild {v.name} from scratch") from None
    for key, part in record.shards.items():
        if part.part in ("", ".", "..") or Path(part.part).name != part.part or "\\" in part.part:
            raise IndexBuildError(f"build record {p}: shard {key!r} names part file {part.part!r}, which is "
                                  f"not a file inside {parts_dir(out_dir, v).name}/; refused (delete the record "
                                  f"to rebuild {v.name} from scratch)")
    return record


def write_build_record(out_dir: Path, v: Variant, record: BuildRecord) -> None:
    write_json_atomic(None, build_record_path(out_dir, v), record.to_json(), sort_keys=True)

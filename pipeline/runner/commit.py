"""The driver's side of exactly-once: per-shard bookkeeping of every row, and the commit that
moves a complete shard's staged parts into ``embeddings/`` and records it in the manifest.
Kept free of Ray so its logic can be tested on its own."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from ..storage import STAGING, Output, redact, utc_now
from ..stores import exists
from .shards import Shard


class EmbedError(RuntimeError):
    """The job could not complete; the message says which shards and why."""


class CommitError(RuntimeError):
    """A shard's staged parts do not add up to its rows: it is not committed."""


@dataclass
class EmbedSummary:
    output: str
    shards_total: int = 0
    shards_embedded: int = 0
    shards_skipped: int = 0
    shards_dropped: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    rows_rejected: int = 0
    rows_reused: int = 0  # committed rows whose vectors were copied (reuse.py): stored, or this run's duplicates
    rows_deduplicated: int = 0  # of those, copies of a text this run embedded once
    rows_dropped: int = 0  # rows the output stops holding: in replaced or removed shards, their text not taken up
    plan_seconds: float = 0.0  # finding the rows to copy
    tokens: int = 0
    padded_tokens: int = 0
    truncated: int = 0
    duplicate_ids: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0
    steady_seconds: float = 0.0

    @property
    def rows_embedded(self) -> int:
        """Rows that went through the model."""
        return self.rows - self.rows_rejected - self.rows_reused

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def steady_tokens_per_second(self) -> float:
        return self.tokens / self.steady_seconds if self.steady_seconds else 0.0

    @property
    def padding_efficiency(self) -> float:
        return self.tokens / self.padded_tokens if self.padded_tokens else 1.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(rows_embedded=self.rows_embedded, tokens_per_second=self.tokens_per_second, steady_tokens_per_second=self.steady_tokens_per_second,
                 padding_efficiency=self.padding_efficiency,
                 rows_per_second=self.rows / self.seconds if self.seconds else 0.0)
        return d

    def line(self) -> str:
        fail = f", {len(self.shards_failed)} FAILED" if self.shards_failed else ""
        return (f"{self.shards_embedded} shards embedded, {self.shards_skipped} skipped, {self.shards_dropped} dropped{fail}; "
                f"{self.rows:,} rows ({self.rows_rejected:,} rejected"
                + (f", {self.rows_reused:,} reused" if self.rows_reused else "") + f"), {self.tokens:,} tokens in {self.seconds:.1f}s "
                f"= {self.tokens_per_second:,.0f} tok/s (steady {self.steady_tokens_per_second:,.0f}, "
                f"Ray start-up {self.startup_seconds:.1f}s), padding efficiency {self.padding_efficiency:.2f}, "
                f"{self.truncated:,} truncated" + (f", {self.duplicate_ids:,} DUPLICATE ids" if self.duplicate_ids else ""))


@dataclass
class _Pending:
    """Per-shard bookkeeping on the driver: every row must be seen exactly once."""

    shard: Shard
    seen: np.ndarray
    parts: list[str] = field(default_factory=list)
    rejects_parts: list[str] = field(default_factory=list)
    crc32: dict[str, str] = field(default_factory=dict)  # part -> CRC-32 of the bytes its writer wrote
    reasons: Counter = field(default_factory=Counter)
    tokens: int = 0
    padded: int = 0
    truncated: int = 0
    reused: int = 0
    error: str | None = None

    def add(self, m: dict) -> None:
        if m["error"]:
            self.error = self.error or m["error"]
            return
        rows = np.asarray(m["rows"], dtype=np.int64)
        if self.seen[rows].any():
            raise EmbedError(f"shard {self.shard.rel}: rows delivered twice ({rows[self.seen[rows]][:5].tolist()}...)")
        self.seen[rows] = True
        self.parts += [m["part"]] if m["part"] else []
        self.rejects_parts += [m["rejects_part"]] if m["rejects_part"] else []
        for name, crc in ((m["part"], m.get("part_crc32")), (m["rejects_part"], m.get("rejects_crc32"))):
            if name and crc:
                self.crc32[name] = crc
        self.reasons.update(m["rejected"] or [])
        self.tokens += m["tokens"]
        self.padded += m["padded"]
        self.truncated += m["truncated"]
        self.reused += m.get("reused") or 0

    @property
    def complete(self) -> bool:
        return bool(self.seen.all())


class Committer:
    """The driver's side of exactly-once: feeds metadata rows, commits each complete shard.

    A shard commits when every one of its rows has been seen exactly once (a row seen twice
    is an error, never a duplicate output); a shard whose read failed is recorded as failed
    and never committed. Kept free of Ray so its logic can be tested on its own.
    """

    def __init__(self, out: Output, manifest: dict, todo: list[Shard], summary: EmbedSummary, run_id: str):
        self.out, self.manifest, self.summary, self.run_id = out, manifest, summary, run_id
        self.pending = {i: _Pending(s, np.zeros(s.rows, dtype=bool)) for i, s in enumerate(todo)}
        self.rows_seen = 0
        self.hold = False  # complete shards wait for ``release`` (their staged parts are being copied from)
        self.written: dict[str, str] = {}  # URL -> CRC-32 of every part this run committed

    def feed(self, m: dict) -> None:
        p = self.pending.get(m["shard"])
        if p is None:
            return  # that shard already failed
        p.add(m)
        self.rows_seen += len(m["rows"] or [])
        self.summary.tokens += m["tokens"] or 0
        self.summary.padded_tokens += m["padded"] or 0
        if p.error:
            self._fail(p, f"read failed: {p.error}")
            del self.pending[m["shard"]]
        elif p.complete and not self.hold:
            self._commit(m["shard"])

    def release(self) -> None:
        """Commit the complete shards ``hold`` kept back."""
        self.hold = False
        for i in [i for i, p in self.pending.items() if p.complete]:
            self._commit(i)

    def _commit(self, i: int) -> None:
        p = self.pending.pop(i)
        try:
            _commit(self.out, self.manifest, p.shard, p, self.run_id)
        except CommitError as e:
            self._fail(p, str(e))
            return
        entry = self.manifest["shards"][-1]
        for name in entry["files"]:
            self.written[self.out.fs.unstrip_protocol(self.out.path(entry["output"], name))] = p.crc32.get(name, "")
        self.summary.shards_embedded += 1
        self.summary.rows += p.shard.rows
        self.summary.rows_rejected += sum(p.reasons.values())
        self.summary.truncated += p.truncated
        self.summary.rows_reused += p.reused

    def parts(self) -> dict[str, str]:
        """URL -> CRC-32 of every part this run wrote: committed, and staged for shards not complete."""
        staged = {self.out.fs.unstrip_protocol(self.out.path(STAGING, self.run_id, p.shard.key, name)): p.crc32.get(name, "")
                  for p in self.pending.values() for name in p.parts}
        return self.written | staged

    def _fail(self, p: _Pending, msg: str) -> None:
        self.summary.shards_failed[p.shard.rel] = msg
        self.manifest.setdefault("failed", {})[p.shard.rel] = msg

    def finish(self) -> None:
        """After the stream ends: any shard still pending lost rows somewhere; say so."""
        for p in self.pending.values():
            missing = int((~p.seen).sum())
            self.summary.shards_failed[p.shard.rel] = f"{missing} row(s) never came back from the pipeline"


def _commit(out: Output, manifest: dict, shard: Shard, p: _Pending, run_id: str | None) -> None:
    """Move a complete shard's staged parts into ``embeddings/`` and record it, with each part's
    rows and bytes, in the manifest; only after checking that every listed part is there and
    that their rows add up to the shard's (``CommitError`` otherwise: nothing is recorded)."""
    staged = out.path(STAGING, run_id or "none", shard.key)
    listed = set(p.parts) | set(p.rejects_parts)
    present = {f.rsplit("/", 1)[-1] for f in out.fs.ls(staged, detail=False)} if exists(out.fs, staged) else set()
    missing = sorted(listed - present)
    if missing:
        raise CommitError(f"shard {shard.rel}: {len(missing)} staged part(s) vanished before the commit (e.g. "
                          f"{STAGING}/{run_id}/{shard.key}/{missing[0]}); not committed, re-run to embed it again")
    for name in present - listed:  # parts of retried tasks are orphans: never committed
        out.fs.rm(f"{staged}/{name}")
    info = out.part_info(staged, sorted(listed))
    for name in listed:  # the writer's checksum, verified whenever the output is read (Output.check_parts)
        if name in p.crc32:
            info[name]["crc32"] = p.crc32[name]
    rejected = sum(p.reasons.values())
    got_written = sum(info[n]["rows"] for n in p.parts)
    got_rejected = sum(info[n]["rows"] for n in p.rejects_parts)
    if got_written != shard.rows - rejected or got_rejected != rejected:
        raise CommitError(f"shard {shard.rel}: staged parts hold {got_written} written + {got_rejected} rejected "
                          f"rows, expected {shard.rows - rejected} + {rejected}; not committed, re-run to embed it again")
    if not listed:
        out.fs.makedirs(staged, exist_ok=True)
        with out.fs.open(f"{staged}/.empty", "wb"):
            pass
    rel = out.commit_dir(staged, shard.key, run_id)
    old = [e for e in manifest["shards"] if e["rel"] == shard.rel]
    manifest["shards"] = [e for e in manifest["shards"] if e["rel"] != shard.rel] + [{
        "path": redact(shard.path), "rel": shard.rel, "fingerprint": shard.fingerprint, "output": rel,
        "files": sorted(p.parts), "rejects_files": sorted(p.rejects_parts), "rows": shard.rows,
        "rows_written": shard.rows - sum(p.reasons.values()), "rows_rejected": sum(p.reasons.values()),
        "rejected_reasons": dict(p.reasons), "tokens": p.tokens, "truncated": p.truncated,
        "rows_reused": p.reused,
        "parts": info, "committed_at": utc_now(),
    }]
    manifest.get("failed", {}).pop(shard.rel, None)
    for e in old:  # the replaced output of a changed shard: retired in the same manifest write
        out.retire(manifest, e["output"])
    out.write_manifest(manifest)



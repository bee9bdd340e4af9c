"""Output layout, the manifest, and atomic commits.

Layout of an output directory (any fsspec URL)::

    manifest.json              the commit point: what is done, from which input, by which model
    embeddings/{key}-{commit}/ part-*.parquet (or *.arrow): id + one column per variant
                               rejects-*.parquet: id, row, reason of rows not embedded
    _staging/                  parts being written; never read, wiped at the start of a run

A shard counts as done only once the manifest lists it; the manifest is replaced atomically
(write aside, then rename), and readers take the file list from it, never from a directory
listing, so a half-written or orphaned file is never read as output.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit, urlunsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings"
STAGING = "_staging"
FORMAT_VERSION = 1
SECRET_QUERY_KEYS = re.compile(r"(token|secret|key|signature|sig|password|credential|auth)", re.I)


def redact(url: str) -> str:
    """A URL safe to log: no user:password@ and no secret-looking query parameters."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        (kv.split("=", 1)[0] + "=***") if SECRET_QUERY_KEYS.search(kv.split("=", 1)[0]) else kv
        for kv in parts.query.split("&") if kv
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def safe_name(text: str, max_len: int = 80) -> str:
    """A file-name-safe form of ``text`` that cannot escape a directory."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"
    return name[:max_len]


def shard_key(rel_path: str) -> str:
    stem = rel_path[: -len(".parquet")] if rel_path.endswith(".parquet") else rel_path
    return f"{safe_name(stem, 60)}-{hashlib.sha256(rel_path.encode()).hexdigest()[:8]}"


@dataclass
class Output:
    """An output directory on any fsspec filesystem."""

    url: str

    def __post_init__(self):
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def check_writable(self) -> None:
        probe = self.path(f".strata-probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except OSError as e:
            raise PermissionError(f"output location {redact(self.url)} is not writable: {e.strerror or e}") from None

    # ------------------------------------------------------------------ manifest
    def read_manifest(self) -> dict | None:
        p = self.path(MANIFEST)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "rb") as f:
            return json.loads(f.read())

    def write_manifest(self, manifest: dict) -> None:
        manifest = dict(manifest, format=FORMAT_VERSION, updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_atomic(self.fs, self.path(MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())

    # ------------------------------------------------------------------ commits
    def commit_dir(self, staged: str, key: str) -> str:
        """Move a shard's staged folder into embeddings/; returns the path relative to the root."""
        rel = f"{EMBEDDINGS}/{key}-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(self.path(EMBEDDINGS), exist_ok=True)
        self.fs.mv(staged, self.path(rel), recursive=True)
        return rel

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def sweep(self, manifest: dict | None) -> list[str]:
        """Remove staging leftovers and embedding folders the manifest does not list."""
        self.remove(STAGING)
        keep = {s["output"] for s in (manifest or {}).get("shards", [])}
        removed = []
        if self.fs.exists(self.path(EMBEDDINGS)):
            for p in self.fs.ls(self.path(EMBEDDINGS), detail=False):
                rel = f"{EMBEDDINGS}/{PurePosixPath(p).name}"
                if rel not in keep:
                    self.fs.rm(p, recursive=True)
                    removed.append(rel)
        return removed

    # ------------------------------------------------------------------ reading
    def embedding_files(self, manifest: dict | None = None) -> list[str]:
        """Full paths of every committed embedding part, in shard then part order."""
        manifest = manifest or self.read_manifest() or {}
        return [self.path(s["output"], f) for s in sorted(manifest.get("shards", []), key=lambda s: s["path"])
                for f in s["files"]]

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """All committed embeddings as one table (for evaluation-sized outputs)."""
        tables = [read_part(self.fs, p, columns) for p in self.embedding_files()]
        if not tables:
            raise FileNotFoundError(f"no committed embeddings under {redact(self.url)}")
        return pa.concat_tables(tables)


def write_atomic(fs, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_part(fs, path: str, table: pa.Table) -> None:
    """Write a Parquet or Arrow IPC part aside, then rename it into place."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        if path.endswith(".arrow"):
            with pa.ipc.new_file(f, table.schema) as w:
                w.write_table(table)
        else:
            pq.write_table(table, f)
    fs.mv(tmp, path)


def read_part(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    if path.endswith(".arrow"):
        with fs.open(path, "rb") as f:
            t = pa.ipc.open_file(f).read_all()
        return t.select(columns) if columns else t
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)

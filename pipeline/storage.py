"""Output layout, the manifest, and atomic commits.

Layout of an output directory (any fsspec URL)::

    manifest.json              the commit point: what is done, from which input, by which model
    embeddings/{key}-{commit}/ part-*.parquet (or *.arrow): id + one column per variant
                               rejects-*.parquet: id, row, reason of rows not embedded
    _staging/                  parts being written; never read, wiped at the start of a run
    _lock.json                 held by the run writing here (host, pid, heartbeat)

A shard counts as done only once the manifest lists it; the manifest is replaced atomically
(write aside, then rename), and readers take the file list from it, never from a directory
listing, so a half-written or orphaned file is never read as output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
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
LOCK = "_lock.json"
LOCK_HEARTBEAT_S = 30.0  # the holder rewrites its lock this often
LOCK_STALE_S = 300.0  # a lock not rewritten for this long belongs to a dead run
FORMAT_VERSION = 1
SECRET_QUERY_KEYS = re.compile(r"(token|secret|key|signature|sig|password|credential|auth)", re.I)


def utc_now() -> str:
    """The current time as recorded in manifests, locks and job files (ISO 8601, UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class OutputInUse(RuntimeError):
    """Another live run holds the output location."""


def redact(url: str) -> str:
    """A URL safe to log: no user:password@ and no secret-looking query parameters."""
    if "://" not in url:  # a scheme-less path (``key:secret@bucket/x``, as fsspec strips it) or plain text
        from .errors import redact_text

        return redact_text(url)
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

    # ------------------------------------------------------------------ one run at a time
    @contextlib.contextmanager
    def lock(self):
        """Hold this output for one run; a second run is refused while the first lives.

        The lock names its holder and is rewritten every ``LOCK_HEARTBEAT_S``. A lock left by a
        dead run (its process is gone from this host, or it has not been rewritten for
        ``LOCK_STALE_S``) is taken over, so a crashed run never blocks the next one for long.
        """
        path = self.path(LOCK)
        holder = self.read_json(LOCK)
        if holder and not _lock_is_stale(holder):
            age = time.time() - float(holder.get("heartbeat", 0))
            raise OutputInUse(f"{redact(self.url)} is in use by another run (host {holder.get('host')}, "
                              f"pid {holder.get('pid')}, started {holder.get('started')}, alive {age:.0f}s ago); "
                              f"wait for it to finish, or remove {path} if that run is dead")
        me = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "started": utc_now()}

        def beat() -> None:
            self.write_json(LOCK, dict(me, heartbeat=time.time()))

        def mine() -> bool:
            return (self.read_json(LOCK) or {}).get("token") == me["token"]

        beat()
        if not mine():  # another run wrote in between
            raise OutputInUse(f"{redact(self.url)}: another run took the lock at the same moment; retry later")
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(LOCK_HEARTBEAT_S):
                if not mine():
                    return  # taken over (this run was stalled past LOCK_STALE_S): stop claiming it
                beat()

        thread = threading.Thread(target=loop, name="strata-output-lock", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            if mine():
                self.fs.rm(path)

    # ------------------------------------------------------------------ JSON files, manifest
    def read_json(self, rel: str):
        """A JSON file under the root, or None where there is none."""
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def write_json(self, rel: str, obj) -> None:
        """Replace a JSON file under the root atomically (its folder is made if needed)."""
        path = self.path(rel)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        write_atomic(self.fs, path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())

    def read_manifest(self) -> dict | None:
        return self.read_json(MANIFEST)

    def write_manifest(self, manifest: dict) -> None:
        self.write_json(MANIFEST, dict(manifest, format=FORMAT_VERSION, updated_at=utc_now()))

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


def _lock_is_stale(holder: dict) -> bool:
    if time.time() - float(holder.get("heartbeat", 0)) > LOCK_STALE_S:
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True  # that process is gone
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
    return False


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

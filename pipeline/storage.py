"""Output layout, the manifest, and atomic commits.

Layout of an output directory (any fsspec URL)::

    manifest.json              the commit point: what is done, from which input, by which model
    embeddings/{key}-{commit}/ part-*.parquet (or *.arrow): id + one column per variant
                               rejects-*.parquet: id, row, reason of rows not embedded
    _staging/{run id}/         parts being written; never read; a run's folder is removed at its
                               end, or by the next run (the manifest's ``runs`` names it)
    _lock.json                 held by the run writing here (host, pid, heartbeat), created atomically

Strata removes only what its manifest or its own run ids name: other files under ``_staging/``
or ``embeddings/`` are left alone, and a non-empty folder that is not a Strata output is refused.
The manifest records each committed part's rows and bytes; a part that no longer matches is
named on read (``DamagedOutput``) and its shard re-embedded on resume.

A shard counts as done only once the manifest lists it; the manifest is replaced atomically
(write aside, then rename), and readers take the file list from it, never from a directory
listing, so a half-written or orphaned file is never read as output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec
import pyarrow as pa

from .errors import redact_text as redact  # a URL or any text safe to log (the one redaction)
from .parts import DamagedOutput, file_crc32, part_rows, read_part
from .stores import MissingBucket, check_bucket, exists, filesystem, is_glob, is_local

MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings"
STAGING = "_staging"
LOCK = "_lock.json"
RETIRED = "retired"  # manifest key: committed folders no longer current, kept for published versions
LOCK_HEARTBEAT_S = 30.0  # the holder rewrites its lock this often
LOCK_STALE_S = 300.0  # a lock not rewritten for this long belongs to a dead run
FORMAT_VERSION = 1


def utc_now() -> str:
    """The current time as recorded in manifests, locks and job files (ISO 8601, UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class OutputInUse(RuntimeError):
    """Another live run holds the output location."""


# What Strata itself puts in an output, a job version folder or an evaluation cache: a folder
# holding only these (and no manifest yet) is still Strata's to write into.
STRATA_NAMES = frozenset({"manifest.json", "_lock.json", "_staging", "embeddings", "indexes", "quantization",
                          "transforms", "mixes", "inputs", "eval", "eval-cache", "version.json", "job.json",
                          "report.md", "probe.json", "pieces", "LATEST"})
STRATA_PREFIXES = (".strata-probe-", "manifest.json.tmp-", "_lock.json.", "heatmap_", "mix_")


def _local_real(fs, path: str) -> str:
    return os.path.realpath(path) if is_local(fs) else path


def overlap(input_url: str, output_url: str) -> str | None:
    """How INPUT and OUTPUT overlap (one is, or is inside, the other), or None. An evaluation
    cache's own staged texts (``OUTPUT/inputs``) are the one input allowed inside an output."""
    fs_in, p_in = filesystem(input_url)
    fs_out, p_out = filesystem(output_url)
    if type(fs_in) is not type(fs_out):
        return None
    if is_glob(fs_in, p_in):
        p_in = p_in.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
    a, b = _local_real(fs_in, p_in).rstrip("/"), _local_real(fs_out, p_out).rstrip("/")
    if a == b:
        return "INPUT and OUTPUT are the same location"
    if a == f"{b}/inputs":
        return None
    if b.startswith(a + "/"):
        return "OUTPUT is inside INPUT"
    if a.startswith(b + "/"):
        return "INPUT is inside OUTPUT"
    return None


def overlap_message(input_url: str, output_url: str) -> str | None:
    """The one-line refusal of an INPUT and OUTPUT that ``overlap``, or None."""
    problem = overlap(input_url, output_url)
    if problem is None:
        return None
    return (f"{problem} (INPUT {redact(input_url)}, OUTPUT {redact(output_url)}): Strata would read its own output "
            f"as input or sweep your input; use an output location outside the input")


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
        self.fs, self.root = filesystem(self.url)
        self.root = self.root.rstrip("/")
        if not is_local(self.fs):  # listings cached by an earlier Output of this process may be stale
            self.fs.invalidate_cache(self.root)

    def path(self, *parts: str) -> str:
        """A path under the root. A manifest's entries may step up (a published version's
        ``../../embeddings/...``) but never out of the folder the manifest declares as its
        ``data_root`` (default: the root itself): a manifest is data and never steers reads or
        deletions elsewhere."""
        joined = "/".join([self.root, *parts])
        if ".." not in joined.split("/"):
            return joined
        normal = posixpath.normpath(joined)
        base = self._base()
        if normal != base and not normal.startswith(base.rstrip("/") + "/"):
            raise DamagedOutput(f"{redact(self.url)}: path {'/'.join(parts)!r} points outside "
                                f"{'the output' if base == self.root else 'its data root'}; refused")
        return normal

    def check_writable(self) -> None:
        probe = self.path(f".strata-probe-{uuid.uuid4().hex}")
        if self.fs.isfile(self.root):
            raise NotADirectoryError(f"output location {redact(self.url)} is a file, not a directory")
        try:
            check_bucket(self.fs, self.root, self.url)  # before makedirs, which would create it
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except MissingBucket:
            raise
        except OSError as e:
            raise PermissionError(f"output location {redact(self.url)} is not writable: {e.strerror or e}") from None

    # ------------------------------------------------------------------ one run at a time
    @contextlib.contextmanager
    def lock(self, *, break_lock: bool = False):
        """Hold this output for one run; a second run is refused while the first lives.

        The lock names its holder and is rewritten every ``LOCK_HEARTBEAT_S``. A lock left by a
        dead run (its process is gone from this host, or it has not been rewritten for
        ``LOCK_STALE_S``) is taken over, so a crashed run never blocks the next one for long; an
        unreadable (empty, cut short) lock is stale after the same time. ``break_lock`` takes over
        any lock at once: for a holder known to be dead (a crashed pod on another host), whose
        details the refusal gave.
        """
        lock_url = f"{self.url.rstrip('/')}/{LOCK}"
        me = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "started": utc_now()}

        def beat() -> None:
            self.write_json(LOCK, dict(me, heartbeat=time.time()))

        def mine() -> bool:
            try:
                return (self.read_json(LOCK) or {}).get("token") == me["token"]
            except ValueError:  # a lock being created right now: not ours
                return False

        def refuse(why: str) -> OutputInUse:
            return OutputInUse(f"{redact(self.url)}: {why}; a lock not renewed for {LOCK_STALE_S / 60:.0f} min is "
                               f"taken over by the next run; if its holder is dead, take it now with --break-lock "
                               f"(lock file {redact(lock_url)})")

        self.fs.makedirs(self.root, exist_ok=True)
        for attempt in range(2):
            if self._create_lock(dict(me, heartbeat=time.time())):
                break
            try:
                holder = self.read_json(LOCK)
            except ValueError:  # being created this very moment, or an empty/cut-short file
                holder = {"unreadable": True, "heartbeat": self._lock_mtime()}
            if holder is None:
                continue  # released between our attempt and the read: try once more
            if break_lock:
                logging.getLogger(__name__).warning(
                    "breaking the lock of %s held by host %s, pid %s, started %s", redact(self.url),
                    holder.get("host"), holder.get("pid"), holder.get("started"))
            elif not _lock_is_stale(holder):
                age = time.time() - float(holder.get("heartbeat", 0))
                if holder.get("unreadable"):
                    raise refuse(f"its lock cannot be read (being written by another run, or left empty "
                                 f"{age:.0f}s ago)")
                raise refuse(f"in use by another run (host {holder.get('host')}, pid {holder.get('pid')}, "
                             f"started {holder.get('started')}, alive {age:.0f}s ago)")
            self._take_stale_lock(holder)
        else:
            raise refuse("another run took the lock at the same moment")
        if not mine():  # a store without atomic create: another run wrote in between
            raise refuse("another run took the lock at the same moment")
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
                self.fs.rm(self.path(LOCK))

    def _create_lock(self, obj: dict) -> bool:
        """Create the lock file only if there is none (atomic: ``open(..., "xb")`` is O_EXCL on a
        local disk, a conditional put (If-None-Match) on stores whose fsspec driver has one, e.g.
        s3fs, gcsfs). Where a store has no atomic create the lock falls back to write then read
        back, which narrows but does not close the race between two runs starting together."""
        data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
        try:
            with self.fs.open(self.path(LOCK), "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):  # no exclusive mode on this store
            if exists(self.fs, self.path(LOCK)):
                return False
            write_atomic(self.fs, self.path(LOCK), data)
            return True

    def _lock_mtime(self) -> float:
        """When the lock file was last written (0 where the store cannot say)."""
        try:
            m = self.fs.modified(self.path(LOCK))
            return m.timestamp()
        except (OSError, NotImplementedError, AttributeError, ValueError):
            return 0.0

    def _take_stale_lock(self, holder: dict) -> None:
        """Move a dead run's lock aside; only the run that moved exactly that lock goes on."""
        aside = self.path(f"{LOCK}.stale-{uuid.uuid4().hex[:8]}")
        try:
            self.fs.mv(self.path(LOCK), aside)
        except FileNotFoundError:
            return  # another run moved it first; the exclusive create decides between us
        try:
            with self.fs.open(aside, "rb") as f:
                moved = json.loads(f.read())
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") != holder.get("token"):  # we moved a live run's fresh lock: give it back
            with contextlib.suppress(OSError, ValueError, NotImplementedError):
                if self._create_lock(moved):
                    self.fs.rm(aside)
                    raise OutputInUse(f"{redact(self.url)}: another run took the lock at the same moment; "
                                      "retry later")
        self.fs.rm(aside)

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
        """The manifest (None where there is none), refused in one line, naming the file, when it is
        not JSON, not a manifest, or of a format this Strata does not write."""
        where = f"{redact(self.url)}/{MANIFEST}"
        try:
            manifest = self.read_json(MANIFEST)
        except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
            raise DamagedOutput(f"{where} is not valid JSON ({e}); restore it, or embed into a new output") from None
        if manifest is not None:
            if not isinstance(manifest, dict) or not isinstance(manifest.get("shards", []), list):
                raise DamagedOutput(f"{where} is not a Strata manifest (a JSON {type(manifest).__name__} without a "
                                    "list of shards)")
            fmt = manifest.get("format", FORMAT_VERSION)
            if fmt != FORMAT_VERSION:
                raise DamagedOutput(f"{where} has format {fmt!r}; this version of Strata reads and writes format "
                                    f"{FORMAT_VERSION} only")
        self._set_base(manifest)
        return manifest

    def _set_base(self, manifest: dict | None) -> None:
        data_root = (manifest or {}).get("data_root")
        if data_root and data_root != "../..":
            raise DamagedOutput(f"{redact(self.url)}: {MANIFEST} has data_root {data_root!r}; a published "
                                "version's is '../..'")
        # a published version of a job (pipeline/jobs/versions.py): its parts are in the series folder above
        self.base = posixpath.normpath(f"{self.root}/{data_root}") if data_root else self.root

    def _base(self) -> str:
        if getattr(self, "base", None) is None:
            try:
                self._set_base(self.read_json(MANIFEST))
            except ValueError:
                self.base = self.root
        return self.base

    def write_manifest(self, manifest: dict) -> None:
        self.write_json(MANIFEST, dict(manifest, format=FORMAT_VERSION, updated_at=utc_now()))

    # ------------------------------------------------------------------ commits
    def commit_dir(self, staged: str, key: str, run_id: str | None = None) -> str:
        """Move a shard's staged folder into embeddings/ as ``{key}-{run id}`` (the sweep knows
        its own folders by that run id); returns the path relative to the root."""
        rel = f"{EMBEDDINGS}/{key}-{run_id or uuid.uuid4().hex[:8]}"
        self.fs.makedirs(self.path(EMBEDDINGS), exist_ok=True)
        if is_local(self.fs):
            self.fs.mv(staged, self.path(rel), recursive=True)  # one rename
            return rel
        # An object store has no folders and no rename: copy each staged object by its own key,
        # then delete the staged ones. The folder is not committed until the manifest names it.
        staged = staged.rstrip("/")
        objects = [p for p in self.fs.find(staged) if p.startswith(staged + "/")]
        for src in objects:
            self.fs.copy(src, self.path(rel, src[len(staged) + 1:]))
        self.fs.rm(objects)
        return rel

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if exists(self.fs, p):
            self.fs.rm(p, recursive=True)

    def retire(self, manifest: dict, rel: str) -> None:
        """A replaced or dropped shard's committed folder: listed in ``retired`` and left in place, so
        the run can still copy its vectors (``runner/reuse.py``) and a crash leaks nothing. At the
        run's end ``free_retired`` removes it, unless published versions may still reference it
        (``manifest["retain_replaced"]``, set by jobs: the job's garbage collection removes it,
        ``pipeline/jobs/versions.py``)."""
        if rel not in manifest.setdefault(RETIRED, []):
            manifest[RETIRED].append(rel)

    def free_retired(self, manifest: dict) -> None:
        """Remove the retired folders of an output that keeps none (not ``retain_replaced``)."""
        if manifest.get("retain_replaced"):
            return
        for rel in manifest.get(RETIRED, []):
            self.remove(rel)
        manifest.pop(RETIRED, None)

    def sweep(self, manifest: dict | None) -> list[str]:
        """Remove what Strata's own earlier runs left behind, and nothing else: the staging
        folders of the run ids the manifest records (``runs``), and embedding folders named by
        one of those runs that the manifest does not list (a commit cut short before the
        manifest was written). Anything else under ``_staging/`` or ``embeddings/`` is not
        Strata's and is left alone."""
        runs = [r for r in (manifest or {}).get("runs", []) if r]
        keep = {s["output"] for s in (manifest or {}).get("shards", [])} | set((manifest or {}).get(RETIRED, []))
        removed = []
        for r in runs:
            rel = f"{STAGING}/{r}"
            if exists(self.fs, self.path(rel)):
                self.fs.rm(self.path(rel), recursive=True)
                removed.append(rel)
        self.remove_if_empty(STAGING)
        if runs and exists(self.fs, self.path(EMBEDDINGS)):
            for p in self.fs.ls(self.path(EMBEDDINGS), detail=False):
                name = PurePosixPath(p).name
                rel = f"{EMBEDDINGS}/{name}"
                if rel not in keep and any(name.endswith(f"-{r}") for r in runs):
                    self.fs.rm(p, recursive=True)
                    removed.append(rel)
        return removed

    def remove_if_empty(self, rel: str) -> None:
        p = self.path(rel)
        with contextlib.suppress(OSError):
            if self.fs.isdir(p) and not self.fs.ls(p, detail=False):
                self.fs.rmdir(p)

    def check_is_strata_output(self) -> None:
        """Refuse a folder that is neither empty nor a Strata output (before any work): Strata
        must never mix its files with, or sweep, someone else's."""
        if exists(self.fs, self.path(MANIFEST)) or not self.fs.isdir(self.root):
            return
        foreign = sorted(n for n in (PurePosixPath(p).name for p in self.fs.ls(self.root, detail=False))
                         if n not in STRATA_NAMES and not n.startswith(STRATA_PREFIXES))
        if foreign:
            raise ValueError(f"output {redact(self.url)} is not empty and is not a Strata output (no {MANIFEST}; "
                             f"it holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): "
                             "use an empty or new output location")

    def part_info(self, folder: str, names: list[str]) -> dict[str, dict]:
        """Rows and bytes of each part in ``folder`` (a full path), read from the files themselves."""
        info = {}
        for n in names:
            path = f"{folder}/{n}"
            info[n] = {"rows": part_rows(self.fs, path), "bytes": int(self.fs.info(path)["size"])}
        return info

    def damaged_parts(self, entry: dict, *, rows: bool = False, checksums: bool = False) -> list[str]:
        """The parts of a committed shard that are missing or differ from what the manifest
        recorded at commit (size; with ``checksums`` the CRC-32 of every byte, which reads each part
        whole; with ``rows`` also the row count). Entries written before parts were recorded (no
        ``parts``) are checked for existence only, and parts without a ``crc32`` for size and rows."""
        recorded = entry.get("parts") or {}
        bad = []
        for n in list(entry.get("files", [])) + list(entry.get("rejects_files", [])):
            path = self.path(entry["output"], n)
            try:
                size = int(self.fs.info(path)["size"])
            except FileNotFoundError:
                bad.append(f"{entry['output']}/{n} is missing")
                continue
            want = recorded.get(n)
            if want is None:
                continue
            if size != want["bytes"]:
                bad.append(f"{entry['output']}/{n} has {size} bytes, the manifest recorded {want['bytes']}")
            elif checksums and want.get("crc32") and file_crc32(self.fs, path) != want["crc32"]:
                bad.append(f"{entry['output']}/{n} does not match its checksum (CRC-32 {want['crc32']} at commit): "
                           f"its bytes changed since")
            elif rows:
                try:
                    got = part_rows(self.fs, path)
                except Exception as e:  # noqa: BLE001 - any unreadable part is damaged
                    bad.append(f"{entry['output']}/{n} cannot be read ({type(e).__name__})")
                    continue
                if got != want["rows"]:
                    bad.append(f"{entry['output']}/{n} has {got} rows, the manifest recorded {want['rows']}")
        return bad

    def check_parts(self, manifest: dict | None = None, read: set[str] | None = None) -> None:
        """Raise ``DamagedOutput`` naming the first damaged committed part (before reading any): size,
        rows and checksum, so a flipped byte is never served (the cost: BENCHMARKS.md). ``read``: the
        files (relative to the root) whose vectors will be read; only their shards' parts are
        checksummed (every byte read), the others checked for size and rows."""
        manifest = manifest or self.read_manifest() or {}
        for entry in sorted(manifest.get("shards", []), key=lambda s: s["path"]):
            sums = read is None or any(f"{entry['output']}/{f}" in read for f in entry["files"])
            bad = self.damaged_parts(entry, rows=True, checksums=sums)
            if bad:
                raise DamagedOutput(f"{redact(self.url)}: committed part {bad[0]}: the output is damaged; "
                                    f"re-run `strata embed` to re-embed shard {entry['rel']}")

    # ------------------------------------------------------------------ reading
    def embedding_files(self, manifest: dict | None = None) -> list[str]:
        """Full paths of every committed embedding part, in shard then part order."""
        manifest = manifest or self.read_manifest() or {}
        return [self.path(s["output"], f) for s in sorted(manifest.get("shards", []), key=lambda s: s["path"])
                for f in s["files"]]

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """All committed embeddings as one table (for evaluation-sized outputs); a damaged part
        (missing, or not what the manifest recorded) is named, never read."""
        manifest = self.read_manifest() or {}
        self.check_parts(manifest)
        tables = [read_part(self.fs, p, columns) for p in self.embedding_files(manifest)]
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
    """Replace ``path`` whole or not at all: aside then rename on a local disk; one PUT on an
    object store (atomic there; a copy-then-delete 'rename' would only add requests)."""
    if not is_local(fs):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_json_atomic(fs, path, obj, *, sort_keys: bool = False) -> None:
    """``obj`` as JSON (indent 1, a final newline) through ``write_atomic``, its folder made if
    needed; ``fs`` None: the local disk."""
    fs = fsspec.filesystem("file") if fs is None else fs
    path = str(path)
    folder = path.rsplit("/", 1)[0] if "/" in path else ""
    if folder:
        fs.makedirs(folder, exist_ok=True)
    write_atomic(fs, path, (json.dumps(obj, indent=1, sort_keys=sort_keys) + "\n").encode())

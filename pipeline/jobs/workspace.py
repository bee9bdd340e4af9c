"""Where a job's files are: URLs and local paths of a spec, and the version folder's ``Workspace``.

evaluate and report need local paths; for them a version folder on a remote filesystem (s3://,
gs://, …) is worked on through a local mirror, and what they write is uploaded after. Embedding
and indexing work on the store itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..storage import Output, safe_name
from ..stores import exists, is_local


def is_url(text: str) -> bool:
    return "://" in text


def local_path(url: str) -> str:
    """A relative local path made absolute against the working directory (Ray workers may run elsewhere)."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    return url if is_url(url) else os.path.abspath(os.path.expanduser(url))


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


class Workspace:
    """A version folder. Local: used in place. Remote (s3://, gs://, …): evaluate and report need
    local paths, so they work in a local mirror under the strata cache and the files
    they write are uploaded afterwards."""

    def __init__(self, url: str, name: str, version: str):
        from ..models import cache_root

        self.out = Output(url)
        self.is_local = is_local(self.out.fs)
        self.dir = Path(self.out.root) if self.is_local else cache_root() / "jobs" / safe_name(name) / version

    def fetch(self, rel: str, *, refresh: bool = False) -> Path | None:
        """A local copy of ``rel``, or None if it does not exist. Committed embedding files never change
        (a changed shard gets a new folder), so a mirrored copy is reused unless ``refresh``."""
        local = self.dir / rel
        if self.is_local:
            return local if local.exists() else None
        if not exists(self.out.fs, self.out.path(rel)):
            local.unlink(missing_ok=True)
            return None
        if refresh or not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(local.name + ".part")
            self.out.fs.get(self.out.path(rel), str(tmp))
            os.replace(tmp, local)
        return local

    def push(self, *rels: str) -> None:
        if self.is_local:
            return
        for rel in rels:
            self.out.fs.makedirs(self.out.path(*rel.split("/")[:-1]), exist_ok=True)
            self.out.fs.put(str(self.dir / rel), self.out.path(rel))

    def exists(self, rel: str) -> bool:
        return exists(self.out.fs, self.out.path(rel))

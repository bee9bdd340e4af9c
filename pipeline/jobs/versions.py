"""Published versions of a job: immutable snapshots, an atomic flip of LATEST, retention.

A job's series folder ``{output}/{name}/v-{hash}/`` is an embed output that runs update in place
(its ``manifest.json`` is the embedding's commit point and resume state). Readers never read it:
they follow ``LATEST`` to a published version::

    v-{hash}/published/{stamp}-{run}/
        manifest.json     the series manifest frozen at publication; each shard's ``output`` is
                          ``../../embeddings/{shard}-{commit}`` (``data_root: ../..``): parts are
                          shared with the series and with other versions by reference, never copied
        transforms/ mixes/ quantization/
                          copies of the fitted pieces as they were (small; a later run refits in place)
        indexes/          this version's indexes, built before LATEST moves to it
        job.json

A run that changes nothing publishes nothing. A run that does publishes a new folder, builds its
indexes, and only then rewrites ``LATEST`` (one atomic PUT or rename): a crash at any point leaves
LATEST on the previous complete version, whose parts are still there, because jobs embed with
``retain_replaced`` (replaced or dropped shards' folders are listed as ``retired``, not deleted).
After the flip, versions beyond the retention policy are removed (only folders named like Strata's
own version ids), then every retired folder that no remaining version reads.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timezone

from ..storage import MANIFEST, RETIRED, Output, redact
from ..stores import exists
from .workspace import join

PUBLISHED = "published"
DATA_ROOT = "../.."
VERSION_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")
PIECES = ("transforms", "mixes", "quantization")  # fitted pieces copied into a version (small files)


def new_version_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def published_url(series_url: str, version_id: str) -> str:
    return join(series_url, PUBLISHED, version_id)


def _shared(manifest: dict) -> list[tuple[str, str]]:
    """What a reader of a manifest gets: (shard, its committed folder relative to the series)."""
    def rel(output: str) -> str:
        return output[len(DATA_ROOT) + 1:] if output.startswith(DATA_ROOT + "/") else output
    return sorted((s["rel"], rel(s["output"])) for s in manifest.get("shards", []))


def current(series: Output, latest: dict | None, series_name: str) -> str | None:
    """The id of LATEST's published version when it belongs to this series and still holds exactly
    what the series' manifest commits; None where a new version must be published."""
    if not latest or latest.get("version") != series_name or not latest.get("published"):
        return None
    frozen = series.read_json(f"{PUBLISHED}/{latest['published']}/{MANIFEST}")
    working = series.read_manifest()
    if frozen is None or working is None or _shared(frozen) != _shared(working):
        return None
    return latest["published"]


def latest_of_series(series: Output) -> str | None:
    """The newest published version of a series that still holds exactly what its manifest commits
    (e.g. going back to earlier settings finds their version again); None where there is none."""
    working = series.read_manifest()
    if working is None:
        return None
    for vid in sorted(_version_ids(series), reverse=True):
        frozen = series.read_json(f"{PUBLISHED}/{vid}/{MANIFEST}")
        if frozen is not None and _shared(frozen) == _shared(working):
            return vid
    return None


def publish(series: Output) -> str:
    """Freeze the series' committed state as a new published version (parts by reference, fitted
    pieces copied); returns its id. Nothing reads it until LATEST names it."""
    manifest = series.read_manifest()
    if manifest is None:
        raise FileNotFoundError(f"{redact(series.url)}: no {MANIFEST} to publish")
    vid = new_version_id()
    prefix = f"{PUBLISHED}/{vid}"
    for piece in PIECES:
        src = series.path(piece)
        if exists(series.fs, src):
            for path in series.fs.find(src):
                dest = series.path(prefix, path[len(series.root) + 1:])
                series.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)  # a local disk needs the folder
                series.fs.copy(path, dest)
    frozen = {k: v for k, v in manifest.items() if k not in (RETIRED, "runs", "retain_replaced")}
    frozen["shards"] = [dict(s, output=f"{DATA_ROOT}/{s['output']}") for s in manifest.get("shards", [])]
    frozen["data_root"] = DATA_ROOT
    frozen["published_at"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    series.write_json(f"{prefix}/{MANIFEST}", frozen)
    return vid


def _version_ids(series: Output) -> list[str]:
    root = series.path(PUBLISHED)
    if not exists(series.fs, root):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in series.fs.ls(root, detail=False)]
    return sorted(n for n in names if VERSION_ID.match(n))


def collect(series: Output, keep: int, days: float | None, protect: str | None) -> dict:
    """Apply the retention policy to one series: keep the ``keep`` newest published versions, those
    younger than ``days`` (if given) and ``protect`` (LATEST's); remove the others, then every retired
    folder that no remaining version and not the series' manifest reads. Call under the series' lock."""
    ids = _version_ids(series)
    cutoff = time.time() - days * 86400 if days is not None else None

    def young(vid: str) -> bool:
        born = datetime.strptime(vid.split("-")[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
        return cutoff is not None and born >= cutoff

    kept = [v for i, v in enumerate(reversed(ids)) if i < keep or young(v) or v == protect]
    removed = [v for v in ids if v not in kept]
    for vid in removed:
        series.remove(f"{PUBLISHED}/{vid}")
    manifest = series.read_manifest() or {}
    read = {out for _, out in _shared(manifest)}
    for vid in kept:
        read |= {out for _, out in _shared(series.read_json(f"{PUBLISHED}/{vid}/{MANIFEST}") or {})}
    retired = manifest.get(RETIRED, [])
    freed = [rel for rel in retired if rel not in read]
    for rel in freed:
        series.remove(rel)
    if freed:
        manifest[RETIRED] = [rel for rel in retired if rel in read]
        series.write_manifest(manifest)
    return {"kept": kept, "removed": removed, "freed_folders": len(freed)}

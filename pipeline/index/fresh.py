"""Output-level freshness: which of an output's indexes are up to date (``indexes/_built.json``).

An index is up to date when its three files exist and ``indexes/_built.json`` says it was built,
with this kind, from exactly the manifest's committed files (a re-embedded shard gets a new
folder name, so any change of the embeddings makes it stale) *and* through the same fitted pieces
(``fitted.py``: mix weights, transform matrices, int8 ranges, by content), which can change with
no file of the embeddings changing. Both engines write the record after the index itself (a crash
leaves it stale, never wrong).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Sequence

from ..storage import utc_now
from ..stores import exists
from ..variants import Variant
from .fitted import output_digest
from .layout import BUILT_FILE, INDEXES, IndexBuildError, index_path, sidecars


def committed_files(manifest: dict) -> list[str]:
    """Committed embedding files relative to the output root, in the order indexes add them."""
    return [f"{s['output']}/{f}" for s in sorted(manifest.get("shards", []), key=lambda s: s["path"])
            for f in s["files"]]


def wanted_variants(manifest: dict, variants: Sequence[Variant | str] | None, where: str) -> list[Variant]:
    """The variants asked for (None: every stored and derived one), each checked to be in the output."""
    from ..derive import DERIVED

    known = [Variant.from_row(v) for v in manifest.get("variants", [])]
    known += [Variant.parse(name) for name in manifest.get(DERIVED, {})]
    if variants is None:
        return known
    wanted = [Variant.parse(v) for v in variants]
    unknown = [v.name for v in wanted if v not in known]
    if unknown:
        raise IndexBuildError(f"variant(s) {', '.join(unknown)} not in {where}; it has "
                              f"{', '.join(v.name for v in known)}")
    return wanted


def index_status(output: str | Path, manifest: dict, variants: Sequence[Variant | str] | None = None,
                 kind: str = "auto") -> tuple[list[Variant], list[Variant]]:
    """(variants whose index must be (re)built, variants whose index is up to date), for an
    output at any fsspec URL (only the records and the fitted pieces are read; module doc)."""
    from ..storage import Output

    out = Output(str(output))
    built = out.read_json(f"{INDEXES}/{BUILT_FILE}") or {}
    stale, fresh = [], []
    for v in wanted_variants(manifest, variants, str(output)):
        name = index_path("", v).name
        present = all(exists(out.fs, out.path(INDEXES, p.name)) for p in (Path(name), *sidecars(Path(name))))
        ok = present and (built.get(v.name) or {}).get("kind") == kind and staleness(out, manifest, v, built) is None
        (fresh if ok else stale).append(v)
    return stale, fresh


def record_built(out, v: Variant, entry: dict) -> None:
    """Record (after the index is in place) what ``v``'s index was built from: ``entry`` holds the
    committed ``files``, the ``kind`` asked, the ``fitted`` digest and what the engine adds. ``out``: the
    output (an ``Output``, or its local folder)."""
    from ..storage import Output

    out = out if isinstance(out, Output) else Output(str(out))
    rel = f"{INDEXES}/{BUILT_FILE}"
    built = out.read_json(rel) or {}
    built[v.name] = {**entry, "built_at": utc_now()}
    out.write_json(rel, built)


def staleness(out, manifest: dict, v: Variant, built: dict | None = None) -> str | None:
    """Why ``v``'s index no longer covers exactly what the output holds (the output moved on since it
    was built: shards committed, replaced or dropped, pieces refitted), or None. ``out``: an ``Output``;
    ``built``: its ``_built.json``, where the caller has read it already."""
    from .. import quantize

    built = (out.read_json(f"{INDEXES}/{BUILT_FILE}") or {}) if built is None else built
    rec = built.get(v.name)
    if rec is None:
        return "it has no build record, so what it covers is unknown"
    files = committed_files(manifest)
    if sorted(rec.get("files") or []) != sorted(files):  # an updated index lists its files in label order
        had = set(rec.get("files") or [])
        return (f"it was built at {rec.get('built_at', '?')} from {len(had & set(files))} of the "
                f"{len(files)} committed file(s) now in the manifest"
                + (f" and {len(had - set(files))} since replaced or dropped" if had - set(files) else ""))
    try:
        ranges = None
        if (manifest.get("signature", {}).get("dtype") or "float32") == "int8":
            ranges = quantize.read_ranges(out.url)[0].get(v.name)
        if rec.get("fitted") != output_digest(out, manifest, v, ranges):
            return "the fitted pieces it was built through (mix weights, transform, int8 ranges) changed since"
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # rebuilding says what
        return "a fitted piece it was built through is gone or unreadable"
    return None

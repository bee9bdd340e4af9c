"""The digest of the fitted pieces a variant's vectors are made with: what an index must be rebuilt for.

An index is built from stored vectors *through* fitted pieces: a learned (or uniform) mix's weights,
a fitted transform's matrices (``transforms/{variant}.npz``, refitted into the same path by every
``strata embed --transforms``), an int8 output's quantisation ranges. Files and paths do not change
when these do, so both engines' records (``indexes/_built.json``, the Ray engine's
``indexes/{variant}.build.json``) key on this digest of their content: sha256 over each piece's
name, dtype, shape and bytes. ``None`` where nothing is fitted (a raw float column): records written
before the digest existed carry none, and stay valid exactly there.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np

from ..transforms import Transform


def pieces_digest(*, weights=None, transform: Transform | None = None, ranges=None) -> str | None:
    """``sha256:…`` of the pieces given (mix weights, a transform, int8 ranges), or None for none."""
    pieces: list[tuple[str, object]] = []
    if weights is not None:
        pieces.append(("weights", np.asarray(weights, dtype=np.float64)))
    if transform is not None:
        pieces += [("transform", transform.name), ("transform.mean", transform.mean)]
        if transform.basis is not None:
            pieces.append(("transform.basis", transform.basis))
    if ranges is not None:
        pieces.append(("ranges", np.asarray(ranges, dtype=np.float32)))
    if not pieces:
        return None
    h = hashlib.sha256()
    for name, value in pieces:
        if isinstance(value, str):
            h.update(f"{name} str {value}\n".encode())
        else:
            a = np.ascontiguousarray(value)
            h.update(f"{name} {a.dtype.str} {a.shape}\n".encode())
            h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def source_digest(source, ranges=None) -> str | None:
    """The digest of what a build reads through: a raw column (only its ``ranges``, if int8) or a
    ``derive.Reader`` (its weights and transform, as loaded for this build)."""
    if isinstance(source, str):
        return pieces_digest(ranges=ranges)
    return pieces_digest(weights=source.weights, transform=source.transform, ranges=ranges)


def _transform_at(out, rel: str) -> Transform:
    """A transform stored in an output at any fsspec URL (``Transform.load`` reads local paths)."""
    meta = json.loads(out.fs.cat_file(out.path(f"{rel}.json")))
    with out.fs.open(out.path(f"{rel}.npz"), "rb") as f, np.load(io.BytesIO(f.read())) as z:
        return Transform(meta["name"], z["mean"], z["basis"] if "basis" in z else None, meta.get("fitted_on", {}))


def output_digest(out, manifest: dict, variant, ranges=None) -> str | None:
    """The digest ``source_digest`` gives the variant's reader, from an ``Output`` at any fsspec URL
    (its manifest's ``derived`` entry, the transform file it names). FileNotFoundError where that is missing."""
    from ..derive import DERIVED

    if variant.is_raw:
        return pieces_digest(ranges=ranges)
    entry = manifest.get(DERIVED, {}).get(variant.name) or {}
    weights = tuple(entry["weights"]) if entry.get("weights") else None
    transform = _transform_at(out, entry["transform"]) if entry.get("transform") else None
    return pieces_digest(weights=weights, transform=transform, ranges=ranges)

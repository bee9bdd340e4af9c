"""Post-processing fitted on unlabelled embeddings: centering, all-but-the-top, whitening.

- ``center``: subtract the mean vector.
- ``abtt{k}`` (all-but-the-top, Mu & Viswanath 2018): center, then remove the projections on
  the top ``k`` principal directions.
- ``whiten{k}`` (Su et al. 2021): center, then map onto the top ``k`` principal directions
  scaled by 1/sqrt(eigenvalue), so the output has identity covariance (``k`` dimensions).

Fitting never sees labels, and never holds the n x d matrix: ``Moments`` merges per-chunk
means and centred scatter matrices (Chan et al.'s pairwise update, in float64), so memory is
one d x d matrix whatever the number of rows. A fitted transform is stored as ``.npz`` (its
arrays) + ``.json`` (what it is, and what it was fitted on) and applied identically to queries
and documents.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .variants import SpecError

_SPEC = re.compile(r"(none|center|abtt(\d+)|whiten(\d+))")
KINDS = ("none", "center", "abtt{k}", "whiten{k}")


def parse_transform(name: str) -> str:
    """A transform name, checked: ``none``, ``center``, ``abtt{k}`` (k >= 1) or ``whiten{k}`` (k >= 1)."""
    name = name.strip()
    m = _SPEC.fullmatch(name)
    if not m or (m.group(2) or m.group(3) or "1") in ("0",) or (m.group(2) or m.group(3) or "1").startswith("0"):
        raise SpecError(f"unknown transform {name!r}: choose from {', '.join(KINDS)} (e.g. abtt2, whiten128)")
    return name


def parse_transforms(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    if spec is None:
        return ("none",)
    items = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    items = [i for i in items if i]
    if not items:
        raise SpecError(f"empty transform list: choose from {', '.join(KINDS)}")
    return tuple(dict.fromkeys(parse_transform(i) for i in items))


def _k(name: str) -> int:
    return int(re.sub(r"\D", "", name) or 0)


@dataclass
class Moments:
    """Streaming mean and centred scatter matrix (sum of outer products of deviations)."""

    n: int = 0
    mean: np.ndarray | None = None
    scatter: np.ndarray | None = None

    def add(self, x: np.ndarray) -> "Moments":
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or not len(x):
            return self
        if not np.isfinite(x).all():
            raise ValueError("cannot fit a transform on vectors containing NaN or Inf")
        nb, mb = len(x), x.mean(axis=0)
        d = x - mb
        sb = d.T @ d
        if self.n == 0:
            self.n, self.mean, self.scatter = nb, mb, sb
            return self
        if mb.shape != self.mean.shape:
            raise ValueError(f"vectors of dim {mb.shape[0]} added to moments of dim {self.mean.shape[0]}")
        n = self.n + nb
        delta = mb - self.mean
        self.scatter = self.scatter + sb + np.outer(delta, delta) * (self.n * nb / n)
        self.mean = self.mean + delta * (nb / n)
        self.n = n
        return self

    @property
    def cov(self) -> np.ndarray:
        return self.scatter / self.n


@dataclass
class Transform:
    """A fitted transform: ``apply(x)`` maps (n, d) vectors to (n, d) (or (n, k) for whitening)."""

    name: str
    mean: np.ndarray  # (d,)
    basis: np.ndarray | None = None  # abtt: (d, k) top directions; whiten: (d, k) scaled directions
    fitted_on: dict = field(default_factory=dict)  # what it saw: {"texts": n, "source": ...}

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.name == "none":
            return x.astype(np.float32)
        c = x - self.mean
        if self.name.startswith("abtt"):
            c = c - (c @ self.basis) @ self.basis.T
        elif self.name.startswith("whiten"):
            c = c @ self.basis
        return c.astype(np.float32)

    def save(self, path: str | Path) -> None:
        """``path.npz`` (arrays) and ``path.json`` (name, fitted_on), each whole or not at all
        (``storage.write_atomic``), the JSON written last."""
        import io

        import fsspec

        from .storage import write_atomic, write_json_atomic

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean} | ({"basis": self.basis} if self.basis is not None else {})
        npz = io.BytesIO()
        np.savez(npz, **arrays)
        write_atomic(fsspec.filesystem("file"), str(_with(path, ".npz")), npz.getvalue())
        meta = {"name": self.name, "dim": int(self.mean.shape[0]), "fitted_on": self.fitted_on}
        write_json_atomic(None, _with(path, ".json"), meta, sort_keys=True)

    @classmethod
    def load(cls, path: str | Path) -> "Transform":
        """A saved transform: a local path, or a URL on any fsspec store."""
        if "://" in str(path):
            import io

            from .stores import filesystem

            fs, p = filesystem(str(path))
            meta = json.loads(fs.cat_file(p + ".json"))
            npz = io.BytesIO(fs.cat_file(p + ".npz"))
        else:
            path = Path(path)
            meta = json.loads(_with(path, ".json").read_text())
            npz = _with(path, ".npz")
        with np.load(npz) as z:
            return cls(meta["name"], z["mean"], z["basis"] if "basis" in z else None, meta.get("fitted_on", {}))


def _with(path: Path, suffix: str) -> Path:
    """``path`` + suffix (variant names contain dots, so ``with_suffix`` would cut them)."""
    return path.with_name(path.name + suffix)


def check_fit_size(name: str, n: int, dim: int) -> None:
    """Refuse a fit the data cannot support, naming the counts and what would fit."""
    k = _k(name)
    if name != "none" and n < 2:
        raise SpecError(f"transform {name}: fitted on {n} text(s); at least 2 are needed")
    if name.startswith(("abtt", "whiten")) and k > dim:
        raise SpecError(f"transform {name}: k={k} exceeds the embedding dim {dim}")
    if name.startswith("whiten") and k > n - 1:
        raise SpecError(f"transform {name}: fitted on {n} texts, fewer than k+1={k + 1} (the covariance of {n} "
                        f"texts has rank at most {n - 1}, so whitening to {k} dims would be singular); use "
                        f"whiten{max(1, n - 1)} or fewer, or fit on more texts")


def fit(name: str, chunks: Iterable[np.ndarray], *, fitted_on: dict | None = None) -> Transform:
    """Fit a transform on unlabelled vectors given as chunks (streamed: one d x d matrix in memory)."""
    m = Moments()
    for chunk in chunks:
        m.add(chunk)
    return from_moments(name, m, fitted_on)


def from_moments(name: str, m: Moments, fitted_on: dict | None = None) -> Transform:
    """A transform from accumulated moments (fitting streams; this is the closed form at the end)."""
    name = parse_transform(name)
    if m.n == 0:
        raise SpecError(f"transform {name}: no vectors to fit on")
    dim = m.mean.shape[0]
    check_fit_size(name, m.n, dim)
    info = dict(fitted_on or {}, texts=m.n)
    if name == "none":
        return Transform(name, np.zeros(dim), None, info)
    if name == "center":
        return Transform(name, m.mean, None, info)
    k = _k(name)
    evals, evecs = np.linalg.eigh(m.cov)  # ascending
    order = np.argsort(evals)[::-1][:k]
    top, vals = evecs[:, order], evals[order]
    if name.startswith("abtt"):
        return Transform(name, m.mean, top, info)
    if vals[-1] <= 1e-12 * max(vals[0], 1e-300):
        raise SpecError(f"transform {name}: the embeddings span fewer than {k} directions; use a smaller k")
    return Transform(name, m.mean, top / np.sqrt(vals), info)

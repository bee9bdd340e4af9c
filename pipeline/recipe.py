"""A probe recipe (``probe.json``, written by ``strata probe``): what to embed, with its pieces.

``probe.json`` holds ``contract`` (the naming contract of ARCHITECTURE.md it was written under;
another is refused), ``model`` (name, path, weights digest: other weights are refused),
``settings`` (max_length, template texts by name, the template tokenisation rule, folds,
resamples, seed), ``labels`` (what the variants were chosen on), and ``recipe``: the chosen
variant first, then the next best, each with its ``sources`` (raw variant names), ``weights``
for a mix and ``transform_path`` (under the recipe's folder) with what each piece was fitted on.

``Recipe`` reads it (``strata eval --recipe``, a job's ``variants.recipe``, ``strata export``);
``RecipeEncoder`` applies the recorded pieces, never refitting; ``write_probe_json`` writes it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .derive import Reader
from .storage import write_json_atomic
from .templates import check_tokens_rule
from .transforms import Transform
from .variants import Variant

CONTRACT = 2  # the naming contract of ARCHITECTURE.md a recipe was written under (variants.py)


class RecipeError(ValueError):
    """A recipe that cannot be used as asked (one line, naming what would work)."""


def write_probe_json(path: Path, result: dict) -> None:
    """Write ``probe.json`` atomically (``storage.write_json_atomic``)."""
    write_json_atomic(None, path, result)


@dataclass
class Recipe:
    """What ``probe.json`` says to embed: the model, its settings, and variants with their pieces."""

    path: Path
    model: dict
    settings: dict
    templates: dict[str, str]
    entries: list[dict]
    probe_sha256: str
    labels: dict | None = None  # the labelled sample the variants were chosen on: data, split, items, of

    @classmethod
    def load(cls, path: str | Path, top: int = 1) -> "Recipe":
        path = Path(path)
        if path.is_dir():
            path = path / "probe.json"
        try:
            blob = path.read_bytes()
            d = json.loads(blob)
        except FileNotFoundError:
            raise RecipeError(f"recipe {path}: no such file (strata probe writes OUTPUT/probe.json)") from None
        except json.JSONDecodeError as e:
            raise RecipeError(f"recipe {path}: not JSON ({e})") from None
        if not isinstance(d, dict) or "recipe" not in d:
            raise RecipeError(f"recipe {path}: not a probe.json (no 'recipe' entry)")
        if d.get("contract") != CONTRACT:
            raise RecipeError(f"recipe {path}: written under naming contract {d.get('contract')!r}, this strata "
                              f"reads contract {CONTRACT}; run the probe again")
        entries = d["recipe"]
        if top < 1:
            raise RecipeError(f"--top {top}: must be at least 1")
        if top > len(entries):
            raise RecipeError(f"recipe {path}: --top {top}, but it holds {len(entries)} variant(s)")
        recipe = cls(path, d["model"], d["settings"], d["settings"]["templates"], entries[:top],
                     hashlib.sha256(blob).hexdigest(), d.get("labels"))
        try:
            check_tokens_rule(recipe.templates, (s.template for s in recipe.sources()),
                              d["settings"].get("template_tokens"), f"recipe {path}")
        except ValueError as e:
            raise RecipeError(f"{e} (run the probe again)") from None
        return recipe

    def held_out_from(self, data) -> tuple["Recipe", list[str], str | None]:
        """This recipe for scoring on ``data``: without the entries whose mix weights were fitted on
        ``data``'s labels (same name and split), the lines saying which were left out, and a note
        when the variants were chosen on a sample of ``data`` (their scores there are optimistic)."""
        same = (lambda seen: seen and (seen.get("data"), seen.get("split")) == (data.name, data.split))
        kept, dropped = [], []
        for e in self.entries:
            if same(e.get("mix_fitted_on")):
                m = e["mix_fitted_on"]
                dropped.append(f"left out {e['variant']}: its mix weights were fitted on {m['data']}/{m['split']} "
                               f"labels, the data scored here")
            else:
                kept.append(e)
        if not kept:
            raise RecipeError(f"recipe {self.path}: every variant asked for has mix weights fitted on "
                              f"{data.name}/{data.split}, the data to score: evaluate on other labels, or raise --top")
        chosen = None
        if same(self.labels):
            chosen = (f"chosen by the probe on {self.labels.get('items')} of {self.labels.get('of')} items of "
                      f"{data.name}/{data.split}: optimistic here")
        return replace(self, entries=kept), dropped, chosen

    @property
    def variants(self) -> list[Variant]:
        return [Variant.parse(e["variant"]) for e in self.entries]

    def sources(self) -> list[Variant]:
        return list(dict.fromkeys(Variant.parse(s) for e in self.entries for s in e["sources"]))

    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.sources()})

    def poolings(self) -> list[str]:
        return sorted({s.pooling for s in self.sources()})

    def readers(self) -> list[Reader]:
        out = []
        for e in self.entries:
            t = self._transform(e) if e.get("transform_path") else None
            w = tuple(e["weights"]) if e.get("weights") else None
            out.append(Reader(Variant.parse(e["variant"]), tuple(e["sources"]), w, t))
        return out

    def _transform(self, entry: dict) -> Transform:
        """An entry's fitted transform, read only from inside the recipe's folder (a probe.json is data:
        it never steers a read elsewhere), its shape checked against the model's width."""
        base = self.path.parent.resolve()
        path = (self.path.parent / entry["transform_path"]).resolve()
        if not path.is_relative_to(base):
            raise RecipeError(f"recipe {self.path}: {entry['variant']}'s transform_path {entry['transform_path']!r} "
                              f"points outside the recipe's folder; refused")
        try:
            t = Transform.load(path)
        except FileNotFoundError as e:
            raise RecipeError(f"recipe {self.path}: {entry['variant']}'s transform {entry['transform_path']!r} is "
                              f"missing ({Path(e.filename or path).name})") from None
        dim = self.model.get("dim")
        shapes = [np.shape(t.mean)] + ([np.shape(t.basis)] if t.basis is not None else [])
        if dim and (shapes[0] != (dim,) or (len(shapes) > 1 and shapes[1][0] != dim)):
            raise RecipeError(f"recipe {self.path}: {entry['variant']}'s transform {entry['transform_path']!r} has "
                              f"shape(s) {', '.join(map(str, shapes))}, but the model's vectors have {dim} dimensions")
        return t

    def template_specs(self) -> list[str]:
        """The sources' templates as ``resolve`` takes them: built-in names, user templates by text."""
        return [t if not t.startswith("t_") else self.templates[t]
                for t in dict.fromkeys(s.template for s in self.sources())]

    def check_model(self, request) -> None:
        """Refuse a request for other weights or settings than the probe's, naming the difference."""
        mine, theirs = self.model.get("weights_digest"), request.model.weights_digest
        if mine and theirs and mine != theirs:
            raise RecipeError(f"recipe {self.path}: probed on model {self.model['name']} ({mine[:19]}…), not "
                              f"{request.model.name} ({theirs[:19]}…)")

    def request(self, *, digest: bool = True, **kw):
        """The request that embeds exactly the recipe's sources (truncated at its deepest layer)."""
        from .request import resolve

        req = resolve(self.model["name"], layers=",".join(map(str, self.layers())), poolings=",".join(self.poolings()),
                      templates=self.template_specs(),
                      max_length=self.settings["max_length"], append_eos=self.settings.get("append_eos", False),
                      digest=digest, **kw)
        self.check_model(req)
        return req

    def fitted_on(self, entry: dict) -> str:
        parts = []
        if entry.get("mix_fitted_on"):
            m = entry["mix_fitted_on"]
            parts.append(f"mix weights fitted on {m['data']}/{m['split']} ({m['pairs']} labelled pairs)")
        if entry.get("transform_fitted_on"):
            t = entry["transform_fitted_on"]
            parts.append(f"transform fitted on {t.get('source')} ({t.get('texts')} texts, no labels)")
        return "; ".join(parts)


class RecipeEncoder:
    """``encode(texts)`` giving the recipe's variants: raw vectors from ``encoder``, then each
    variant's recorded mix weights and fitted transform (nothing refitted)."""

    def __init__(self, recipe: Recipe, encoder):
        self.recipe, self.encoder, self.readers = recipe, encoder, recipe.readers()

    def encode(self, texts: Sequence[str]) -> dict[Variant, np.ndarray]:
        raw = self.encoder.encode(texts)
        by_name = {v.name: m for v, m in raw.items()}
        return {r.variant: r.apply([by_name[c] for c in r.columns]) for r in self.readers}

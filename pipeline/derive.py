"""Derived variants: layer mixes and fitted transforms, computed from embedded (raw) vectors.

``Derivations`` says what to derive; ``derive`` takes the raw vectors of the evaluated texts
and returns the derived ones, with a record of what each fitted piece saw:

- uniform mixes need nothing fitted;
- learned mixes are fitted on ``mix_labels``, a labelled TRAINING set (STS pairs, or a BEIR
  folder's training qrels), embedded by the same encoder; the evaluated data never reaches the fit
  (``check_held_out`` refuses training labels that share a pair or a query with the evaluated ones);
- transforms are fitted on unlabelled vectors: ``fit_texts`` when given (``--fit-on``),
  otherwise the evaluated set's own texts (for retrieval, the corpus documents) -- texts only,
  never labels, as the post-processing papers do. The same fitted transform is applied to
  queries and documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from .evaldata import BeirData, StsData
from .mixes import LearnedMix, apply_mix, fit_retrieval, fit_sts
from .transforms import Transform
from .transforms import fit as fit_transform
from .variants import SpecError, Variant, mix_variants


@dataclass(frozen=True)
class Derivations:
    mixes: tuple[tuple[str, int, int], ...] = ()  # (uniform|learned, lo, hi), from variants.parse_mixes
    transforms: tuple[str, ...] = ("none",)  # from transforms.parse_transforms
    mix_labels: StsData | BeirData | None = None  # training labels for learned mixes
    fit_texts: tuple[str, ...] | None = None  # unlabelled texts for transforms (default: the evaluated ones)
    fit_source: str = ""  # how to name fit_texts in the record (a path)

    def __post_init__(self):
        if any(kind == "learned" for kind, _, _ in self.mixes) and self.mix_labels is None:
            raise SpecError("a learned mix needs training labels (--mix-labels: STS pairs or a BEIR folder whose "
                            "qrels/train.tsv it reads); it is never fitted on the evaluated data")

    @property
    def empty(self) -> bool:
        return not self.mixes and set(self.transforms) == {"none"}


def _unique(texts: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    where: dict[str, int] = {}
    for t in texts:
        where.setdefault(t, len(where))
    return list(where), where


def learn_mix(encoder, variant: Variant, labels: StsData | BeirData) -> tuple[np.ndarray, dict]:
    """Softmax layer weights for one learned-mix variant, fitted on training labels only."""
    layers = variant.sources
    if isinstance(labels, StsData):
        texts, where = _unique([*labels.sentence1, *labels.sentence2])
        vecs = encoder.encode(texts)
        per_layer = [vecs[s] for s in layers]
        r1 = np.array([where[t] for t in labels.sentence1])
        r2 = np.array([where[t] for t in labels.sentence2])
        weights = fit_sts(per_layer, r1, r2, labels.scores)
        seen = {"task": "sts", "data": labels.name, "split": labels.split, "pairs": len(labels)}
    else:
        doc_of = dict(zip(labels.doc_ids, labels.doc_texts))
        pairs = [(q, d) for q, qt in zip(labels.query_ids, labels.query_texts) for d, rel in labels.qrels[q].items()
                 if rel > 0 and d in doc_of]
        if not pairs:
            raise SpecError(f"{labels.name}/{labels.split}: no (query, relevant document) pairs to learn a mix from")
        qtext = dict(zip(labels.query_ids, labels.query_texts))
        texts, where = _unique([*(qtext[q] for q, _ in pairs), *(doc_of[d] for _, d in pairs)])
        vecs = encoder.encode(texts)
        per_layer = [vecs[s] for s in layers]
        weights = fit_retrieval(per_layer, np.array([where[qtext[q]] for q, _ in pairs]),
                                np.array([where[doc_of[d]] for _, d in pairs]))
        seen = {"task": "retrieval", "data": labels.name, "split": labels.split, "pairs": len(pairs)}
    return weights, {**seen, "layers": [s.layer for s in layers], "weights": [round(float(w), 6) for w in weights]}


def derive(encoder, vectors: Mapping[Variant, np.ndarray], derivations: Derivations, *,
           fit_rows: np.ndarray | None = None, fit_label: str = "the evaluated texts"
           ) -> Iterator[tuple[Variant, np.ndarray, dict, Transform | LearnedMix | None]]:
    """Derived vectors of the same texts as ``vectors``, one variant at a time (so memory holds one
    derived matrix, not all of them): (variant, vectors, what its fitted pieces saw, the piece).

    ``fit_rows`` selects the rows of ``vectors`` that transforms are fitted on (for retrieval:
    the documents); ``derivations.fit_texts`` replaces them with other texts' vectors.
    """
    raw = [v for v in vectors if v.is_raw]
    base: dict[Variant, np.ndarray] = {v: vectors[v] for v in raw}
    weights_of: dict[Variant, np.ndarray] = {}
    record: dict[Variant, dict] = {}
    for v in mix_variants(raw, derivations.mixes):
        piece = None
        if v.mix_range[0] == "learned":
            weights, seen = learn_mix(encoder, v, derivations.mix_labels)
            record[v] = {"mix": seen}
            piece = LearnedMix(seen["layers"], seen["weights"], {k: seen[k] for k in ("task", "data", "split",
                                                                                       "pairs")})
        else:
            weights = np.full(len(v.sources), 1.0 / len(v.sources))
        weights_of[v] = weights
        base[v] = apply_mix([vectors[s] for s in v.sources], weights)
        yield v, base[v], record.get(v, {}), piece
    transforms = [t for t in derivations.transforms if t != "none"]
    if not transforms:
        return
    fit_vectors = encoder.encode(list(derivations.fit_texts)) if derivations.fit_texts is not None else None
    for b, x in base.items():
        if fit_vectors is not None:
            sample = apply_mix([fit_vectors[s] for s in b.sources], weights_of[b]) if b.mix is not None \
                else fit_vectors[b]
            label = derivations.fit_source or f"{len(derivations.fit_texts)} texts given by --fit-on"
        else:
            sample = x if fit_rows is None else x[fit_rows]
            label = fit_label
        for name in transforms:
            t = fit_transform(name, [np.asarray(sample, dtype=np.float32)], fitted_on={"source": label})
            yield (Variant(b.layer, b.pooling, b.template, b.mix, name), t.apply(x),
                   {**record.get(b, {}), "transform": t.fitted_on}, t)


def check_held_out(derivations: Derivations | None, data: StsData | BeirData) -> None:
    """Refuse learned-mix training labels that overlap the evaluated labels: an STS pair (either
    order) or a judged query (its text) in both."""
    labels = derivations.mix_labels if derivations is not None else None
    if labels is None or not any(kind == "learned" for kind, _, _ in derivations.mixes):
        return
    if isinstance(labels, StsData) and isinstance(data, StsData):
        pairs = {frozenset(p) for p in zip(labels.sentence1, labels.sentence2)}
        shared = sum(frozenset(p) in pairs for p in zip(data.sentence1, data.sentence2))
        what = "sentence pairs"
    elif isinstance(labels, BeirData) and isinstance(data, BeirData):
        judged = {t for q, t in zip(labels.query_ids, labels.query_texts) if labels.qrels.get(q)}
        shared = sum(t in judged for q, t in zip(data.query_ids, data.query_texts) if data.qrels.get(q))
        what = "judged queries"
    else:
        return
    if shared:
        raise SpecError(f"the learned mix's training labels ({labels.name}/{labels.split}) share {shared} {what} "
                        f"with the evaluated {data.name}/{data.split}: a mix is never scored on what it was fitted "
                        f"on; give --mix-labels another split or data set")


def check_fit(derivations: Derivations, n_texts: int, dim: int) -> None:
    """Refuse, before any forward pass, transforms the fitting texts cannot support (names the counts)."""
    from .transforms import check_fit_size

    for name in derivations.transforms:
        check_fit_size(name, n_texts, dim)


def save_fitted(out_dir, dataset: str, v: Variant, piece: Transform | LearnedMix) -> None:
    """Store a fitted piece beside the results: ``mixes/{dataset}.{variant}.json`` (weights, what they
    were fitted on; the report draws them) or ``transforms/{dataset}/{variant}.npz|.json``."""
    from pathlib import Path

    from .storage import safe_name

    if isinstance(piece, LearnedMix):
        piece.save(Path(out_dir) / "mixes" / f"{safe_name(dataset)}.{safe_name(v.name)}.json",
                   extra={"variant": v.name, "dataset": dataset})
    else:
        piece.save(Path(out_dir) / "transforms" / safe_name(dataset) / safe_name(v.name))


# --------------------------------------------------------------------------- derived variants of an output
DERIVED = "derived"  # the manifest key: {variant name: {"sources": [...], "weights": [...], "transform": ...}}
TRANSFORMS_DIR = "transforms"


@dataclass(frozen=True)
class Reader:
    """How a derived variant's vectors are made from an output's stored columns: a mix, then a transform."""

    variant: Variant
    columns: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    transform: Transform | None = None

    def apply(self, mats: Sequence[np.ndarray]) -> np.ndarray:
        x = apply_mix(mats, self.weights) if self.weights is not None else np.asarray(mats[0], dtype=np.float32)
        return self.transform.apply(x) if self.transform is not None else x

    def dim(self, source_dim: int) -> int:
        if self.transform is not None and self.transform.basis is not None and self.variant.transform.startswith(
                "whiten"):
            return int(self.transform.basis.shape[1])
        return source_dim


def fit_output(out_dir, manifest: dict, mixes, transforms: Sequence[str],
               learned: Mapping[Variant, tuple[np.ndarray, dict]] | None = None) -> dict:
    """Fit transforms on an output's own committed rows (streamed: per base variant one d x d matrix)
    and store them under ``transforms/``; returns the manifest's ``derived`` entries (uniform mixes
    need nothing fitted, only their definition). Local outputs only."""
    from pathlib import Path

    from .parts import read_part
    from .storage import Output, safe_name
    from .transforms import Moments, check_fit_size, from_moments

    out = Output(str(out_dir))
    raw = [Variant.from_row(v) for v in manifest["variants"]]
    dim = int(manifest["variants"][0]["dim"])
    bases = [*raw, *mix_variants(raw, mixes)]
    learned = learned or {}
    entries: dict[str, dict] = {}
    weights: dict[Variant, np.ndarray] = {}
    for b in bases:
        if b.mix is not None:
            if b.mix.startswith("learned:"):
                if b not in learned:
                    raise SpecError(f"{b.name}: a learned mix needs training labels (--mix-labels)")
                weights[b], seen = learned[b]
                extra = {"fitted_on": {"mix": seen}}
            else:
                weights[b], extra = np.full(len(b.sources), 1.0 / len(b.sources)), {}
            entries[b.name] = {"sources": [s.column for s in b.sources], "weights": [float(w) for w in weights[b]],
                               **extra}
    todo = [t for t in transforms if t != "none"]
    if not todo:
        return entries
    moments = {b: Moments() for b in bases}
    columns = sorted({s.column for b in bases for s in b.sources})
    n = 0
    for f in out.embedding_files(manifest):
        part = read_part(out.fs, f, columns)
        mats = {c: part.column(c).combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, dim)
                for c in columns}
        n += part.num_rows
        for b in bases:
            x = [mats[s.column] for s in b.sources]
            moments[b].add(apply_mix(x, weights[b]) if b.mix is not None else x[0])
    for name in todo:
        check_fit_size(name, n, dim)
    for b, m in moments.items():
        for name in todo:
            t = from_moments(name, m, {"source": "this output's committed rows",
                                       "files": len(out.embedding_files(manifest))})
            v = Variant(b.layer, b.pooling, b.template, b.mix, name)
            t.save(Path(out.root) / TRANSFORMS_DIR / safe_name(v.name))
            entries[v.name] = {"sources": [s.column for s in b.sources],
                               **({"weights": entries[b.name]["weights"]} if b.mix is not None else {}),
                               "transform": f"{TRANSFORMS_DIR}/{safe_name(v.name)}",
                               "fitted_on": {**entries.get(b.name, {}).get("fitted_on", {}), **t.fitted_on}}
    return entries


def reader(out_dir, manifest: dict, variant: Variant) -> str | Reader:
    """The column of a raw variant, or the Reader of a derived one recorded in the manifest (``out_dir``:
    a local folder or any fsspec URL)."""
    if variant.is_raw:
        return variant.column
    entry = manifest.get(DERIVED, {}).get(variant.name)
    if entry is None:
        raise SpecError(f"{variant.name} is not in this output; derived variants are made with `strata embed "
                        f"--mixes/--transforms`")
    transform = Transform.load(f"{str(out_dir).rstrip('/')}/{entry['transform']}") if entry.get("transform") else None
    weights = tuple(entry["weights"]) if entry.get("weights") else None
    return Reader(variant, tuple(entry["sources"]), weights, transform)


def check_float_output(dtype: str | None, output: str | None = None) -> None:
    """Refuse derived variants of int8 or binary vectors: they are computed from float columns.
    ``output``: the output whose manifest records ``dtype``; None: the command line's ``--dtype``,
    refused before anything is embedded."""
    if dtype in ("int8", "binary"):
        what = (f"{output} stores {dtype} codes: derived variants (mixes, transforms)" if output is not None
                else f"--dtype {dtype}: derived variants (--mixes, --transforms)")
        raise SpecError(f"{what} are computed from float columns; embed with --dtype float32 or float16 to derive "
                        "them")


def add_to_output(output: str, mixes_spec, transforms_spec, *, request=None,
                  mix_labels: StsData | BeirData | None = None) -> dict:
    """``strata embed --mixes/--transforms``: define mixes and fit transforms on the output's own rows,
    under the output's lock; recorded in the manifest's ``derived``. A learned mix is fitted on
    ``mix_labels`` (a training set), its texts embedded in-process with ``request``."""
    from .storage import Output
    from .transforms import parse_transforms
    from .variants import parse_mixes

    out = Output(output)
    with out.lock():
        manifest = out.read_manifest()
        if not manifest:
            raise FileNotFoundError(f"{output}: no manifest.json (nothing embedded yet)")
        check_float_output(manifest.get("signature", {}).get("dtype"), output)
        n_layers = manifest.get("model", {}).get("n_layers") or max(v["layer"] for v in manifest["variants"])
        mixes = parse_mixes(mixes_spec, n_layers)
        learned = {}
        wanted = [v for v in mix_variants([Variant.from_row(r) for r in manifest["variants"]], mixes)
                  if v.mix.startswith("learned:")]
        if wanted:
            if mix_labels is None or request is None:
                raise SpecError("a learned mix needs training labels (--mix-labels: STS pairs or a BEIR folder)")
            from .encoder import Encoder

            encoder = Encoder.from_request(request)
            learned = {v: learn_mix(encoder, v, mix_labels) for v in wanted}
        entries = fit_output(out.root, manifest, mixes, parse_transforms(transforms_spec), learned)
        manifest[DERIVED] = {**manifest.get(DERIVED, {}), **entries}  # earlier fits stay unless refitted
        out.write_manifest(manifest)
    return entries


def add_recipe(output: str, recipe) -> list[str]:
    """Record a probe recipe's variants in an output's ``derived`` (its mix weights and a copy of its
    fitted transform, nothing refitted) and the probe it came from in the manifest's ``probe``."""
    import shutil
    from pathlib import Path

    from .storage import Output, safe_name

    out = Output(output)
    with out.lock():
        manifest = out.read_manifest()
        if not manifest:
            raise FileNotFoundError(f"{output}: no manifest.json (nothing embedded yet)")
        entries, made = {}, []
        for e, r in zip(recipe.entries, recipe.readers()):
            v = r.variant
            made.append(v.name)
            if v.is_raw:
                continue
            check_float_output(manifest.get("signature", {}).get("dtype"), output)
            columns = [Variant.parse(s).column for s in e["sources"]]
            entry = {"sources": columns, **({"weights": list(r.weights)} if r.weights is not None else {})}
            fitted = {}
            if e.get("mix_fitted_on"):
                fitted["mix"] = e["mix_fitted_on"]
            if r.transform is not None:
                dest = Path(out.root) / TRANSFORMS_DIR / safe_name(v.name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = recipe.path.parent / e["transform_path"]
                for suffix in (".npz", ".json"):
                    shutil.copyfile(f"{src}{suffix}", f"{dest}{suffix}")
                entry["transform"] = f"{TRANSFORMS_DIR}/{safe_name(v.name)}"
                fitted.update(e.get("transform_fitted_on", {}))
            entry["fitted_on"] = {**fitted, "probe": str(recipe.path)}
            entries[v.name] = entry
        manifest[DERIVED] = {**manifest.get(DERIVED, {}), **entries}
        manifest["probe"] = {"path": str(recipe.path), "sha256": recipe.probe_sha256, "variants": made,
                             "model": recipe.model.get("name")}
        out.write_manifest(manifest)
    return made


def vectors_for(out_dir, manifest: dict, variant: Variant, encoded: Mapping[Variant, np.ndarray]) -> np.ndarray:
    """A variant's vectors for new texts (queries) from an Encoder's raw output, made exactly as the
    output's documents were: the same mix weights, the same fitted transform."""
    r = reader(out_dir, manifest, variant)
    if isinstance(r, str):
        return np.asarray(encoded[variant], dtype=np.float32)
    by_column = {v.column: m for v, m in encoded.items() if v.is_raw}
    return r.apply([by_column[c] for c in r.columns])

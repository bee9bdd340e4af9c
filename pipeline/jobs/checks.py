"""The checks of a job spec that pydantic's per-field validation cannot make: across fields
(``cross_checks``), and against the model's depth (``check_variants``). Each raises a
``Problem`` (field path, message) that the caller renders as one line.
"""

from __future__ import annotations

from ..templates import parse_templates
from ..transforms import parse_transforms
from ..variants import SpecError, Variant, make_variants, mix_variants, parse_mixes
from .messages import Problem, short_list
from .spec import JobSpec


def cross_checks(spec: JobSpec) -> None:
    inp = spec.input
    if inp is not None:
        if inp.location is None and inp.embeddings is None:
            raise Problem("input", "give location (a Parquet corpus to embed) or embeddings (an existing "
                                   "output to index or evaluate); or write `input: null` for an evaluation-only job")
        if inp.location is not None and inp.embeddings is not None:
            raise Problem("input", "give location (a corpus to embed) or embeddings (an existing output), not both")
        if inp.embeddings is not None:
            extra = sorted(inp.model_fields_set - {"embeddings"})
            if extra:
                raise Problem(f"input.{extra[0]}", "not used with input.embeddings (the existing output's "
                                                   "manifest says how it was made)")
    if spec.mode == "existing":
        for key in ("output", "variants", "embedding"):
            if key in spec.model_fields_set:
                raise Problem(key, "not allowed with input.embeddings: the existing output's manifest fixes the "
                                   "model, variants and settings, and indexes/results are written into it")
        if "spec" in spec.model.model_fields_set:
            raise Problem("model.spec", "not allowed with input.embeddings: the model is read from the existing "
                                        "output's manifest")
    elif spec.output is None:
        raise Problem("output", "missing (required): where the job writes {output}/{name}/v-…")
    if spec.mode == "eval-only":
        if spec.indexes is not None:
            raise Problem("indexes", "`input: null` means evaluation only: there is no corpus to index")
        if not spec.evaluations:
            raise Problem("evaluations", "`input: null` (evaluation only) needs at least one evaluation")
    if spec.embedding.dtype in ("int8", "binary") and (spec.variants.mixes or spec.variants.recipe
                                                         or set(spec.variants.transforms) != {"none"}):
        raise Problem("embedding.dtype", f"{spec.embedding.dtype}: derived variants (variants.mixes, transforms, "
                                         "recipe) are computed from float columns; use float32 or float16")
    if spec.report and not spec.evaluations:
        raise Problem("report", "true needs at least one evaluation to report on")
    if spec.mode == "existing" and spec.indexes is None and not spec.evaluations:
        raise Problem("indexes", "an input.embeddings job has nothing to do without indexes or evaluations")


def check_variants(spec: JobSpec, depth: int) -> tuple[Variant, ...]:
    """The spec's variant grid for a model of ``depth`` blocks; layer and index names checked."""
    templates = [t.name for t in parse_templates(spec.variants.templates)]
    try:
        variants = make_variants(spec.variants.layers, spec.variants.poolings, depth, templates)
    except SpecError as e:
        raise Problem("variants.layers", f"{e} (model {spec.model.spec})") from None
    try:
        mixes = parse_mixes(spec.variants.mixes, depth)
        derived = mix_variants(variants, mixes)
    except SpecError as e:
        raise Problem("variants.mixes", f"{e} (model {spec.model.spec})") from None
    if any(kind == "learned" for kind, _, _ in mixes) and not spec.variants.mix_labels:
        raise Problem("variants.mix_labels", "a learned mix needs training labels (STS pairs or a BEIR folder)")
    transforms = parse_transforms(spec.variants.transforms)
    for i, ev in enumerate(spec.evaluations):
        for key in ("query_template", "doc_template"):
            given = getattr(ev, key, None)
            if given is not None:
                try:
                    name = parse_templates([given])[0].name
                except SpecError as e:
                    raise Problem(f"evaluations[{i}].{key}", str(e)) from None
                if name not in templates:
                    raise Problem(f"evaluations[{i}].{key}", f"{given!r} is not one of variants.templates "
                                                            f"({', '.join(templates)})")
    if spec.indexes and spec.indexes.variants:
        names = [v.name for v in variants]
        names += [Variant(b.layer, b.pooling, b.template, b.mix, t).name for b in (*variants, *derived)
                  for t in transforms if t != "none" or b.mix is not None and b.mix.startswith("uniform")]
        for i, name in enumerate(spec.indexes.variants):
            if name not in names:
                raise Problem(f"indexes.variants[{i}]", f"{name} is not one of the job's variants "
                                                        f"({short_list(names)})")
    return variants

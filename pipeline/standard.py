"""Exports a serving stack can load: sentence-transformers' own modules, where the variant allows.

Text Embeddings Inference, vLLM's pooling runner and Infinity read a sentence-transformers
folder through ``config.json``, the weights, ``tokenizer.json``, ``modules.json`` and
``1_Pooling/config.json``: they tokenise with the tokenizer's own call, run the model to its
last hidden state (after the final norm) and pool it; ``Normalize`` and ``Dense`` modules
follow where listed. They import no custom module. So a variant exports with standard modules
(``why_custom`` returns None) exactly when those steps give its vectors:

- the ``plain`` template and no ``append_eos``: a prompt template is tokenised in pieces by
  Strata, and sentence-transformers' prompts are prefixes tokenised together with the text;
- one layer: a mix normalises each layer's pooled vector before weighting, which no standard
  module does;
- a pooling sentence-transformers' ``Pooling`` has (``STANDARD_POOLING``); the sink-free forms
  drop a token it cannot drop;
- layer N, after the final norm, as the loader computes it; or a layer 1..N-1 pooled ``last``
  or ``first`` and L2-normalised. The loader applies the final norm to every token, but with
  its weight set to one (``unit_final_norm``) the norm only scales each token by a positive
  number, which the normalisation removes. Mean or max pooling of a layer below N would pool
  rescaled tokens: not the variant's vectors, so those export with Strata's modules.
- fitted transforms (centering, ABTT, whitening) are affine: a ``Dense`` that subtracts the
  mean (its bias), then a ``Dense`` with the projection, both with identity activation.

Every standard export is checked before it is written: the folder's vectors for ``CHECK_TEXTS``
(one of them longer than ``max_length``) must match Strata's own modules within
``VERIFY_TOLERANCE``, or the export says why not. Those texts and vectors are kept in the folder
(``strata_check.safetensors``) so that ``strata export --check DIR`` can load the folder the way a
serving stack would (``encode_as_server``: transformers' ``AutoModel``, the ``tokenizers``
library, the pooling config and the listed Dense/Normalize modules, written here and not taken
from sentence-transformers) and compare.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

STANDARD_POOLING = {"mean": "mean", "last": "lasttoken", "first": "cls", "max": "max", "wmean": "weightedmean"}
CHECK_FILE = "strata_check.safetensors"
CHECK_TEXTS = (
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Ok",
    "Les élèves lisent un livre à la bibliothèque.",
    "数据管道把文本变成向量。",
    "How do I reset my card PIN?",
    " ".join(["embedding pipelines stream parquet shards to actors"] * 60),  # longer than any max_length used
    "3.14159 is pi; e is 2.71828.",
)
AFFINE = ("center", "abtt", "whiten")


def why_custom(variant, *, n_layers: int, normalize: bool, template_text: str, append_eos: bool,
               mixed: bool) -> str | None:
    """None when the variant exports with standard modules; otherwise why it needs Strata's own."""
    if template_text != "{text}":
        return (f"template {variant.template} is tokenised in pieces around the text; a standard loader "
                f"tokenises one string, and sentence-transformers' prompts are prefixes only")
    if append_eos:
        return "append_eos adds an EOS token that the tokenizer's own call does not add"
    if mixed:
        return "a mix of layers normalises each layer's pooled vector before weighting; no standard module does"
    if variant.pooling not in STANDARD_POOLING:
        return (f"pooling {variant.pooling} has no sentence-transformers Pooling mode (it has "
                f"{', '.join(STANDARD_POOLING)})")
    if variant.transform != "none" and not variant.transform.startswith(AFFINE):
        return f"transform {variant.transform} is not affine"
    if variant.layer == n_layers:
        return None
    if variant.layer == 0:
        return "layer 0 is the embedding output, before every block; a standard loader runs at least one block"
    if variant.pooling in ("last", "first") and normalize:
        return None
    return (f"layer {variant.layer} is before the final norm, which a standard loader applies to every token; "
            f"only last or first pooling followed by L2 normalisation is unchanged by it"
            + ("" if variant.pooling in ("last", "first") else f", not {variant.pooling}")
            + (" (this output is not normalised)" if variant.pooling in ("last", "first") else ""))


def serving(name: str, *, n_layers: int, templates: dict[str, str], append_eos: bool, normalize: bool = False
            ) -> str:
    """"standard" or "custom": how ``strata export`` would write the variant named (a probe's ranking
    marks each one so, for a user weighing a fraction of a point against deployability)."""
    from .templates import BUILTIN
    from .variants import Variant

    v = Variant.parse(name)
    text = templates.get(v.template) or BUILTIN.get(v.template, "")
    return "custom" if why_custom(v, n_layers=n_layers, normalize=normalize, template_text=text,
                                  append_eos=append_eos, mixed=v.mix is not None) else "standard"


def nearest_standard(variant, n_layers: int):
    """The closest variant that exports with standard modules: plain template, layer N, the
    pooling's standard form (sink-free dropped, else mean), the same affine transform."""
    from .variants import Variant

    pooling = variant.pooling.removesuffix("_nosink")
    pooling = pooling if pooling in STANDARD_POOLING else "mean"
    transform = variant.transform if variant.transform.startswith(AFFINE) else "none"
    return Variant(n_layers, pooling, "plain", None, transform)


# --------------------------------------------------------------------------- building the modules
def final_norm(model):
    """The model's final norm (``model.norm`` for LLaMA, Mistral, Qwen, Gemma)."""
    norm = getattr(model, "norm", None)
    if norm is None or getattr(norm, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no final norm named 'norm' with a weight")
    return norm


def unit_final_norm(model) -> None:
    """Set the final norm's scale to one (weight 1, or 0 where the norm multiplies by 1 + weight,
    as Gemma's does), so each token comes out as a positive multiple of itself; refuse otherwise."""
    import torch

    norm = final_norm(model)
    x = torch.randn(3, norm.weight.shape[0], dtype=norm.weight.dtype, generator=torch.Generator().manual_seed(0))
    for value in (1.0, 0.0):
        with torch.no_grad():
            norm.weight.fill_(value)
            y = norm(x)
        ratio = (y * x).sum(-1) / (x * x).sum(-1)
        if bool((ratio > 0).all()) and float((y - ratio[:, None] * x).abs().max()) <= 1e-5 * float(y.abs().max()):
            return
    raise ValueError(f"the final norm of {type(model).__name__} does not become a per-token scale with its weight "
                     f"at 1 or 0")


def modules(model_dir: Path, *, dim: int, pooling: str, max_length: int, normalize: bool, transform) -> list:
    """sentence-transformers modules over the saved (truncated) model at ``model_dir``."""
    import torch
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    # text only: with a chat template in the tokenizer, sentence-transformers would render each text as a
    # chat message; Strata and the serving stacks tokenise the text as it is
    text_only = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
    out = [Transformer(str(model_dir), max_seq_length=max_length, modality_config=text_only,
                       module_output_name="token_embeddings"),
           Pooling(dim, pooling_mode=STANDARD_POOLING[pooling])]
    if normalize:
        out.append(Normalize())
    if transform is not None and transform.name != "none":
        mean = torch.from_numpy(np.asarray(transform.mean, dtype=np.float32))
        out.append(Dense(dim, dim, bias=True, activation_function=torch.nn.Identity(),
                         init_weight=torch.eye(dim), init_bias=-mean))
        if transform.name.startswith("abtt"):
            b = np.asarray(transform.basis, dtype=np.float64)
            proj = torch.from_numpy((np.eye(dim) - b @ b.T).astype(np.float32))
            out.append(Dense(dim, dim, bias=False, activation_function=torch.nn.Identity(), init_weight=proj))
        elif transform.name.startswith("whiten"):
            b = torch.from_numpy(np.ascontiguousarray(np.asarray(transform.basis, dtype=np.float32).T))
            out.append(Dense(dim, b.shape[0], bias=False, activation_function=torch.nn.Identity(), init_weight=b))
    return out


def write_max_length(folder: Path, max_length: int) -> None:
    """``max_seq_length`` in ``sentence_bert_config.json`` too, where Text Embeddings Inference reads it
    (sentence-transformers 6 keeps it as the tokenizer's ``model_max_length`` only)."""
    path = folder / "sentence_bert_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**config, "max_seq_length": int(max_length)}, indent=4) + "\n")


def save_check(folder: Path, texts, vectors: np.ndarray) -> None:
    from safetensors.numpy import save_file

    save_file({"vectors": np.ascontiguousarray(vectors, dtype=np.float32)}, str(folder / CHECK_FILE),
              metadata={"texts": json.dumps(list(texts))})


# --------------------------------------------------------------------------- the loader a server is
class NotServable(ValueError):
    """A folder a serving stack cannot load as it is (one line: which file, which module)."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NotServable(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise NotServable(f"{path}: not JSON ({e})") from None


def encode_as_server(folder: str | Path, texts, *, padding_side: str = "right", batch_size: int = 4) -> np.ndarray:
    """The folder's vectors as a serving stack computes them (module doc): nothing from Strata or
    sentence-transformers, only the files a server reads."""
    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModel

    folder = Path(folder)
    listed = _read_json(folder / "modules.json")
    custom = [m["type"] for m in listed if not str(m.get("type", "")).startswith("sentence_transformers.")]
    if custom:
        raise NotServable(f"{folder}/modules.json lists {', '.join(custom)}: custom modules, which serving stacks "
                          f"do not import")
    kinds = [m["type"].rsplit(".", 1)[-1] for m in listed]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k not in ("Normalize", "Dense") for k in kinds[2:]):
        raise NotServable(f"{folder}/modules.json lists {kinds}: a server reads Transformer, Pooling, then Normalize "
                          f"or Dense modules")
    st_config = _read_json(folder / "sentence_bert_config.json")
    max_len = int(st_config.get("max_seq_length") or 512)
    pool_cfg = _read_json(folder / listed[1]["path"] / "config.json")
    mode = pool_cfg.get("pooling_mode")
    if mode not in STANDARD_POOLING.values():
        raise NotServable(f"{folder}/{listed[1]['path']}/config.json: pooling_mode {mode!r} is not one this check "
                          f"reads")
    if not (folder / "tokenizer.json").is_file():
        raise NotServable(f"{folder}/tokenizer.json: missing (servers read the fast tokenizer's file)")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(max_len)
    tok.no_padding()
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
    model.eval()
    pad = 0
    out = []
    for start in range(0, len(texts), batch_size):
        rows = [e.ids for e in tok.encode_batch(list(texts[start:start + batch_size]))]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            at = width - len(r) if padding_side == "left" else 0
            ids[i, at:at + len(r)] = torch.tensor(r)
            mask[i, at:at + len(r)] = 1
        with torch.inference_mode():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.double().numpy()
        for i, r in enumerate(rows):  # one row at a time, plainly
            at = width - len(r) if padding_side == "left" else 0
            h = hidden[i, at:at + len(r)]
            if mode == "mean":
                v = h.mean(0)
            elif mode == "max":
                v = h.max(0)
            elif mode == "cls":
                v = h[0]
            elif mode == "lasttoken":
                v = h[-1]
            else:  # weightedmean: weights 1..n over the row's tokens
                w = np.arange(1, len(r) + 1, dtype=np.float64)
                v = (w[:, None] * h).sum(0) / w.sum()
            out.append(v)
    x = np.stack(out)
    for m in listed[2:]:
        kind = m["type"].rsplit(".", 1)[-1]
        if kind == "Normalize":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            continue
        where = folder / m["path"]
        cfg = _read_json(where / "config.json")
        if not str(cfg.get("activation_function", "")).endswith("Identity"):
            raise NotServable(f"{where}/config.json: activation {cfg.get('activation_function')}; this check reads "
                              f"identity Dense modules only")
        weights = load_file(str(where / "model.safetensors"))
        x = x @ weights["linear.weight"].double().numpy().T
        if cfg.get("bias", True):
            x = x + weights["linear.bias"].double().numpy()
    return x.astype(np.float32)


def check_folder(folder: str | Path) -> dict:
    """Load ``folder`` as a server would and compare with the vectors kept at export; returns
    ``{"texts", "max_error", "ok"}`` per padding side. Raises NotServable when it cannot load."""
    from safetensors import safe_open

    from .export import VERIFY_TOLERANCE

    folder = Path(folder)
    path = folder / CHECK_FILE
    if not path.is_file():
        record = folder / "strata_export.json"
        why = json.loads(record.read_text()).get("custom_because") if record.is_file() else None
        raise NotServable(f"{folder}: no {CHECK_FILE}" + (f"; it is a custom export: {why}" if why else
                                                          " (not a standard export of strata export)"))
    with safe_open(str(path), "np") as f:
        texts = json.loads(f.metadata()["texts"])
        want = f.get_tensor("vectors")
    result = {"texts": len(texts), "tolerance": VERIFY_TOLERANCE}
    for side in ("right", "left"):
        got = encode_as_server(folder, texts, padding_side=side)
        result[side] = relative_error(got, want)
    result["ok"] = max(result["right"], result["left"]) <= VERIFY_TOLERANCE
    return result


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Largest per-row error relative to that row's norm."""
    if got.shape != want.shape:
        return float("inf")
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float((np.abs(got - want).max(axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-12)).max())

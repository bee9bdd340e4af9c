"""Sentence-transformers modules that serve one Strata variant (written by ``strata export``).

An exported folder holds two modules, listed in its ``modules.json``:

- ``StrataTransformer`` (the folder's root): the model truncated to the blocks the variant
  needs (saved as safetensors, loaded with ``AutoModel`` and no remote code) and its tokenizer.
  ``preprocess`` tokenises exactly as ``pipeline.templates.tokenize`` does (the template's
  pieces apart from the text, ``max_length`` cutting the text, never the template) and pads
  left or right (``padding_side``); ``forward`` runs the truncated pass with position ids that
  count each row's own tokens (as ``Encoder.hidden_states``) and returns the hidden states of
  the variant's layers (``layer_embeddings``; the deepest one also as ``token_embeddings``)
  with the text's span (``span_mask``);
- ``StrataPooling`` (``1_StrataPooling/``): Strata's pooling of each layer (``pipeline.pooling``;
  the span, prompt tokens left out, for a template other than plain), the L2 normalisation of
  the output's settings, the layer mix (weights as recorded) and the fitted transform
  (``transform.safetensors``: the mean and basis, applied in float64 as ``Transform.apply``).

Loading imports this module from the installed ``strata`` package; the folder holds no code.
sentence-transformers 6 asks ``trust_remote_code=True`` before it imports any module class
outside its own package, installed ones included: ``SentenceTransformer(DIR,
trust_remote_code=True)``. Nothing from the folder runs (its ``modules.json`` names
``pipeline.serve.*``, a dotted path that is never looked up as a file of the folder).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch

try:
    from sentence_transformers.base.modules import InputModule, Module  # sentence-transformers >= 6
except ImportError as e:  # pragma: no cover - the 5.x layout, or no sentence-transformers at all
    try:
        from sentence_transformers.models import InputModule, Module
    except ImportError:
        raise ImportError("serving an exported variant needs sentence-transformers: pip install 'strata[serve]'") from e

from .pooling import pool
from .templates import Template, tokenize as tokenize_template

MODEL_CONFIG = "strata_config.json"
TRANSFORM_FILE = "transform.safetensors"


def _hub_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("token", "cache_folder", "revision", "local_files_only") if k in kwargs}


class StrataTransformer(InputModule):
    """Template tokenisation and the truncated forward pass of one variant (module doc)."""

    config_file_name = MODEL_CONFIG
    config_keys = ["template_name", "template_text", "max_length", "append_eos", "layers", "n_layers",
                   "padding_side"]
    save_in_root = True

    def __init__(self, model, tokenizer, *, template_name: str, template_text: str, max_length: int,
                 append_eos: bool, layers: Sequence[int], n_layers: int, padding_side: str = "right"):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.template = Template(template_name, template_text)
        self.template_name, self.template_text = template_name, template_text
        self.max_length = int(max_length)
        self.append_eos = bool(append_eos)
        self.layers = [int(x) for x in layers]
        self.n_layers = int(n_layers)  # N of the source model: layer N is after its final norm
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side {padding_side!r}: choose 'right' or 'left'")
        self.padding_side = padding_side
        blocks = _blocks(model)
        deepest = max(self.layers)
        if deepest < self.n_layers and len(blocks) < max(deepest, 1):
            raise ValueError(f"the saved model has {len(blocks)} block(s); layer {deepest} needs {max(deepest, 1)}")
        if deepest == self.n_layers and len(blocks) != self.n_layers:
            raise ValueError(f"layer {deepest} is after the final norm of all {self.n_layers} blocks, but the saved "
                             f"model has {len(blocks)}")
        from .encoder import pad_id

        self.pad_id = pad_id(tokenizer)

    # ------------------------------------------------------------------ sentence-transformers API
    @property
    def max_seq_length(self) -> int:
        return self.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.max_length = int(value)

    def get_embedding_dimension(self) -> int:
        return int(self.model.config.hidden_size)

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        """Token ids under the template, padded (``padding_side``), the attention mask and the text's span."""
        from .encoder import check_texts

        texts = list(inputs)
        check_texts(texts, ": an exported Strata variant embeds texts")
        if prompt:
            texts = [prompt + t for t in texts]
        tok = tokenize_template(self.tokenizer, texts, self.max_length, self.template, self.append_eos)
        n = len(tok.ids)
        width = max((len(r) for r in tok.ids), default=0)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        span = torch.zeros((n, width), dtype=torch.long)
        for i, row in enumerate(tok.ids):
            start, stop = int(tok.spans[i, 0]), int(tok.spans[i, 1])
            if stop <= start:
                raise ValueError(f"text {i} has no tokens; every text needs at least one")
            offset = width - len(row) if self.padding_side == "left" else 0
            input_ids[i, offset:offset + len(row)] = torch.as_tensor(row, dtype=torch.long)
            mask[i, offset:offset + len(row)] = 1
            span[i, offset + start:offset + stop] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "span_mask": span}

    def tokenize(self, texts: list[str], **kwargs) -> dict[str, torch.Tensor]:
        """sentence-transformers 5.x calls ``tokenize``; the same as ``preprocess``."""
        return self.preprocess(texts)

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        hidden = self.hidden_states(features["input_ids"], features["attention_mask"])
        features["layer_embeddings"] = [hidden[layer] for layer in self.layers]
        features["token_embeddings"] = hidden[max(self.layers)]
        return features

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
        """The source model's ``hidden_states[i]`` for the variant's layers (``encoder.capture``)."""
        from .encoder import capture

        return capture(self.model, _blocks(self.model), self.n_layers, input_ids, attention_mask, self.layers)

    # ------------------------------------------------------------------ saving and loading
    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(output_path, safe_serialization=True)
        self.save_tokenizer(output_path)
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", model_kwargs: dict | None = None,
             **kwargs) -> "StrataTransformer":
        from transformers import AutoModel, AutoTokenizer

        hub = _hub_kwargs(kwargs)
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub)
        if not config:
            raise ValueError(f"{model_name_or_path}: no {MODEL_CONFIG} (not a folder written by strata export)")
        where = cls.load_dir_path(model_name_or_path, subfolder=subfolder, **hub)
        # the model's own code never runs: a transformers architecture, safetensors weights
        opts = {k: v for k, v in (model_kwargs or {}).items() if k in ("dtype", "torch_dtype", "attn_implementation")}
        model = AutoModel.from_pretrained(where, use_safetensors=True, trust_remote_code=False, **opts)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
        return cls(model, tokenizer, **{k: config[k] for k in cls.config_keys if k in config})


class StrataPooling(Module):
    """Pool, normalise, mix and transform, exactly as Strata makes the variant (module doc)."""

    config_keys = ["pooling", "layers", "span", "normalize", "weights", "transform", "dim"]

    def __init__(self, *, pooling: str, layers: Sequence[int], span: bool, normalize: bool, dim: int,
                 weights: Sequence[float] | None = None, transform: str = "none",
                 mean: np.ndarray | None = None, basis: np.ndarray | None = None):
        super().__init__()
        self.pooling, self.layers, self.span = pooling, [int(x) for x in layers], bool(span)
        self.normalize, self.dim = bool(normalize), int(dim)
        self.weights = None if weights is None else [float(w) for w in weights]
        if self.weights is not None and len(self.weights) != len(self.layers):
            raise ValueError(f"{len(self.weights)} mix weights for {len(self.layers)} layers")
        if self.weights is None and len(self.layers) != 1:
            raise ValueError(f"{len(self.layers)} layers and no mix weights")
        self.transform = transform
        if transform != "none" and mean is None:
            raise ValueError(f"transform {transform}: no fitted mean")
        # plain tensors, not buffers: the model's .to(dtype) must never round them (applied in float64)
        self._mean = None if mean is None else torch.from_numpy(np.asarray(mean, dtype=np.float64))
        self._basis = None if basis is None else torch.from_numpy(np.asarray(basis, dtype=np.float64))

    def get_embedding_dimension(self) -> int:
        if self.transform.startswith("whiten") and self._basis is not None:
            return int(self._basis.shape[1])
        return self.dim

    get_sentence_embedding_dimension = get_embedding_dimension  # the name sentence-transformers 5.x asks

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        mask = features["attention_mask"]
        span = features["span_mask"] if self.span else None
        vecs = []
        for hidden in features["layer_embeddings"]:
            v = pool(hidden, mask, [self.pooling], span)[self.pooling]  # float32
            if self.normalize:
                v = torch.nn.functional.normalize(v, dim=-1)
            vecs.append(v)
        if self.weights is None:
            x = vecs[0]
        else:  # mixes.apply_mix: each layer's vector L2-normalised, then weighted
            x = torch.zeros_like(vecs[0])
            for v, w in zip(vecs, self.weights):
                x = x + torch.tensor(w, dtype=torch.float32) * (v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        if self.transform != "none":  # transforms.Transform.apply, in float64
            c = x.to(torch.float64) - self._mean.to(x.device)
            if self.transform.startswith("abtt"):
                b = self._basis.to(x.device)
                c = c - (c @ b) @ b.T
            elif self.transform.startswith("whiten"):
                c = c @ self._basis.to(x.device)
            x = c.to(torch.float32)
        features["sentence_embedding"] = x
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        if self._mean is not None:
            from safetensors.numpy import save_file

            arrays = {"mean": self._mean} | ({"basis": self._basis} if self._basis is not None else {})
            # C order: safetensors writes the buffer as it lies (eigh's basis is Fortran-ordered)
            save_file({k: np.ascontiguousarray(v.numpy()) for k, v in arrays.items()},
                      os.path.join(output_path, TRANSFORM_FILE))

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> "StrataPooling":
        hub = _hub_kwargs(kwargs)
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub)
        arrays = {}
        if config.get("transform", "none") != "none":
            from safetensors.numpy import load_file

            path = cls.load_file_path(model_name_or_path, TRANSFORM_FILE, subfolder=subfolder, **hub)
            if path is None:
                raise ValueError(f"{model_name_or_path}/{subfolder}: transform {config['transform']} without its "
                                 f"{TRANSFORM_FILE}")
            arrays = load_file(path)
        return cls(**{k: config[k] for k in cls.config_keys if k in config}, **arrays)

    def __repr__(self) -> str:
        return f"StrataPooling({json.dumps(self.get_config_dict())})"


def _blocks(model) -> torch.nn.ModuleList:
    from .encoder import find_blocks

    return find_blocks(model)

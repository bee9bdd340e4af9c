"""Strata: batch embeddings from decoder-only LLMs, every layer x pooling from one forward pass."""

from .encoder import EncodeResult, EncodeStats, Encoder
from .request import EncodeSettings, ModelInfo, Request, Resources, resolve
from .variants import POOLINGS, SpecError, Variant, make_variants, parse_layers, parse_poolings

__all__ = [
    "Encoder", "EncodeResult", "EncodeStats", "EncodeSettings", "ModelInfo", "Request", "Resources", "resolve",
    "POOLINGS", "SpecError", "Variant", "make_variants", "parse_layers", "parse_poolings",
]
__version__ = "0.1.0"

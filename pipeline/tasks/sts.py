"""STS: Spearman of the cosine of sentence pairs against gold scores (``evaluate.evaluate_sts``)."""

from ..evaldata import load_sts as load

__all__ = ["load"]

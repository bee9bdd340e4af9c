"""Retrieval: nDCG@10 of exact (or index-backed) cosine search over a BEIR corpus
(``evaluate.evaluate_retrieval``)."""

from ..evaluate import load_retrieval as load

__all__ = ["load"]

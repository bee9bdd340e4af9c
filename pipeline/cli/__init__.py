"""``strata``: a thin command line over the library. Errors print one line, not a traceback.

``main`` (the console script, ``pipeline.cli:main``) and the root parser are in ``main.py``; the
options several verbs share in ``options.py``; each verb in a module of its own, its ``register(sub)``
beside its handler. Importing this package imports no model, Ray or FAISS code: handlers import the
library lazily, so ``strata --help`` stays fast.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]

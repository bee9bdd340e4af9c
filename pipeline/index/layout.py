"""Where an output's index files live, and the package's error.

An index ``indexes/{variant}.faiss`` comes with ``{variant}.ids.parquet`` (the string ids in index
order: FAISS only knows row numbers) and ``{variant}.json`` (how it was built and the search
parameters to use). The JSON is written last, so its presence means the three files belong together.
``indexes/_built.json`` records, per variant, what its index was built from (``fresh.py``).
"""

from __future__ import annotations

from pathlib import Path

from ..storage import safe_name
from ..variants import Variant

INDEXES = "indexes"
BUILT_FILE = "_built.json"  # per variant: the committed files, kind and fitted pieces its index was built from


class IndexBuildError(ValueError):
    """Embedding files that cannot be indexed as asked."""


def index_path(out_dir: str | Path, variant: Variant) -> Path:
    """Where a variant's index lives in an output: ``indexes/{variant}.faiss`` (+ .ids.parquet, .json)."""
    return Path(out_dir) / INDEXES / f"{safe_name(variant.name)}.faiss"


def sidecars(out_path: Path) -> tuple[Path, Path]:
    """The ids table and the JSON of an index file."""
    return out_path.with_suffix(".ids.parquet"), out_path.with_suffix(".json")

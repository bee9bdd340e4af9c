"""Where an output's index files live, how to get one as a local path, and the package's error.

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


def local_index(store, variant: Variant, scratch: Path) -> Path | None:
    """A variant's index in the output ``store`` (a ``storage.Output``) as a local path, which FAISS
    needs: in place on a local disk; on an object store its three files, and a Ray-built index's
    inverted lists and re-ranking vectors, copied into ``scratch``. None where its three files are not
    all there."""
    import json

    from ..stores import exists, is_local

    name = index_path("", variant).name
    files = [Path(name), *sidecars(Path(name))]
    if is_local(store.fs):
        local = Path(store.path(INDEXES, name))
        return local if all((local.parent / f.name).is_file() for f in files) else None
    if not all(exists(store.fs, store.path(INDEXES, f.name)) for f in files):
        return None
    scratch.mkdir(parents=True, exist_ok=True)
    for f in files:
        store.fs.get_file(store.path(INDEXES, f.name), str(scratch / f.name))
    params = json.loads((scratch / files[2].name).read_text())
    for extra in (params.get("ondisk"), params.get("vectors")):
        if extra:
            store.fs.get_file(store.path(INDEXES, extra), str(scratch / extra))
    return scratch / name

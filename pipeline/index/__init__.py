"""FAISS indexes per variant of an output: read, parameters, FAISS factory, build, load and search,
freshness; ``index.ray``: the distributed IVF-PQ (``strata index --engine ray``).

| module | idea |
| --- | --- |
| ``layout`` | where an index's files live (``indexes/{variant}.faiss`` + ``.ids.parquet`` + ``.json``), a local copy of one on an object store (``local_index``), the error |
| ``reading`` | the committed vectors streamed in chunks and validated; ``read_vectors`` is the public reader |
| ``params`` | kind by size, IVF / IVF-PQ options and defaults, for both engines |
| ``factory`` | the FAISS index of a kind and dtype (float, int8, binary) |
| ``build`` | the local engine: ``build_index``, ``build_indexes``, ``memory_index`` |
| ``loaded`` | ``load_index``, ``LoadedIndex.search`` (exact re-ranking for both engines), ``recall_at_k`` |
| ``tune`` | ``--target-recall``: the cheapest nprobe x rerank reaching a recall on the index's own vectors |
| ``fitted`` | the digest of the fitted pieces an index is built through (mix weights, transforms, int8 ranges) |
| ``fresh`` | ``indexes/_built.json``: which indexes are up to date (files, kind, fitted digest) |
| ``ray`` | the Ray engine (``record``, ``tasks``, ``driver``, ``merge``) |
"""

from .build import build_index, build_indexes, memory_index
from .factory import sq_trained
from .fitted import output_digest, pieces_digest, source_digest
from .fresh import committed_files, index_status, record_built, wanted_variants
from .layout import BUILT_FILE, INDEXES, IndexBuildError, index_path, local_index, sidecars
from .loaded import LoadedIndex, load_index, recall_at_k
from .params import FLAT_MAX_ROWS, HNSW_MAX_ROWS, KINDS, choose_kind, ivfpq_options
from .reading import read_vectors

__all__ = ["BUILT_FILE", "FLAT_MAX_ROWS", "HNSW_MAX_ROWS", "INDEXES", "KINDS", "IndexBuildError", "LoadedIndex",
           "build_index", "build_indexes", "choose_kind", "committed_files", "index_path", "index_status",
           "ivfpq_options", "load_index", "local_index", "memory_index", "output_digest", "pieces_digest", "read_vectors",
           "recall_at_k", "record_built", "sidecars", "source_digest", "sq_trained", "wanted_variants"]

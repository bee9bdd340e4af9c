"""IVF-PQ indexes built on Ray (``strata index --engine ray``): trained once, encoded part by part in
parallel tasks, merged on disk, resumed from ``indexes/{variant}.build.json``.

For outputs too big for one process (``auto`` picks it above ``RAY_MIN_ROWS`` rows or when
``--ray-address`` is given). ``record`` (the build record, pure types), ``tasks`` (worker code),
``driver`` (``build_ivfpq_ray``), ``merge`` (the on-disk merge). The same IVF-PQ as the local
engine's (``params.ivfpq_options``, the same seeded training sample and k-means seed) and the same
exact re-ranking of ``rerank x k`` candidates, read from a memory-mapped file of the indexed vectors
rather than held in memory. The output must be a directory every Ray node can read and write (a
shared file system).
"""

from .driver import ENGINES, RAY_MIN_ROWS, build_ivfpq_ray, choose_engine, output_rows, shards_of
from .record import (TRAINED, BuildKey, BuildRecord, Part, Shard, build_record_path, parts_dir,
                     read_build_record)
from .tasks import encode_shard, sample_positions, sample_shard, train_ivfpq, train_sample

__all__ = ["ENGINES", "RAY_MIN_ROWS", "TRAINED", "BuildKey", "BuildRecord", "Part", "Shard", "build_ivfpq_ray",
           "build_record_path", "choose_engine", "encode_shard", "output_rows", "parts_dir", "read_build_record",
           "sample_positions", "sample_shard", "shards_of", "train_ivfpq", "train_sample"]

"""``embed`` on Ray Data, one idea a module: ``shards`` (input listing and the incremental plan),
``reuse`` (content-addressed reuse: which rows are copied, not embedded), ``stages`` (what runs on workers), ``commit`` (exactly-once bookkeeping and the commit point),
``run`` (the driver that wires them together)."""

from ..parts import read_part
from .commit import Committer, EmbedError, EmbedSummary
from .run import _resources, embed, read_embeddings
from .shards import UNIT_ROWS, Shard, inspect_shards, list_shards, plan, work_units
from .stages import EMBED_BATCH_ROWS, EmbedActor, read_and_tokenize, write_parts

__all__ = ["embed", "EmbedSummary", "EmbedError", "read_embeddings", "read_part", "Committer", "Shard",
           "inspect_shards", "list_shards", "plan", "work_units", "UNIT_ROWS", "EmbedActor", "read_and_tokenize",
           "write_parts", "_resources", "EMBED_BATCH_ROWS"]

"""Content-addressed reuse: which rows of a run are copied from stored vectors instead of embedded.

A row's key is blake2b-128 of its text, keyed by the output's signature (model, weights, variants,
templates, max length, dtype, ...): within one output, equal keys mean equal vectors. Every part
stores its rows' keys (column ``key``), so the output's key table is its parts' own key columns:
(key, part URL, position in the part). It is never a second copy that could disagree with the parts;
``key_table`` reads it as a Ray Data dataset (``part_keys`` on each part), joinable with anything.

Before a run embeds anything, its plan is made (``make_plan``). The keys of the rows to embed (the
new or changed shards; ``unit_keys``) and the key table of the output's committed parts are brought
together by key, and each key decides (``resolve``):

- a stored row holds it: every new row with that key copies the stored vectors, bit for bit
  (whatever the shard, file name or id: a re-exported corpus under new file names re-embeds nothing);
- no stored row holds it: the first new row (in shard, row order) is embedded, and the other new
  rows with that text are deferred: the run's second pass copies them from the part the first
  wrote (duplicate texts in one run are embedded once).

Up to ``DRIVER_ROWS`` keys (new and stored together, 16 bytes each) are brought together on the
driver; above that, by a Ray Data hash shuffle (``repartition(keys=["key"])``, each block one
hash partition), so the table is never in the driver's memory. Rows whose key lands in two blocks
are only embedded where they could have been copied: never wrong. The plan is written into the
run's staging folder, one folder per work unit (``{unit:08d}/``), which that unit's read task reads.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .shards import read_unit

DRIVER_ROWS = 1_000_000  # keys brought together on the driver (at most ~40 MB); above: a Ray Data shuffle
SHUFFLE_ROWS = 4_000_000  # keys per hash partition of the shuffle
SHARD_BITS = 40  # a row's order key: shard << 40 | row (a shard of up to 10^12 rows)

KEYS_SCHEMA = pa.schema([("key", pa.binary(16)), ("gid", pa.int64()), ("unit", pa.int32()),
                         ("src_part", pa.int32()), ("src_row", pa.int64())])  # ~40 bytes a row in the shuffle
PLAN_SCHEMA = pa.schema([("row", pa.int64()), ("src", pa.string()), ("src_row", pa.int64()), ("defer", pa.bool_())])


def text_keys(texts: list, salt: bytes) -> list[bytes | None]:
    """Each text's key: blake2b-128 of its UTF-8 bytes keyed by ``salt`` (``reuse_salt``)."""
    return [None if t is None else hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16,
                                                    key=salt).digest() for t in texts]


def reuse_salt(signature: dict) -> bytes:
    """What keys are keyed on: the request's signature, which is fixed for an output."""
    return hashlib.blake2b(json.dumps(signature, sort_keys=True, default=str).encode(), digest_size=32).digest()


def unit_keys(batch: pa.Table, *, fs, text_column: str, id_column: str | None, salt: bytes,
              only: str | None = None, storage: dict | None = None) -> pa.Table:
    """The keys of the work units' rows that would be embedded (rejected rows have none). ``only``:
    a plan folder; just the rows it defers (the second pass). ``storage``: the driver's storage options."""
    from ..stores import use_storage_options
    from .stages import planned_rows

    use_storage_options(storage or {})
    out = []
    for unit in batch.to_pylist():
        try:
            got = read_unit(unit, fs, text_column, id_column)
        except Exception:  # noqa: BLE001 - the read stage reports this unit's error; nothing to plan
            continue
        good = np.array([r is None for r in got.reasons], dtype=bool)
        if only is not None:
            plan = planned_rows(only, unit)
            deferred = plan["row"][plan["defer"]] - int(unit["row0"])
            keep = np.zeros(len(good), dtype=bool)
            keep[deferred] = True
            good &= keep
        idx = np.flatnonzero(good)
        keys = text_keys([got.texts[i] for i in idx], salt)
        out.append(pa.table({"key": pa.array(keys, pa.binary(16)),
                             "gid": pa.array((int(unit["shard"]) << SHARD_BITS) + got.rows[idx]),
                             "unit": pa.array(np.full(len(idx), int(unit["unit"]), dtype=np.int32)),
                             "src_part": pa.array(np.full(len(idx), -1, dtype=np.int32)),
                             "src_row": pa.array(np.full(len(idx), -1, dtype=np.int64))}, schema=KEYS_SCHEMA))
    return pa.concat_tables(out) if out else KEYS_SCHEMA.empty_table()


def part_keys(batch: pa.Table, *, storage: dict | None = None) -> pa.Table:
    """The key table of the parts named in ``batch`` (columns ``url`` and ``part``, its number): key,
    part number, position."""
    from ..stores import filesystem, open_ranged, use_storage_options

    use_storage_options(storage or {})
    out = []
    for url, number in zip(batch.column("url").to_pylist(), batch.column("part").to_pylist()):
        fs, path = filesystem(url)
        try:
            with open_ranged(fs, path) as f:
                if path.endswith(".arrow"):
                    t = pa.ipc.open_file(f).read_all()
                    keys = t.column("key") if "key" in t.column_names else None
                else:
                    pf = pq.ParquetFile(f)
                    keys = pf.read(columns=["key"]).column("key") if "key" in pf.schema_arrow.names else None
        except (OSError, pa.ArrowInvalid):  # a missing or unreadable part offers nothing to copy
            continue
        if keys is None:  # parts written before keys were stored
            continue
        keys = keys.combine_chunks().cast(pa.binary(16))
        valid = np.flatnonzero(pc.is_valid(keys).to_numpy(zero_copy_only=False))
        out.append(pa.table({"key": keys.take(pa.array(valid)), "gid": pa.array(np.full(len(valid), -1, np.int64)),
                             "unit": pa.array(np.full(len(valid), -1, dtype=np.int32)),
                             "src_part": pa.array(np.full(len(valid), number, dtype=np.int32)),
                             "src_row": pa.array(valid)},
                            schema=KEYS_SCHEMA))
    return pa.concat_tables(out) if out else KEYS_SCHEMA.empty_table()


def key_table(urls: list[str], storage: dict | None = None):
    """The key table of the parts ``urls`` as a Ray Data dataset: key, part (its number in ``urls``), row."""
    import ray

    return ray.data.from_items([{"url": u, "part": i} for i, u in enumerate(urls)]).map_batches(
        part_keys, batch_size=8, batch_format="pyarrow", num_cpus=0.5, fn_kwargs=dict(storage=storage)
    ).select_columns(["key", "src_part", "src_row"]).rename_columns({"src_part": "part", "src_row": "row"})


def resolve(table: pa.Table, sources: list[str], *, dedup: bool, every: bool) -> pa.Table:
    """Decide each new row (``gid`` >= 0) of a table holding every row of its keys (new and stored):
    copy (``src``: the URL in ``sources`` of the key's first stored row's part, ``src_row``), defer (a
    later duplicate of a new text, with ``dedup``), or embed. Returns plan rows (``unit`` and
    PLAN_SCHEMA) for copies and deferrals, and with ``every`` for the embedded rows too."""
    if table.num_rows == 0:
        return pa.table({"unit": pa.array([], pa.int32()), **{f.name: pa.array([], f.type) for f in PLAN_SCHEMA}})
    table = table.combine_chunks()
    order = pc.sort_indices(table, sort_keys=[("key", "ascending"), ("gid", "ascending")])
    t = table.take(order)
    keys = t.column("key").to_numpy(zero_copy_only=False)
    gid = t.column("gid").to_numpy()
    n = len(gid)
    start = np.ones(n, dtype=bool)
    start[1:] = keys[1:] != keys[:-1]
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))  # each row's group's first row
    new = gid >= 0
    copied = new & (gid[first] < 0)  # stored rows sort first (gid -1): the key is in a part
    deferred = new & ~copied & ~start if dedup else np.zeros(n, dtype=bool)
    listed = new & (copied | deferred | every)
    idx = np.flatnonzero(listed)
    src_of = first[idx]
    part = t.column("src_part").to_numpy()[src_of]
    src = pa.array([sources[p] if c else None for p, c in zip(part, copied[idx])], pa.string())
    return pa.table({"unit": t.column("unit").take(pa.array(idx)),
                     "row": pa.array(gid[idx] & ((1 << SHARD_BITS) - 1)),
                     "src": src, "src_row": pa.array(np.where(copied[idx], t.column("src_row").to_numpy()[src_of], -1)),
                     "defer": pa.array(deferred[idx])})


def write_plan(rows: pa.Table, plan_url: str, storage: dict | None = None) -> pa.Table:
    """Write plan rows into ``{plan_url}/{unit:08d}/``, one file per unit; one summary row per unit."""
    from ..stores import filesystem, use_storage_options

    use_storage_options(storage or {})
    fs, root = filesystem(plan_url)
    summary = []
    units = rows.column("unit").to_numpy()
    for u in np.unique(units):
        mine = rows.filter(pa.array(units == u)).select(PLAN_SCHEMA.names)
        folder = f"{root}/{int(u):08d}"
        fs.makedirs(folder, exist_ok=True)
        with fs.open(f"{folder}/{uuid.uuid4().hex[:12]}.parquet", "wb") as f:
            pq.write_table(mine.cast(PLAN_SCHEMA), f)
        copied = pc.is_valid(mine.column("src"))
        summary.append({"unit": int(u), "copied": int(pc.sum(pc.cast(copied, pa.int64())).as_py() or 0),
                        "deferred": int(pc.sum(pc.cast(mine.column("defer"), pa.int64())).as_py() or 0),
                        "sources": sorted(set(pc.drop_null(mine.column("src")).to_pylist())), "dropped": 0})
    return pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA)


SUMMARY_SCHEMA = pa.schema([("unit", pa.int64()), ("copied", pa.int64()), ("deferred", pa.int64()),
                            ("sources", pa.list_(pa.string())), ("dropped", pa.int64())])


def dropped_rows(table: pa.Table, leaving: set[int]) -> int:
    """Rows the output stops holding: per key, the stored rows in ``leaving`` parts (of shards the run
    replaces or removes) beyond the new rows with that key (repeated texts counted one for one)."""
    if table.num_rows == 0 or not leaving:
        return 0
    keys = table.column("key").to_numpy(zero_copy_only=False)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    group = np.cumsum(np.r_[True, keys[1:] != keys[:-1]]) - 1
    gid = table.column("gid").to_numpy()[order]
    part = table.column("src_part").to_numpy()[order]
    going = np.isin(part, np.fromiter(leaving, dtype=np.int64)) & (gid < 0)
    n = group[-1] + 1
    return int(np.maximum(np.bincount(group, going, n) - np.bincount(group, gid >= 0, n), 0).sum())


def _resolve_and_write(block: pa.Table, *, sources: list[str], leaving: set[int], plan_url: str, dedup: bool,
                       every: bool, storage: dict | None) -> pa.Table:
    summary = write_plan(resolve(block, sources, dedup=dedup, every=every), plan_url, storage)
    dropped = dropped_rows(block, leaving)
    return pa.concat_tables([summary, pa.Table.from_pylist(
        [{"unit": -1, "copied": 0, "deferred": 0, "sources": [], "dropped": dropped}], schema=SUMMARY_SCHEMA)])


@dataclass
class Plan:
    """What ``make_plan`` wrote: where, and per unit what it lists."""

    url: str
    copied: int = 0
    deferred: int = 0
    units: set[int] = field(default_factory=set)  # units with plan rows
    deferring: set[int] = field(default_factory=set)  # units with deferred rows
    sources: set[str] = field(default_factory=set)  # parts copied from
    dropped: int = 0  # rows the output stops holding (``dropped_rows``)

    def add(self, s: dict) -> None:
        self.dropped += s.get("dropped") or 0
        if s["unit"] < 0:  # a block's count of dropped rows
            return
        self.copied += s["copied"]
        self.deferred += s["deferred"]
        self.units.add(s["unit"])
        if s["deferred"]:
            self.deferring.add(s["unit"])
        self.sources.update(s["sources"] or [])


def make_plan(units: list[dict], sources: list[str], plan_url: str, *, fs, text_column: str, id_column: str | None,
              salt: bytes, dedup: bool, only: str | None = None, storage: dict | None = None,
              ray=None, driver_rows: int = DRIVER_ROWS, stored_rows: int = 0, leaving: set[int] | None = None) -> Plan:
    """The plan of a pass over ``units`` against the parts ``sources`` (see module doc). ``only``: the
    first pass's plan (the second pass plans its deferred rows, listing each). ``stored_rows``: how
    many rows ``sources`` hold (from the manifest), which with the units' rows picks driver or Ray.
    ``leaving``: the numbers of the ``sources`` whose shards the run replaces or removes (``Plan.dropped``)."""
    leaving = leaving or set()
    plan = Plan(plan_url)
    every = only is not None
    total = sum(int(u["rows"]) for u in units) + stored_rows
    kw = dict(fs=fs, text_column=text_column, id_column=id_column, salt=salt, only=only, storage=storage)
    if ray is None or total <= driver_rows:
        table = pa.concat_tables([unit_keys(pa.Table.from_pylist(units), **kw),
                                  part_keys(pa.table({"url": pa.array(sources, pa.string()),
                                                      "part": pa.array(range(len(sources)), pa.int32())}),
                                            storage=storage)])
        for s in write_plan(resolve(table, sources, dedup=dedup, every=every), plan_url, storage).to_pylist():
            plan.add(s)
        plan.dropped = dropped_rows(table, leaving)
        return plan
    new = ray.data.from_items(units).map_batches(unit_keys, batch_size=1, batch_format="pyarrow", num_cpus=0.5,
                                                 fn_kwargs=kw)
    ds = new.union(ray.data.from_items([{"url": u, "part": i} for i, u in enumerate(sources)]).map_batches(
        part_keys, batch_size=8, batch_format="pyarrow", num_cpus=0.5, fn_kwargs=dict(storage=storage))) \
        if sources else new
    ds = ds.repartition(max(1, -(-total // SHUFFLE_ROWS)), keys=["key"])
    ds = ds.map_batches(_resolve_and_write, batch_size=None, batch_format="pyarrow", num_cpus=0.5,
                        fn_kwargs=dict(sources=sources, leaving=leaving, plan_url=plan_url, dedup=dedup, every=every,
                                       storage=storage))
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        for s in batch.to_pylist():
            plan.add(s)
    return plan

"""Property: whatever order parts arrive in and wherever the driver crashes, a re-run ends with
exactly one output row per input row (the commit logic, without Ray)."""

import tempfile
import uuid

import numpy as np
import pyarrow as pa
from hypothesis import given, settings, strategies as st

from pipeline.runner import Committer, EmbedSummary, Shard, plan, write_parts
from pipeline.storage import Output

DIM = 3
COLUMN = "emb_1_mean"


def _embed_stage_batch(shard: int, rel: str, rows: list[int]) -> pa.Table:
    """What the embed actors hand to the write stage for these rows."""
    n = len(rows)
    values = pa.array(np.repeat(np.asarray(rows, dtype=np.float32), DIM))
    return pa.table({
        "_shard": pa.array([shard] * n, pa.int32()), "_row": pa.array(rows, pa.int64()),
        "id": pa.array([f"{rel}#{r}" for r in rows]), "_truncated": pa.array([False] * n),
        "_reject": pa.array([None] * n, pa.string()), "_error": pa.array([None] * n, pa.string()),
        "_tokens": pa.array([1] * n, pa.int64()), "_padded": pa.array([1] * n, pa.int64()),
        "_key": pa.array([None] * n, pa.binary(16)),
        COLUMN: pa.FixedSizeListArray.from_arrays(values, DIM),
    })


def _in_order(strategy):
    """Marker draw for a plain run: no extra cuts, no retried tasks, parts in order."""
    raise AssertionError("never drawn from")


def _run(out: Output, shards: list[Shard], draw_order, crash_after: int | None) -> None:
    manifest = out.read_manifest() or {"variants": [{"name": "L1.mean", "column": COLUMN}], "shards": []}
    out.sweep(manifest)
    todo, _, _ = plan(manifest, shards)
    run_id = uuid.uuid4().hex[:8]
    manifest["runs"] = [run_id]  # as embed does: the run is named before it stages anything
    out.write_manifest(manifest)
    committer = Committer(out, manifest, todo, EmbedSummary(output=out.url), run_id)
    metas = []
    for i, s in enumerate(todo):
        rows = list(range(s.rows))
        cuts = [] if draw_order is _in_order else sorted(set(draw_order(st.lists(st.integers(1, max(1, s.rows - 1)), max_size=3))))
        for part in np.split(np.array(rows), cuts):
            if len(part):
                batch = _embed_stage_batch(i, s.rel, part.tolist())
                if draw_order is not _in_order and draw_order(st.booleans()):  # a retried task: its first attempt's part is an orphan
                    write_parts(batch, output_url=out.url, run_id=run_id, keys=[t.key for t in todo],
                                columns=[COLUMN], fmt="parquet")
                metas += write_parts(batch, output_url=out.url, run_id=run_id, keys=[t.key for t in todo],
                                     columns=[COLUMN], fmt="parquet").to_pylist()
    order = draw_order(st.permutations(range(len(metas)))) if draw_order is not _in_order else range(len(metas))
    for k in order:
        if crash_after is not None and crash_after == 0:
            return  # the driver dies here: nothing after this point happens
        committer.feed(metas[k])
        crash_after = None if crash_after is None else crash_after - 1
    committer.finish()
    out.write_manifest(manifest)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 25), min_size=1, max_size=4), crashes=st.lists(st.integers(0, 12), max_size=3),
       data=st.data())
def test_any_interleaving_and_crashes_end_exactly_once(sizes, crashes, data):
    with tempfile.TemporaryDirectory() as tmp:
        out = Output(tmp + "/out")
        shards = [Shard(f"/in/s{i}.parquet", f"s{i}.parquet", "fp", rows=n, row_groups=[n]) for i, n in enumerate(sizes)]
        for crash in crashes:
            _run(out, shards, data.draw, crash)
        _run(out, shards, data.draw, None)
        table = out.read_table()
        want = sorted(f"s{i}.parquet#{r}" for i, n in enumerate(sizes) for r in range(n))
        assert sorted(table.column("id").to_pylist()) == want
        # every vector is the one made for its own row
        rows = np.array([int(x.split("#")[1]) for x in table.column("id").to_pylist()], dtype=np.float32)
        vecs = np.stack(table.column(COLUMN).to_numpy(zero_copy_only=False))
        assert (vecs == rows[:, None]).all()
        manifest = out.read_manifest()
        assert sorted(s["rel"] for s in manifest["shards"]) == sorted(s.rel for s in shards)
        assert sum(s["rows_written"] for s in manifest["shards"]) == sum(sizes)


def test_a_write_that_fails_halfway_is_never_visible(tmp_path, monkeypatch):
    """The part is written aside and renamed only when complete: a failure leaves no part file."""
    import pyarrow.parquet as pq
    from fsspec.implementations.local import LocalFileOpener

    real_write = LocalFileOpener.write

    def half_then_fail(self, data):  # the upload of a part's bytes stops halfway
        real_write(self, bytes(memoryview(data)[: len(data) // 2]))
        raise OSError("disk full (injected)")

    out = Output(str(tmp_path / "out"))
    batch = _embed_stage_batch(0, "s0.parquet", [0, 1, 2])
    out.write_manifest({"variants": [{"name": "L1.mean", "column": COLUMN}], "shards": [], "runs": ["r1"]})
    monkeypatch.setattr(LocalFileOpener, "write", half_then_fail)
    try:
        write_parts(batch, output_url=out.url, run_id="r1", keys=["s0"], columns=[COLUMN], fmt="parquet")
    except OSError:
        pass
    else:
        raise AssertionError("the injected failure did not surface")
    staged = list((tmp_path / "out" / "_staging" / "r1" / "s0").iterdir())
    assert staged and all(".tmp-" in p.name for p in staged)  # only the aside copy, never a part name
    monkeypatch.undo()
    # the next run sweeps it and commits the shard in full
    shard = Shard("/in/s0.parquet", "s0.parquet", "fp", rows=3, row_groups=[3])
    _run(out, [shard], _in_order, None)
    assert sorted(out.read_table().column("id").to_pylist()) == [f"s0.parquet#{r}" for r in range(3)]
    assert not list((tmp_path / "out").rglob("*.tmp-*"))  # swept
    assert pq.read_table(out.embedding_files()[0]).num_rows == 3

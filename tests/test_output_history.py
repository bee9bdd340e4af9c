"""A property test over whole histories of an output (issue #43): random sequences of adding, editing
and deleting input shards, embedding, embedding with a crash after the first commit, indexing and
searching, on the tiny model. After every step:

- every committed id is in the output exactly once, and after a completed embed the committed ids
  are exactly the input's;
- every manifest entry's files exist with the size, rows and checksum recorded at commit;
- search covers exactly the committed rows, or warns that its index is stale.
"""

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from pipeline.index import build_indexes, index_path, load_index
from pipeline.runner import commit, read_embeddings
from pipeline.search import search_output
from pipeline.storage import Output
from reference import embed

OPTS = dict(layers="-1", poolings="mean", id_column="id", max_length=32, progress=False)
WORDS = "river stone cloud light tree house bird fish wind rain sun moon hill road".split()


class Crash(RuntimeError):
    """Injected after the first commit of a run: what a killed driver leaves."""


def test_random_histories_keep_the_output_consistent(ray_local, model_dir, tmp_path_factory, monkeypatch):
    class History(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            root = tmp_path_factory.mktemp("history")
            self.inp, self.out = root / "in", root / "out"
            self.inp.mkdir()
            self.queries = root / "q.parquet"
            pq.write_table(pa.table({"query_id": ["q"], "text": ["river stone"]}), self.queries)
            self.shards: dict[str, list[str]] = {}  # file name -> ids
            self.next_id = 0
            self.edits = 0
            self.embedded = False

        def write(self, name: str, ids: list[str]) -> None:
            texts = [" ".join(WORDS[(int(i[1:]) * 7 + self.edits + k) % len(WORDS)] for k in range(3)) for i in ids]
            pq.write_table(pa.table({"id": ids, "text": texts}), self.inp / name)
            self.shards[name] = ids

        @initialize(rows=st.integers(1, 9))
        def an_indexed_output(self, rows):  # every history starts from an embedded, indexed output
            self.add_shard(rows)
            self.embed_all()
            self.index()

        @rule(rows=st.integers(1, 9))
        def add_shard(self, rows):
            ids = [f"d{self.next_id + i}" for i in range(rows)]
            self.next_id += rows
            self.write(f"s{len(self.shards)}-{self.next_id}.parquet", ids)

        @precondition(lambda self: self.shards)
        @rule(data=st.data())
        def edit_shard(self, data):
            name = data.draw(st.sampled_from(sorted(self.shards)))
            self.edits += 1
            self.write(name, self.shards[name])

        @precondition(lambda self: len(self.shards) > 1)
        @rule(data=st.data())
        def delete_shard(self, data):
            name = data.draw(st.sampled_from(sorted(self.shards)))
            (self.inp / name).unlink()
            del self.shards[name]

        @precondition(lambda self: self.shards)
        @rule()
        def embed_all(self):
            embed(str(self.inp), str(self.out), model=model_dir, **OPTS)
            self.embedded = True
            want = sorted(i for ids in self.shards.values() for i in ids)
            assert sorted(self.committed()) == want  # exactly the input's rows, once each

        @precondition(lambda self: self.shards)
        @rule()
        def embed_and_crash_after_one_commit(self):
            real, calls = commit._commit, []

            def crash_after_first(*a, **kw):
                if calls:
                    raise Crash("injected after the first commit")
                calls.append(1)
                return real(*a, **kw)

            with monkeypatch.context() as m:
                m.setattr(commit, "_commit", crash_after_first)
                try:
                    embed(str(self.inp), str(self.out), model=model_dir, **OPTS)
                except Crash:
                    pass

        @precondition(lambda self: self.embedded)
        @rule()
        def index(self):
            build_indexes(str(self.out), None, "flat")

        @invariant()
        def search_covers_the_committed_rows_or_warns(self):  # searched after every step, stale or not
            if not (self.embedded and index_path(self.out, self._variant()).is_file()):
                return
            records = []
            handler = logging.Handler()
            handler.emit = records.append
            log = logging.getLogger("pipeline.search")
            log.addHandler(handler)
            try:
                search_output(str(self.out), self._variant().name, str(self.queries), k=5)
            finally:
                log.removeHandler(handler)
            stale = [r.getMessage() for r in records if "is stale" in r.getMessage()]
            covered = sorted(load_index(index_path(self.out, self._variant())).ids)
            if covered != sorted(self.committed()):
                assert stale, "the index misses committed rows (or holds old ones) and search said nothing"

        def _variant(self):
            from pipeline.variants import Variant

            manifest = Output(str(self.out)).read_manifest()
            return Variant.from_row(manifest["variants"][0])

        def committed(self) -> list[str]:
            if not (self.out / "manifest.json").exists() or not Output(str(self.out)).read_manifest().get("shards"):
                return []
            return read_embeddings(str(self.out), ["id"]).column("id").to_pylist()

        @invariant()
        def every_committed_id_once_and_every_part_intact(self):
            ids = self.committed()
            assert len(ids) == len(set(ids)), "a committed id appears twice"
            manifest = Output(str(self.out)).read_manifest() if (self.out / "manifest.json").exists() else None
            if manifest:
                Output(str(self.out)).check_parts(manifest)  # files exist; size, rows and CRC-32 as recorded
                for entry in manifest["shards"]:
                    assert all(entry["parts"][f].get("crc32") for f in entry["files"]), entry

    run_state_machine_as_test(History, settings=settings(max_examples=6, stateful_step_count=8, deadline=None,
                                                         derandomize=True,
                                                         suppress_health_check=list(HealthCheck)))


pytestmark = pytest.mark.slow

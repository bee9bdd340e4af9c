"""The Ray engine's build record and the fitted-pieces digest, as pure values (no Ray, no files)."""

import numpy as np

from pipeline.derive import Reader
from pipeline.index import pieces_digest, source_digest
from pipeline.index.ray import BuildKey, BuildRecord, Shard
from pipeline.transforms import Transform
from pipeline.variants import Variant

OPTS = {"nlist": 4, "m": 2, "nbits": 4, "nprobe": 4, "train_rows": 400}


def key(**kw):
    return BuildKey(**{"columns": ("emb_3_mean",), "dim": 8, **kw})


def test_the_digest_is_of_content_not_of_objects_or_paths():
    rng = np.random.default_rng(0)
    mean, basis = rng.normal(size=8), rng.normal(size=(8, 4))
    t = Transform("whiten4", mean, basis)
    assert pieces_digest() is None and source_digest("emb_3_mean") is None  # a raw float column: nothing fitted
    d = pieces_digest(transform=t)
    assert d.startswith("sha256:") and d == pieces_digest(transform=Transform("whiten4", mean.copy(), basis.copy(),
                                                                              {"texts": 99}))  # not what it saw
    assert d != pieces_digest(transform=Transform("whiten4", mean + 1e-12, basis))  # one matrix entry moved
    assert d != pieces_digest(transform=Transform("abtt4", mean, basis))
    assert d != pieces_digest(transform=Transform("whiten4", mean, basis[:, :3]))
    assert pieces_digest(weights=[0.5, 0.5]) != pieces_digest(weights=[0.4, 0.6])
    assert pieces_digest(weights=[0.5, 0.5]) != pieces_digest(weights=[0.5, 0.5], transform=t)
    r = np.array([[-1.0] * 4, [1.0] * 4], np.float32)
    assert pieces_digest(ranges=r) != pieces_digest(ranges=r * 2) and source_digest("emb_3_mean", r) is not None
    reader = Reader(Variant(3, "mean", transform="whiten4"), ("emb_3_mean",), None, t)
    assert source_digest(reader) == d
    mixed = Reader(Variant.parse("M2-3.mean"), ("emb_2_mean", "emb_3_mean"), (0.5, 0.5))
    assert source_digest(mixed) == pieces_digest(weights=[0.5, 0.5])


def test_a_record_round_trips_and_a_key_change_is_a_different_key():
    rec = BuildRecord(key(fitted="sha256:ab"), OPTS)
    a, b = Shard("embeddings/s0/part-0.parquet", 100, 10), Shard("embeddings/s1/part-0.parquet", 200, 20)
    rec.trained("t0")
    assert rec.allocate(a) == 0 and rec.allocate(b) == 10 and rec.next_offset == 30
    rec.done(a, 0, "a.faiss", "t1", 0.5)
    back = BuildRecord.from_json(rec.to_json())
    assert back == rec and back.key == key(fitted="sha256:ab")
    assert key(fitted="sha256:ab") != key(fitted="sha256:cd") and key() != key(fitted="sha256:ab")
    assert key(nlist=8) != key()


def test_a_record_from_before_the_digest_keeps_raw_columns_only():
    old = {"nlist": None, "m": None, "nbits": 8, "nprobe": None, "train_rows": None, "seed": 0,
           "columns": ["emb_3_mean"], "dim": 8}
    assert BuildKey.from_json({**old, "transform": None}) == key()  # nothing fitted then or now: still valid
    stale = BuildKey.from_json({**old, "transform": "transforms/L3.mean_whiten8"})
    assert stale != key(fitted=pieces_digest(weights=[1.0])) and stale.fitted.startswith("unknown")
    rec = BuildRecord.from_json({"user": {**old, "transform": None}, "options": OPTS,
                                 "shards": {"k": {"fingerprint": {"rel": "x", "size": 1, "rows": 2}, "offset": 0,
                                                  "rows": 2, "part": "k.faiss", "peak_rss_mb": 12.0}}})
    assert rec.shards["k"].part == "k.faiss" and rec.allocated == {} and rec.trained_at is None


def test_ranges_are_reused_after_a_kill_and_given_up_when_a_shard_changes():
    rec = BuildRecord(key(), OPTS)
    a, b = Shard("a", 100, 10), Shard("b", 200, 20)
    assert (rec.allocate(a), rec.allocate(b)) == (0, 10)
    rec.done(a, 0, "a.1.faiss", "t")
    assert rec.reusable(a).part == "a.1.faiss" and rec.reusable(b) is None  # b was killed before it was recorded
    assert rec.allocate(b) == 10  # the killed build's range, no hole
    changed = Shard("a", 101, 11)
    assert rec.reusable(changed) is None
    assert rec.allocate(changed) == 30 and a.key not in rec.shards  # a new range; the old lists are dropped
    rec.done(changed, 30, "a.2.faiss", "t")
    rec.done(b, 10, "b.1.faiss", "t")
    assert rec.labels == 41
    gone = rec.forget([b.key])
    assert [p.part for p in gone] == ["a.2.faiss"] and set(rec.shards) == set(rec.allocated) == {b.key}
    rec.trained("t2")
    assert (rec.shards, rec.allocated, rec.next_offset, rec.labels) == ({}, {}, 0, 0)

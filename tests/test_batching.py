import numpy as np
from hypothesis import given, strategies as st

from pipeline.batching import padding_efficiency, plan_batches


@given(lengths=st.lists(st.integers(1, 600), min_size=0, max_size=300),
       budget=st.integers(1, 5000), rows=st.integers(1, 64), multiple=st.sampled_from([1, 8]))
def test_every_row_exactly_once_and_under_budget(lengths, budget, rows, multiple):
    batches = plan_batches(lengths, batch_tokens=budget, max_rows=rows, pad_multiple=multiple)
    seen = np.concatenate([b.indices for b in batches]) if batches else np.array([], dtype=int)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b.indices) <= rows
        assert b.padded_len >= max(lengths[i] for i in b.indices)
        assert b.padded_len % multiple == 0
        assert b.padded_tokens <= budget or len(b.indices) == 1


def test_sorted_batches_pad_little():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, size=2000)
    batches = plan_batches(lengths, batch_tokens=8192, max_rows=256)
    eff = padding_efficiency(int(lengths.sum()), sum(b.padded_tokens for b in batches))
    assert eff > 0.95


def test_short_rows_are_not_padded_to_a_long_one():
    """A small mixed input: one long abstract must not make ten short sentences pad to its length."""
    lengths = [491] + [10] * 10
    batches = plan_batches(lengths, batch_tokens=16384, max_rows=256)
    assert [len(b.indices) for b in batches] == [1, 10]
    eff = padding_efficiency(sum(lengths), sum(b.padded_tokens for b in batches))
    assert eff == 1.0

import itertools

import numpy as np
from hypothesis import given, strategies as st

from pipeline.batching import BATCH_COST_SHARE, padding_efficiency, plan_batches


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


def reference_least_cost(lengths, budget, max_rows, multiple, batch_cost):
    """Every way to cut the descending-sorted rows into consecutive batches, tried one by one."""
    ls = sorted(lengths, reverse=True)
    n = len(ls)
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=max(0, n - 1)):
        bounds = [0] + [k + 1 for k, c in enumerate(cuts) if c] + [n]
        cost = 0.0
        for a, b in zip(bounds, bounds[1:]):
            padded = max(1, -(-ls[a] // multiple) * multiple)
            if b - a > max_rows or ((b - a) * padded > budget and b - a > 1):
                break
            cost += (b - a) * padded + batch_cost
        else:
            best = min(best, cost)
    return best


@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=10), budget=st.integers(1, 300),
       rows=st.integers(1, 6), multiple=st.sampled_from([1, 8]), batch_cost=st.sampled_from([0, 5, 40, 500]))
def test_plan_costs_the_least_of_every_cut(lengths, budget, rows, multiple, batch_cost):
    batches = plan_batches(lengths, batch_tokens=budget, max_rows=rows, pad_multiple=multiple, batch_cost=batch_cost)
    cost = sum(b.padded_tokens + batch_cost for b in batches)
    assert cost == reference_least_cost(lengths, budget, rows, multiple, batch_cost)


def test_sorted_batches_pad_little():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, size=2000)
    batches = plan_batches(lengths, batch_tokens=8192, max_rows=256)
    eff = padding_efficiency(int(lengths.sum()), sum(b.padded_tokens for b in batches))
    assert eff > 0.97


def test_short_rows_are_not_padded_to_a_long_one():
    """A small mixed input: one long abstract must not make ten short sentences pad to its length."""
    lengths = [491] + [10] * 10
    batches = plan_batches(lengths, batch_tokens=16384, max_rows=256)
    assert [len(b.indices) for b in batches] == [1, 10]
    eff = padding_efficiency(sum(lengths), sum(b.padded_tokens for b in batches))
    assert eff == 1.0


def test_a_pass_is_not_spent_to_save_less_padding_than_it_costs():
    """Lengths 20 and 19: a second batch would save 10 padded tokens, less than a pass costs."""
    lengths = [20] * 10 + [19] * 10
    budget = 4096
    assert budget * BATCH_COST_SHARE > 10
    assert [len(b.indices) for b in plan_batches(lengths, batch_tokens=budget, max_rows=256)] == [20]
    assert [len(b.indices) for b in plan_batches(lengths, batch_tokens=budget, max_rows=256, batch_cost=5)] == [10, 10]

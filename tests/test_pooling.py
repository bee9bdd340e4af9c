import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pipeline.pooling import pool
from pipeline.variants import POOLINGS
from reference import naive_pool


def _batch(lengths, T, D, side, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(len(lengths), T, D, generator=g, dtype=torch.float64).float()
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    rows = []
    for i, n in enumerate(lengths):
        span = slice(T - n, T) if side == "left" else slice(0, n)
        mask[i, span] = 1
        rows.append(h[i, span].double().numpy())
    return h, mask, rows


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6), extra=st.integers(0, 4),
       side=st.sampled_from(["left", "right"]), seed=st.integers(0, 10_000))
def test_pooling_matches_naive_reference(lengths, extra, side, seed):
    T = max(lengths) + extra
    h, mask, rows = _batch(lengths, T, 8, side, seed)
    got = pool(h, mask, list(POOLINGS))
    for name in POOLINGS:
        for i, row in enumerate(rows):
            ref = naive_pool(row, name)
            assert np.abs(got[name][i].numpy() - ref).max() <= 1e-5 * max(1.0, np.linalg.norm(ref)), name


@pytest.mark.parametrize("pooling", POOLINGS)
def test_left_and_right_padding_agree(pooling):
    lengths = [1, 3, 7, 7, 2]
    hr, mr, rows = _batch(lengths, 9, 16, "right", 1)
    hl = torch.zeros_like(hr)
    ml = torch.zeros_like(mr)
    for i, n in enumerate(lengths):
        hl[i, 9 - n:] = hr[i, :n]
        hl[i, : 9 - n] = 1e6  # garbage in padding must not leak
        ml[i, 9 - n:] = 1
    a = pool(hr, mr, [pooling])[pooling]
    b = pool(hl, ml, [pooling])[pooling]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_one_token_text_falls_back_to_that_token():
    h, mask, rows = _batch([1], 4, 8, "right", 3)
    got = pool(h, mask, ["mean_nosink", "wmean_nosink"])
    for v in got.values():
        torch.testing.assert_close(v[0], h[0, 0])


def test_unknown_pooling_is_refused():
    h, mask, _ = _batch([2], 2, 4, "right", 0)
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(h, mask, ["avg"])

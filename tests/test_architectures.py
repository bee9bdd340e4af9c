"""Architecture coverage: tiny randomly initialised models of the common families.

For each family, every layer Strata captures (its forward pass stops after the deepest requested
block) must equal the untruncated model's ``hidden_states[i]``, every pooling must equal the
per-text reference, and left and right padding must agree. Families differ in embedding scaling
(Gemma), final norms (all; GPT-2's ``ln_f``), sliding-window layers (Mistral, Gemma 2/3),
learned position embeddings (GPT-2, BERT), parallel residuals (GPT-NeoX, Phi-3's fused
projections) and where their blocks live (``layers``, ``h``, ``encoder.layer``). An
architecture Strata cannot truncate safely is refused by name when the Encoder is built.
"""

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

from pipeline.encoder import Encoder
from pipeline.models import ModelError
from pipeline.request import EncodeSettings
from pipeline.variants import POOLINGS, Variant
from reference import fake_tokenizer, naive_hidden_states, naive_pool, rel_err

N_LAYERS = 3
_COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
_BERTISH = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                num_attention_heads=4, max_position_embeddings=128)
# sliding windows of 4 tokens, shorter than the longer test texts, so the window matters
FAMILIES = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=4),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=8),
    "gemma2": dict(_COMMON, head_dim=8, sliding_window=4),
    "gemma3_text": dict(_COMMON, head_dim=8, sliding_window=4,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "phi3": dict(_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": dict(vocab_size=101, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=128, bos_token_id=1,
                 eos_token_id=2),
    "gpt_neox": dict(_BERTISH, bos_token_id=1, eos_token_id=2),
    "bert": dict(_BERTISH),
}
TEXTS = [[5, 17, 3, 88, 41, 9, 60], [12, 7, 33], [71, 4, 25, 96, 18, 2, 54, 30, 11, 63, 8, 47],
         [29], [50, 14, 77, 6, 91, 38, 22, 65, 3]]


def tiny(model_type: str):
    """The family's default attention implementation, as ``from_pretrained`` would pick it."""
    cfg = AutoConfig.for_model(model_type, **FAMILIES[model_type])
    torch.manual_seed(0)
    return AutoModel.from_config(cfg).eval()


def encode(model, side: str):
    variants = [Variant(layer, p) for layer in range(N_LAYERS + 1) for p in POOLINGS]
    enc = Encoder(model, fake_tokenizer(pad_token_id=0), variants,
                  EncodeSettings(padding_side=side, batch_tokens=4096), device="cpu")
    return enc, enc.encode_ids(TEXTS)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_layer_and_pooling_equals_the_untruncated_reference(model_type):
    model = tiny(model_type)
    _, got = encode(model, "right")
    worst = 0.0
    for i, ids in enumerate(TEXTS):
        hidden = naive_hidden_states(model, ids)  # the full model, one unpadded text
        assert len(hidden) == N_LAYERS + 1
        for v, vecs in got.items():
            worst = max(worst, rel_err(vecs[i].astype(np.float64), naive_pool(hidden[v.layer], v.pooling)))
    assert worst < 1e-5, f"{model_type}: worst relative error {worst:.1e}"


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_truncated_pass_stops_early_and_matches(model_type):
    """Asking only for layer 1 runs one block, and still gives hidden_states[1]."""
    model = tiny(model_type)
    enc = Encoder(model, fake_tokenizer(pad_token_id=0), [Variant(1, "mean")], EncodeSettings(batch_tokens=4096),
                  device="cpu")
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(enc.blocks)]
    try:
        got = enc.encode_ids(TEXTS)[Variant(1, "mean")]
    finally:
        for h in handles:
            h.remove()
    assert set(ran) == {0}
    for i, ids in enumerate(TEXTS):
        ref = naive_pool(naive_hidden_states(model, ids)[1], "mean")
        assert rel_err(got[i].astype(np.float64), ref) < 1e-5


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_left_and_right_padding_agree(model_type):
    model = tiny(model_type)
    enc, right = encode(model, "right")
    _, left = encode(model, "left")
    assert len(enc.blocks) == N_LAYERS
    for v in right:
        np.testing.assert_allclose(left[v], right[v], rtol=1e-5, atol=1e-6, err_msg=f"{model_type} {v.name}")


@pytest.mark.parametrize("model_type,kwargs,fragment", [
    # ALBERT shares one block across its layers: no list of per-layer blocks to hook
    ("albert", dict(_BERTISH), "cannot truncate AlbertModel: no list of its 3 transformer blocks"),
    # Mamba reports hidden states that are not its blocks' outputs: caught by the comparison
    ("mamba", dict(vocab_size=101, hidden_size=32, num_hidden_layers=N_LAYERS, state_size=4),
     "cannot truncate MambaModel safely: its captured layer 0 differs"),
    # an encoder-decoder cannot be driven as one stack of blocks
    ("t5", dict(vocab_size=101, d_model=32, d_ff=64, num_layers=N_LAYERS, num_heads=4, d_kv=8),
     "cannot run T5Model layer by layer"),
])
def test_unsafe_architectures_are_refused_by_name(model_type, kwargs, fragment):
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()
    with pytest.raises(ModelError, match=fragment):
        Encoder(model, fake_tokenizer(pad_token_id=0), [Variant(1, "mean")], device="cpu")


def test_a_model_whose_reported_states_differ_is_refused():
    """The load-time check compares, not trusts: a model reporting other hidden states is refused."""
    model = tiny("llama")
    forward = model.forward

    def shifted(*args, **kwargs):
        out = forward(*args, **kwargs)
        if out.hidden_states is not None:
            out.hidden_states = tuple(h + 1.0 if i == 2 else h for i, h in enumerate(out.hidden_states))
        return out

    model.forward = shifted
    with pytest.raises(ModelError, match="captured layer 2 differs"):
        Encoder(model, fake_tokenizer(pad_token_id=0), [Variant(1, "mean")], device="cpu")

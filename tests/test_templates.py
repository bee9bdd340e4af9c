"""Prompt templates: the text's span is exact, prompt tokens are left out of pooling (but `last`
reads the whole sequence), echo pools its second copy, padding sides agree; layer mixes of
stored vectors equal pooling mixed hidden states."""

import numpy as np
import pytest

from pipeline import EncodeSettings, Encoder, SpecError, make_variants, resolve
from pipeline.mixes import apply_mix
from pipeline.templates import BUILTIN, parse_template, parse_templates, tokenize
from pipeline.variants import POOLINGS, Variant, mix_variants, parse_mixes
from reference import naive_hidden_states, naive_pool, rel_err

TOL = 1e-5
TEXTS = ["A man is playing a guitar.", "x", "The weather is lovely today, isn't it? Very much so indeed."]
LINEAR = [p for p in POOLINGS if p != "max"]


@pytest.fixture(scope="module")
def tiny(model_dir):
    return Encoder.load(model_dir, layers="all", poolings=list(POOLINGS), device="cpu")


def span_pool(h: np.ndarray, start: int, stop: int, pooling: str) -> np.ndarray:
    """Plainly written: pool the rows start..stop-1 of one sequence's hidden states (n, D)."""
    if pooling == "last":
        return h[-1]  # the whole sequence's last token
    span = h[start:stop]
    if start > 0 and pooling.endswith("_nosink"):  # the sink is the sequence's first token, not in the span
        return naive_pool(span, pooling.replace("_nosink", ""))
    return naive_pool(span, pooling)


def by_hand(tokenizer, template: str, text: str) -> tuple[list[int], int, int]:
    """Token ids of a templated text and the span of its last copy, assembled piece by piece: a
    piece's trailing spaces are tokenised with the text after it (where they merge into its first
    word), anything else on its own."""
    pieces = template.split("{text}")
    ids, start, stop = [], 0, 0
    for k, piece in enumerate(pieces):
        if k == len(pieces) - 1:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
            break
        body = piece.rstrip()
        ids += tokenizer(body, add_special_tokens=False)["input_ids"]
        ws = piece[len(body):]
        word = tokenizer(ws + text, add_special_tokens=False)["input_ids"]
        own = 0  # the whitespace's own tokens, when it does not merge: not the text's
        while own < len(word) - 1 and tokenizer.decode(word[:own + 1]).strip() == "":
            own += 1
        start, stop = len(ids) + own, len(ids) + len(word)
        ids += word
    with_specials = tokenizer("x")["input_ids"]
    lead = with_specials[: with_specials.index(tokenizer("x", add_special_tokens=False)["input_ids"][0])]
    return lead + ids, start + len(lead), stop + len(lead)


@pytest.mark.parametrize("template", ["Query: {text}", "echo", "Represent this:\n\n{text}", "A  {text}  B",
                                      "Query:\u00a0{text}", "Frage:\u3000{text}", "Query:\n{text}"])
def test_text_after_a_space_reads_as_it_does_in_the_whole_string(tiny, template):
    """A piece ending in whitespace: the ids equal tokenising the whole templated string at once
    (the text's first word takes its leading space, 'Ġhello', not 'Ġ' 'hello'), and the span holds
    exactly the tokens that overlap the text's characters."""
    t = parse_template(template)
    texts = ["hello world", "A man is playing a guitar", "x"]
    tok = tokenize(tiny.tokenizer, texts, 128, t)
    for i, text in enumerate(texts):
        whole = t.text.replace("{text}", text)
        enc = tiny.tokenizer(whole, return_offsets_mapping=True)
        assert tok.ids[i] == enc["input_ids"], (template, text)
        first = whole.rindex(text)
        inside = [k for k, (a, b) in enumerate(enc["offset_mapping"]) if a < first + len(text) and b > first
                  and whole[a:b].strip()]
        assert list(range(*tok.spans[i])) == inside, (template, text)


@pytest.mark.parametrize("name", ["prompteol", "echo", 'Query: "{text}"'])
@pytest.mark.parametrize("side", ["right", "left"])
def test_templated_variant_equals_pooling_the_span_by_hand(model_dir, name, side):
    enc = Encoder.load(model_dir, layers="1,3,4", poolings=list(POOLINGS), templates=[name], padding_side=side,
                       batch_tokens=64)
    template = parse_template(name)
    res = enc.encode(TEXTS)
    assert {v.template for v in res} == {template.name}
    for i, text in enumerate(TEXTS):
        ids, start, stop = by_hand(enc.tokenizer, template.text, text)
        hidden = naive_hidden_states(enc.model, ids)
        for v in res:
            assert rel_err(res[v][i], span_pool(hidden[v.layer], start, stop, v.pooling)) <= TOL, (v.name, i)


def test_echo_pools_exactly_the_second_copy(tiny):
    tok = tokenize(tiny.tokenizer, ["one two three"], 64, parse_template("echo"))
    ids, (start, stop) = tok.ids[0], tok.spans[0]
    # both slots follow "...: ", so each copy is the text as it reads after a space
    bare = tiny.tokenizer(" one two three", add_special_tokens=False)["input_ids"]
    assert ids[start:stop] == bare and ids.count(bare[0]) == 2  # the text is there twice
    first_copy = ids.index(bare[0])
    assert first_copy < start and ids[first_copy:first_copy + len(bare)] == bare


def test_plain_template_is_todays_tokenisation_and_names(tiny):
    tok = tokenize(tiny.tokenizer, TEXTS, 512)
    assert tok.ids == [tiny.tokenizer(t)["input_ids"] for t in TEXTS]
    assert [v.name for v in make_variants("1", "mean", 4, ["plain", "prompteol"])] == ["L1.mean",
                                                                                        "prompteol/L1.mean"]
    assert Variant(1, "mean", "prompteol").column == "emb_1_mean__prompteol"
    assert Variant.parse("emb_1_mean_nosink__prompteol") == Variant(1, "mean_nosink", "prompteol")


def test_truncation_cuts_the_text_never_the_template(tiny):
    long = " ".join(["word"] * 500)
    t = parse_template("prompteol")
    tok = tokenize(tiny.tokenizer, [long, "short"], 40, t)
    assert len(tok.ids[0]) == 40 and tok.truncated.tolist() == [True, False]
    suffix = tiny.tokenizer(t.pieces[1], add_special_tokens=False)["input_ids"]
    assert tok.ids[0][-len(suffix):] == suffix  # the prompt's end survives: `last` still reads it


def test_template_errors_are_one_line(model_dir):
    with pytest.raises(SpecError, match="has no \\{text\\} slot"):
        parse_templates(["Summarise this"])
    with pytest.raises(SpecError, match="has 3 \\{text\\} slots"):
        parse_templates(["{text} {text} {text}"])
    with pytest.raises(SpecError, match="unknown template 'promptEOL'|unknown template 'prompteo'"):
        parse_templates("prompteo")
    with pytest.raises(SpecError, match="leaves no room for the text: shorten it or raise max_length"):
        resolve(model_dir, templates=["echo"], max_length=8, digest=False)
    assert set(BUILTIN) == {"plain", "prompteol", "echo"}


def test_mix_of_stored_vectors_equals_pooling_the_mixed_hidden_states(tiny):
    """sum_l w_l v_l/||v_l|| == pool(sum_l (w_l/||v_l||) h_l) for every linear pooling."""
    res = tiny.encode(TEXTS)
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    layers = [1, 2, 3, 4]
    ids, _ = tiny.tokenize(TEXTS)
    for pooling in LINEAR:
        mixed = apply_mix([res[Variant(layer, pooling)] for layer in layers], weights)
        for i, row in enumerate(ids):
            hidden = naive_hidden_states(tiny.model, row)
            norms = [np.linalg.norm(naive_pool(hidden[layer], pooling)) for layer in layers]
            h = sum(w / n * hidden[layer] for w, n, layer in zip(weights, norms, layers))
            assert rel_err(mixed[i], naive_pool(h, pooling)) <= TOL, (pooling, i)


def test_mix_specs_and_errors():
    raw = make_variants("2:6", "mean,last", 8)
    got = mix_variants(raw, parse_mixes("2:6,learned:3:5", 8))
    assert [v.name for v in got] == ["M2-6.mean", "M2-6.last", "W3-5.mean", "W3-5.last"]
    assert Variant.parse("W3-5.mean|whiten64") == Variant(5, "mean", "plain", "learned:3-5", "whiten64")
    with pytest.raises(SpecError, match=r"needs layers 0..6, but layers \[0, 1\] are not embedded"):
        mix_variants(raw, parse_mixes("0:6", 8))
    with pytest.raises(SpecError, match="a mix needs at least two layers"):
        parse_mixes("4:4", 8)


def test_settings_carry_append_eos(model_dir):
    enc = Encoder.load(model_dir, layers="-1", poolings="last", append_eos=True)
    tok = enc.tokenize_templates(["hello there"])["plain"]
    assert tok.ids[0][-1] == enc.tokenizer.eos_token_id and isinstance(enc.settings, EncodeSettings)


def test_learned_mix_finds_the_informative_layer():
    """Synthetic layers: only layer 2 carries the similarity; the learned weights must find it,
    for the STS loss and for the contrastive retrieval loss."""
    from pipeline.mixes import fit_retrieval, fit_sts

    rng = np.random.default_rng(0)
    n, d = 400, 16
    signal = rng.normal(size=(n, d))
    noise = [rng.normal(size=(2 * n, d)) for _ in range(4)]
    per_layer = [z.copy() for z in noise]
    per_layer[2][:n] = signal
    per_layer[2][n:] = signal + 0.3 * rng.normal(size=(n, d))  # row i and n+i are a similar pair
    gold = np.ones(n)
    r1, r2 = np.arange(n), np.arange(n) + n
    r2[: n // 2] = rng.permutation(np.arange(n, 2 * n))[: n // 2]  # half the pairs are random: gold 0
    gold[: n // 2] = 0.0
    w = fit_sts(per_layer, r1, r2, gold)
    assert w.argmax() == 2 and w[2] > 0.5 and abs(w.sum() - 1) < 1e-6
    w = fit_retrieval(per_layer, np.arange(n), np.arange(n) + n)
    assert w.argmax() == 2 and w[2] > 0.5


def test_a_template_whose_text_takes_whitespace_is_signed_so(model_dir):
    """Outputs of such a template made before whitespace went with the text were tokenised
    otherwise: the signature says which rule made them, so they are not resumed into."""
    from pipeline.request import signature_difference

    echo = resolve(model_dir, templates=["echo"], digest=False).signature()
    assert echo["template_tokens"] == "whitespace-with-text"
    before = {k: v for k, v in echo.items() if k != "template_tokens"}
    assert signature_difference(before, echo) == ["template_tokens"]
    newline = resolve(model_dir, templates=["Represent this:\n\n{text}"], digest=False).signature()
    assert newline["template_tokens"] == "whitespace-with-text"  # "ĊĊ" + "hello" before, "Ċ" "Ċ" "hello" now
    assert "template_tokens" not in resolve(model_dir, templates=["prompteol"], digest=False).signature()
    assert "template_tokens" not in resolve(model_dir, digest=False).signature()


@pytest.mark.parametrize("template", ["Query:\n{text}", "Query: {text}", "Query:\u00a0{text}"])
def test_whitespace_before_the_text_is_never_all_the_text_gets(tiny, template):
    """The piece's whitespace counts as the template's (check_fits refuses a max_length that leaves
    the text nothing but it); an empty text has an empty span, and no copy of a text is longer than
    max_length."""
    t = parse_template(template)
    fixed = tokenize(tiny.tokenizer, [""], 64, t)
    assert fixed.spans[0][0] == fixed.spans[0][1]  # nothing of the prompt's whitespace is pooled
    n = len(fixed.ids[0])
    with pytest.raises(SpecError, match="leaves no room for the text"):
        tokenize(tiny.tokenizer, ["hello"], n, t)
    tok = tokenize(tiny.tokenizer, ["hello world and more", "7 days"], n + 1, t)
    for ids, (start, stop) in zip(tok.ids, tok.spans):
        assert len(ids) <= n + 1 and stop - start == 1
        assert tiny.tokenizer.decode(ids[start:stop]).strip()  # a real piece of the text, not whitespace


def test_vectors_made_before_whitespace_went_with_the_text_are_not_met_by_new_ones(model_dir, tmp_path):
    """Search (queries against an output's documents) and a probe recipe refuse echo vectors made
    under the older rule, naming it; the same made under the current rule are accepted."""
    import json

    from pipeline.recipe import CONTRACT, Recipe, RecipeError
    from pipeline.search import query_request
    from pipeline.templates import TOKENS_RULE

    sig = {"model": str(model_dir), "max_length": 64, "templates": {"echo": BUILTIN["echo"], "plain": "{text}"}}
    echo, plain = Variant.parse("echo/L1.mean"), Variant.parse("L1.mean")
    with pytest.raises(SpecError, match="embedded under template echo before a piece's trailing whitespace"):
        query_request({"signature": sig}, echo)
    assert query_request({"signature": sig}, plain).variants == (plain,)  # plain vectors are as they were
    assert query_request({"signature": dict(sig, template_tokens=TOKENS_RULE)}, echo).variants == (echo,)
    probe = {"contract": CONTRACT, "model": {"name": str(model_dir)}, "settings": {"templates": sig["templates"]},
             "recipe": [{"variant": echo.name, "sources": [echo.name]}]}
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    with pytest.raises(RecipeError, match=r"embedded under template echo .* \(run the probe again\)"):
        Recipe.load(tmp_path / "probe.json")
    probe["settings"]["template_tokens"] = TOKENS_RULE
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    assert Recipe.load(tmp_path / "probe.json").variants == [echo]

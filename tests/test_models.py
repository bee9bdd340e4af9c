import json

import pytest

from pipeline import models
from reference import tiny_llama


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _count_conversions(monkeypatch):
    calls = []
    real = models._convert_gguf

    def counting(src, dest):
        calls.append(dest)
        real(src, dest)

    monkeypatch.setattr(models, "_convert_gguf", counting)
    return calls


@pytest.mark.slow
def test_gguf_converted_once_then_cached_and_corrupt_cache_rebuilt(cache, monkeypatch):
    calls = _count_conversions(monkeypatch)
    src = models.resolve("smollm2-135m")
    first = models.materialize(src)
    assert len(calls) == 1 and (first / "model.safetensors").exists()
    assert models.materialize(src) == first and len(calls) == 1  # second load: the cache, no conversion

    # a corrupt weight file (truncated) no longer matches the marker: rebuilt, not trusted
    weights = first / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(1000)
    assert models.materialize(src) == first and len(calls) == 2
    marker = json.loads((first / models.CACHE_MARKER).read_text())
    assert weights.stat().st_size == marker["files"]["model.safetensors"]["size"]
    assert models.sha256_file(weights) == marker["files"]["model.safetensors"]["sha256"]

    # a missing marker (e.g. a conversion killed half-way) also forces a rebuild
    (first / models.CACHE_MARKER).unlink()
    models.materialize(src)
    assert len(calls) == 3

    model, tok, _ = models.load("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not hasattr(model, "lm_head")


def test_pickle_weights_refused_unless_opted_in(tmp_path):
    import torch

    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(models.ModelError, match="pickle-format weights"):
        models.load(str(tmp_path / "m"))


def test_weights_digest_changes_with_weights(tmp_path):
    tiny_llama(seed=0).save_pretrained(tmp_path / "a")
    tiny_llama(seed=1).save_pretrained(tmp_path / "b")
    da = models.weights_digest(models.resolve(str(tmp_path / "a")))
    assert da.startswith("sha256:") and da == models.weights_digest(models.resolve(str(tmp_path / "a")))
    assert da != models.weights_digest(models.resolve(str(tmp_path / "b")))


@pytest.mark.parametrize("spec, fragment", [("no-such-model", "unknown model"), ("./missing/dir", "unknown model")])
def test_unknown_model_is_named(spec, fragment):
    with pytest.raises(models.ModelError, match=fragment):
        models.resolve(spec)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(models.ModelError, match="not a .gguf"):
        models.resolve(str(f))

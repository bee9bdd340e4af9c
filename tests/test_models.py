import json
import shutil
import threading
import time

import pytest

from pipeline import models
from reference import tiny_llama


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _count_conversions(monkeypatch, tmp_path):
    """Counts conversions. The first is the real one; later ones (the rebuilds) put a copy of its
    result in place, as the real one would write it again (file times kept, so its marker holds):
    what is tested is when the cache converts, and a real conversion of SmolLM2 costs ~25 s."""
    calls = []
    real = models._convert_gguf
    first = tmp_path / "first-conversion"

    def counting(src, dest):
        calls.append(dest)
        if len(calls) == 1:
            real(src, dest)
            shutil.copytree(dest, first)
        else:
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(first, dest)

    monkeypatch.setattr(models, "_convert_gguf", counting)
    return calls


@pytest.mark.slow
def test_gguf_converted_once_then_cached_and_corrupt_cache_rebuilt(cache, monkeypatch, tmp_path):
    calls = _count_conversions(monkeypatch, tmp_path)
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


def test_concurrent_first_loads_convert_once(cache, monkeypatch, tmp_path):
    """Two loads of a GGUF at once (two processes on one cache: test workers, two commands): one
    converts, the other waits for it and uses its folder, never converting again over it."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def slow_convert(src, dest):  # writes what the real one writes: weights, then the marker last
        calls.append(dest)
        time.sleep(0.5)
        dest.mkdir(parents=True)
        (dest / "model.safetensors").write_bytes(b"w" * 10)
        st = (dest / "model.safetensors").stat()
        files = {"model.safetensors": {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": "-"}}
        (dest / models.CACHE_MARKER).write_text(json.dumps({"files": files}))

    monkeypatch.setattr(models, "_convert_gguf", slow_convert)
    src = models.ModelSource("m", str(tmp_path), "m.gguf")
    got = []
    threads = [threading.Thread(target=lambda: got.append(models.materialize(src))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 3 and len(set(got)) == 1


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
    with pytest.raises(models.ModelError, match=fragment) as e:
        models.resolve(spec)
    assert all(alias in str(e.value) for alias in models.ALIASES)  # the known aliases are listed


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(models.ModelError, match="not a .gguf"):
        models.resolve(str(f))


def _model_dir(path, **files):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    for name, content in files.items():
        (path / f"{name}.json").write_text(json.dumps(content))
    return path


@pytest.mark.parametrize("files, expected, source", [
    # sentence-transformers' own setting wins over the tokenizer's
    (dict(sentence_bert_config={"max_seq_length": 256}, tokenizer_config={"model_max_length": 512}), 256,
     "sentence_bert_config.json max_seq_length"),
    (dict(tokenizer_config={"model_max_length": 1024}), 1024, "tokenizer model_max_length"),
    # transformers' "no limit" placeholder is not a limit
    (dict(tokenizer_config={"model_max_length": 1000000000000000019884624838656}), 512, "Strata's default"),
    (dict(), 512, "Strata's default"),
    # never past the position embeddings
    (dict(tokenizer_config={"model_max_length": 4096}), 2048, "capped at config max_position_embeddings"),
])
def test_default_max_length_is_the_models_own(tmp_path, files, expected, source):
    value, where = models.default_max_length(_model_dir(tmp_path / "m", **files))
    assert value == expected
    assert source in where


def test_request_takes_the_models_max_length_unless_given():
    from pipeline.request import resolve

    minilm = resolve("all-minilm-l6-v2", digest=False)
    assert minilm.settings.max_length == 256  # its sentence_bert_config.json, as MTEB runs it
    assert "sentence_bert_config.json" in minilm.max_length_line()
    given = resolve("all-minilm-l6-v2", max_length=100, digest=False)
    assert (given.settings.max_length, given.max_length_source) == (100, "given")
    assert resolve("smollm2-135m", digest=False).settings.max_length == 512  # its GGUF tokenizer names no limit

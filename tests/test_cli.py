"""The command line: options reach the one resolved request unchanged, commands print what they did,
and errors are one line."""

import json

import numpy as np
import pytest

from pipeline import Encoder, Variant
from pipeline.cli import build_parser, main
from pipeline.cli.options import request_from_args


def test_options_resolve_into_one_request(model_dir):
    args = build_parser().parse_args([
        "embed", "in", "out", "--model", model_dir, "--layers", "50%,-1", "--poolings", "mean_nosink,last",
        "--max-length", "64", "--dtype", "float16", "--normalize", "--batch-tokens", "1000", "--format", "arrow",
        "--actors", "3", "--gpus-per-actor", "0", "--ray-address", "ray://head:10001"])
    r = request_from_args(args)
    assert r.variants == (Variant(2, "mean_nosink"), Variant(2, "last"), Variant(4, "mean_nosink"), Variant(4, "last"))
    s = r.settings
    assert (s.max_length, s.dtype, s.normalize, s.batch_tokens) == (64, "float16", True, 1000)
    assert r.output_format == "arrow" and (r.model.n_layers, r.model.dim) == (4, 32)
    assert (r.resources.actors, r.resources.gpus_per_actor, r.resources.ray_address) == (3, 0, "ray://head:10001")
    assert r.model.weights_digest.startswith("sha256:")
    # no budget given: the device default, resolved here (a CPU machine), not later in an actor
    r2 = request_from_args(build_parser().parse_args(["encode", "--model", model_dir, "x"]), digest=False)
    assert r2.settings.batch_tokens == 4096 and r2.model.weights_digest is None


def test_encode_prints_every_variant_of_the_request(model_dir, capsys):
    assert main(["encode", "--model", model_dir, "--layers", "1,-1", "--poolings", "mean,last",
                 "a small test", "another one"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ref = Encoder.load(model_dir, layers="1,-1", poolings="mean,last").encode(["a small test", "another one"])
    assert [line.split()[0] for line in lines[:-1]] == [v.name for v in ref]
    for line, (v, arr) in zip(lines, ref.items()):
        assert "shape=(2, 32)" in line
        first = json.loads(line.split("first row=")[1])
        np.testing.assert_allclose(first, arr[0, :4], atol=1e-4)
    assert json.loads(lines[-1])["rows"] == 2


def test_eval_local_engine_writes_results_without_ray(model_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    rng = np.random.default_rng(1)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    pairs.write_text("".join(json.dumps({"sentence1": " ".join(rng.choice(words, 5)),
                                         "sentence2": " ".join(rng.choice(words, 4)), "score": i % 5}) + "\n"
                             for i in range(20)))
    out = tmp_path / "out"
    assert main(["eval", "sts", str(pairs), "--output", str(out), "--model", model_dir, "--layers", "2,4",
                 "--poolings", "mean", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "engine local" in printed  # 40 texts: auto picks the in-process engine
    rows = json.loads((out / "eval" / "results.json").read_text())
    assert {(r["layer"], r["pooling"], r["metric"]) for r in rows} == {
        (L, "mean", m) for L in (2, 4) for m in ("cosine_spearman", "cosine_pearson")}
    assert not (out / "manifest.json").exists()  # nothing cached: no Ray pipeline ran


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["embed", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    assert main(["encode", "--layers", "99", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "layer 99 is out of range: this model has layers 0..30" in err
    with pytest.raises(SystemExit):
        main(["eval", "sts", "x", "--output", "o", "--engine", "spark"])
    assert "invalid choice: 'spark'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--transforms", "center,pca3"], "unknown transform 'pca3'"),
    (["--transforms", "whiten30"], "fitted on 12 texts, fewer than k+1=31"),
    (["--mixes", "0:4", "--layers", "2:4"], "needs layers 0..4, but layers [0, 1] are not embedded"),
    (["--mixes", "learned:2:4", "--layers", "2:4"], "a learned mix needs training labels (--mix-labels"),
    (["--templates", "Summarise this"], "has no {text} slot"),
    (["--templates", "{text} and {text} and {text}"], "has 3 {text} slots"),
    (["--templates", "echo", "--max-length", "6"], "leaves no room for the text"),
])
def test_derived_variant_errors_are_one_line_before_any_forward_pass(model_dir, tmp_path, capsys, monkeypatch,
                                                                    extra, message):
    import pipeline.encoder

    def never(*a, **k):
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(pipeline.encoder.Encoder, "encode_tokenized", never)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"sentence1": f"first text {i}", "sentence2": f"second text {i}",
                                         "score": i % 3}) + "\n" for i in range(6)))
    assert main(["eval", "sts", str(pairs), "--output", str(tmp_path / "o"), "--model", model_dir, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_embed_fits_transforms_on_its_rows_and_index_and_queries_use_them(ray_local, model_dir, tmp_path, capsys):
    """`embed --transforms --mixes`: fitted on the output's rows (streamed), stored, indexed, and applied
    identically to queries through the library; equal to numpy on the whole matrix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.derive import vectors_for
    from pipeline.index import load_index
    from pipeline.runner import read_embeddings
    from pipeline.storage import Output

    texts = [f"document {i} on " + " ".join(["rivers", "stones", "clouds", "trees"][: 1 + i % 4]) for i in range(40)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(40)], "text": texts}), tmp_path / "in" / "a.parquet")
    out = tmp_path / "out"
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"sentence1": texts[i], "sentence2": texts[(i * 7) % 40],
                                         "score": float(i % 4)}) + "\n" for i in range(40)))
    assert main(["embed", str(tmp_path / "in"), str(out), "--model", model_dir, "--layers", "2:4", "--poolings",
                 "mean", "--id-column", "id", "--transforms", "whiten8", "--mixes", "2:4,learned:2:4",
                 "--mix-labels", str(train), "-q"]) == 0
    assert "derived variants (7)" in capsys.readouterr().out  # M2-4.mean, W2-4.mean, and 5 whitened
    assert main(["index", str(out), "--variants", "L3.mean|whiten8,M2-4.mean|whiten8", "--kind", "flat"]) == 0
    manifest = Output(str(out)).read_manifest()
    table = read_embeddings(str(out))
    x = np.stack(table.column("emb_3_mean").to_numpy(zero_copy_only=False)).astype(np.float64)
    mu = x.mean(0)
    vals, vecs = np.linalg.eigh(np.cov(x - mu, rowvar=False, bias=True))
    docs = (x - mu) @ (vecs[:, ::-1][:, :8] / np.sqrt(vals[::-1][:8]))
    queries = ["rivers and stones", "document 7"]
    enc = Encoder.load(model_dir, layers="2:4", poolings="mean").encode(queries)
    v = Variant.parse("L3.mean|whiten8")
    q = vectors_for(out, manifest, v, enc)
    want_q = (enc[Variant(3, "mean")].astype(np.float64) - mu) @ (vecs[:, ::-1][:, :8] / np.sqrt(vals[::-1][:8]))
    signs = np.sign((q * want_q).sum(0))  # principal directions are defined up to sign
    np.testing.assert_allclose(q, want_q * signs, rtol=1e-4, atol=1e-4)
    scores, ids = load_index(out / "indexes" / "L3.mean_whiten8.faiss").search(q, 3)
    d = docs * signs
    cos = (want_q * signs) @ d.T / np.linalg.norm(want_q, axis=1)[:, None] / np.linalg.norm(d, axis=1)[None]
    ids_all = table.column("id").to_pylist()
    assert ids == [[ids_all[j] for j in np.argsort(-row)[:3]] for row in cos]
    assert manifest["derived"]["L3.mean|whiten8"]["fitted_on"] == {"source": "this output's committed rows",
                                                                   "files": 1, "texts": 40}
    learned = manifest["derived"]["W2-4.mean"]
    assert learned["fitted_on"]["mix"]["data"] == "train" and len(learned["weights"]) == 3
    assert abs(sum(learned["weights"]) - 1) < 1e-5 and "W2-4.mean|whiten8" in manifest["derived"]


def test_learned_mix_labels_that_overlap_the_evaluated_pairs_are_refused(model_dir, tmp_path, capsys, monkeypatch):
    """--mix-labels holding any evaluated pair (in either order) is refused before any forward pass."""
    import pipeline.encoder

    def never(*a, **k):
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(pipeline.encoder.Encoder, "encode_tokenized", never)
    rows = [{"sentence1": f"first text {i}", "sentence2": f"second text {i}", "score": i % 3} for i in range(6)]
    pairs, train = tmp_path / "pairs.jsonl", tmp_path / "train.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = [{"sentence1": f"other {i}", "sentence2": f"another {i}", "score": 1} for i in range(5)]
    swapped = [{"sentence1": r["sentence2"], "sentence2": r["sentence1"], "score": 0} for r in rows[:2]]
    train.write_text("".join(json.dumps(r) + "\n" for r in other + swapped))
    for labels, shared in ((pairs, 6), (train, 2)):
        assert main(["eval", "sts", str(pairs), "--output", str(tmp_path / "o"), "--model", model_dir,
                     "--layers", "2:4", "--mixes", "learned:2:4", "--mix-labels", str(labels)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"share {shared} sentence pairs with the evaluated" in err, err

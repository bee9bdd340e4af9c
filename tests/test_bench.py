"""The benchmark compares like with like: every mode embeds the same texts to the same vectors.

A tiny real run (8 texts, 2 variants, max length 32) through the actual per-mode subprocesses.
"""

import json

import numpy as np
import pytest
from conftest import data_file

from pipeline import bench
from pipeline.bench import measure, options, sample
from pipeline.demo import DEMO_DATA

# The vendored demo data is enough for a handful of texts: these runs need no ../shared.
TINY = ["--quick", "--docs", "2", "--sentences", "6", "--max-length", "32", "--layers", "4",
        "--layers-full", "none", "--poolings", "last,mean_nosink", "--data", str(DEMO_DATA)]
VARIANTS = {"L4.last", "L4.mean_nosink"}


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


def _run(tmp_path, *extra):
    out = tmp_path / "bench.json"
    rc = bench.main(TINY + ["--out", str(out), "--save-embeddings", str(tmp_path / "emb"), *extra])
    report = json.loads(out.read_text())
    return rc, report, (tmp_path / "bench.md").read_text()


def _check_same_embeddings(tmp_path, modes):
    saved = {m: np.load(tmp_path / "emb" / f"truncated-{m}.npz") for m in modes}
    ref = saved[modes[0]]
    assert set(ref.files) == VARIANTS
    for mode in modes[1:]:
        assert set(saved[mode].files) == VARIANTS, mode
        for name in VARIANTS:
            assert saved[mode][name].shape == ref[name].shape == (8, 576)
            assert _rel_err(saved[mode][name], ref[name]) <= 1e-4, (mode, name)


@pytest.mark.slow
def test_every_mode_reports_throughput_and_the_same_embeddings(tmp_path):
    modes = ["hf-single-pass", "naive", "strata-encoder"]
    rc, report, md = _run(tmp_path, "--modes", ",".join(modes), "--mode-budget", "120", "--batch-tokens", "4096,16")
    assert rc == 0
    (grid,) = report["grids"]
    assert grid["layers"] == [4] and grid["n_variants"] == 2 and grid["reference"] == "hf-single-pass"
    for mode in modes:
        r = grid["modes"][mode]
        assert r["status"] == "ok", r
        assert r["tokens_per_second"] > 0 and r["rows_per_second"] > 0 and r["rows"] == 8
        assert r["tokens"] == grid["modes"]["hf-single-pass"]["tokens"]  # same texts, same tokenisation
        assert 0 < r["padding_efficiency"] <= 1 and r["peak_rss_bytes"] > 0
        assert r["matches_reference"] and r["max_rel_err"] <= 1e-4
        assert mode in md
    assert grid["modes"]["naive"]["passes"] == 2 and not grid["modes"]["naive"]["extrapolated"]
    assert grid["modes"]["strata-encoder"]["depth_run"] == 4 < grid["modes"]["naive"]["depth_run"] == 30
    assert grid["ratios"]["encoder/naive"] > 0 and report["hardware"]["peak_flops_per_second"] > 0
    assert report["versions"]["torch"] and report["machine"]["cpu"]
    _check_same_embeddings(tmp_path, modes)  # independently of the benchmark's own comparison
    sweep = report["batch_tokens"]
    assert sweep["status"] == "ok" and [r["batch_tokens"] for r in sweep["budgets"]] == [16, 4096]
    small, large = sweep["budgets"]
    assert small["batches"] > large["batches"]  # a 16-token budget holds one row of up to 32 tokens
    assert sweep["tokens"] == grid["modes"]["strata-encoder"]["tokens"] and sweep["best"] in (16, 4096)
    assert "Batch token budget" in md


@pytest.mark.slow
def test_ray_mode_embeds_the_same_as_the_encoder(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_local.get_runtime_context().gcs_address)  # the mode's child joins it
    modes = ["strata-encoder", "strata-ray"]
    rc, report, _ = _run(tmp_path, "--modes", ",".join(modes), "--no-hardware", "--no-memory-scaling")
    assert rc == 0
    ray = report["grids"][0]["modes"]["strata-ray"]
    assert ray["status"] == "ok" and ray["tokens_per_second"] > 0 and ray["rows"] == 8
    assert ray["tokens"] == report["grids"][0]["modes"]["strata-encoder"]["tokens"]
    assert report["grids"][0]["ratios"]["ray/encoder"] > 0
    _check_same_embeddings(tmp_path, modes)


def test_naive_cost_of_unmeasured_passes_is_the_median_pass():
    # a grid B that borrows grid A's naive timing scales it by its own variant count
    res = {"status": "ok", "tokens": 1000, "seconds": 240.0, "passes": 24, "seconds_per_pass": 10.0}
    assert measure.borrowed_tps("naive", res, 12) == pytest.approx(1000 / 120.0)
    assert measure.keep_going([], budget=1.0, wanted=3)  # the first run always happens
    assert not measure.keep_going([0.8], budget=1.0, wanted=3)  # a second would blow the budget
    assert not measure.keep_going([0.1, 0.1, 0.1], budget=10.0, wanted=3)


def test_batch_token_sweep_option():
    assert options.batch_tokens_sweep(None, quick=True) == []
    assert options.batch_tokens_sweep(None, quick=False) == list(options.BATCH_TOKENS_SWEEP)
    assert options.batch_tokens_sweep("8192, 1024,8192", quick=True) == [1024, 8192]
    assert options.batch_tokens_sweep("none", quick=False) == []
    for bad in ("1k", "0,16", ","):
        with pytest.raises(ValueError, match="--batch-tokens"):
            options.batch_tokens_sweep(bad, quick=False)


def test_settings_pick_bf16_and_the_large_sample_when_a_gpu_is_present(monkeypatch):
    import argparse

    import torch

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = options.settings(parser.parse_args([]))
    assert (cpu["device"], cpu["model_dtype"]) == ("cpu", "float32")
    assert (cpu["docs"], cpu["sentences"]) == options.SAMPLE_SIZES["cpu"]
    with pytest.raises(ValueError, match="no CUDA device"):
        options.settings(parser.parse_args(["--device", "cuda"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = options.settings(parser.parse_args([]))  # same command line: the GPU is picked up by itself
    assert (gpu["device"], gpu["model_dtype"]) == ("cuda", "bfloat16")
    assert (gpu["docs"], gpu["sentences"]) == options.SAMPLE_SIZES["cuda"]
    assert measure.TOLERANCE[gpu["model_dtype"]] > measure.TOLERANCE["float32"]


def test_flops_count_padding_and_depth():
    # 2 rows padded to 4 tokens through 3 blocks of 10 parameters, hidden 2
    assert measure.pass_flops(10, 2, 3, [(2, 4)]) == 2 * 10 * 3 * 8 + 4 * 3 * 4 * 2 * 8
    assert measure.useful_flops(10, 2, 3, [4, 1]) == (2 * 10 * 3 * 4 + 4 * 3 * 4 * 2 * 4) + (2 * 10 * 3 + 4 * 3 * 2)


def test_data_mix_is_deterministic_and_mixed():
    texts, kinds = sample.sample_texts(data_file(), 3, 9, seed=0)
    again, _ = sample.sample_texts(data_file(), 3, 9, seed=0)
    assert texts == again and len(texts) == 12 and kinds.count("doc") == 3
    assert all(t.strip() for t in texts) and len(set(texts)) == 12
    assert kinds != sorted(kinds)  # shuffled together, not docs first


def test_embed_vs_encoder_ratio_sets_each_embed_run_against_the_encoder_runs_around_it():
    from pipeline.bench import overhead

    def run(kind, tok_s, rep, **kw):
        return {"run": kind, "texts": "short", "grid": "1 variant", "repeat": rep, "tok_s": tok_s, "bytes": 10, **kw}

    def enc(t, f, rep):
        return run("encoder", t, rep, seconds=2.0, executed_flops=f)

    # run order: encoder, embed, encoder, embed, encoder, embed, encoder (the machine speeds up, then slows)
    runs = [enc(100.0, 10.0, 0), run("embed", 90.0, 0), enc(300.0, 30.0, 1), run("embed", 180.0, 1),
            enc(100.0, 50.0, 2), run("embed", 0.0, 2), enc(200.0, 70.0, 3)]  # 0: no steady state
    (row,) = overhead.summarise(runs, peak=10.0)
    assert row["ratios"] == pytest.approx([90.0 / 200.0, 180.0 / 200.0])  # the run without a steady state is left out
    assert row["ratio"] == pytest.approx((0.45 + 0.9) / 2) and row["repeats"] == 3
    assert row["encoder_tok_s"] == 150.0 and row["embed_tok_s"] == 135.0  # medians, shown beside the ratio
    assert row["encoder_share_of_peak"] == pytest.approx(20.0 / 10.0)  # median of 5, 15, 25, 35 FLOP/s over the peak
    md = overhead.to_markdown({"machine": {"cpu": "x"}, "versions": {}, "model": "m", "repeats": 3, "date": "d",
                               "text_sets": {"short": {"rows": 4, "tokens": 40, "max_length": 128}}, "summary": [row]})
    assert "| short | 1 variant | 150 | 135 | 0.675 | 0.450, 0.900 | 200.0% | 0.0 MB |" in md


def test_embed_vs_encoder_text_sets_come_from_the_vendored_data():
    from pipeline.bench import overhead

    sets = overhead.text_sets()
    short, mixed = sets["short"]["texts"], sets["mixed"]["texts"]
    assert len(short) == len(set(short)) > 2000 and all(t.strip() for t in short)
    docs, sentences = options.SAMPLE_SIZES["cpu"]
    assert len(mixed) == overhead.MIXED_COPIES * (docs + sentences)
    assert mixed[: docs + sentences] * overhead.MIXED_COPIES == mixed
    assert sets["mixed"]["unit_rows"] == overhead.MIXED_UNIT_ROWS == docs + sentences  # a unit per copy

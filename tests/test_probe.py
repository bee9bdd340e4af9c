"""strata probe: bootstrap statistics, cross-fitting, choice, signals, recipes."""

import json
import re
import math

import numpy as np
import pytest
from scipy import stats as st

from pipeline import probe, stats
from pipeline.probe import scoring
from pipeline.evaldata import BeirData, StsData
from pipeline.metrics import per_query_scores, retrieval_scores_from_run
from pipeline.recipe import Recipe, RecipeEncoder, RecipeError
from pipeline.signals import anisotropy, entropy, uniformity
from pipeline.standard import STANDARD_POOLING
from pipeline.variants import Variant


# --------------------------------------------------------------------------- bootstrap
def test_resampled_spearman_equals_scipy_on_the_explicit_resample():
    rng = np.random.default_rng(3)
    n = 120
    gold = np.round(rng.uniform(0, 5, n), 1)  # many ties, as STS gold has
    sims = gold + rng.normal(0, 1.5, n)
    sims[10] = sims[11]  # a tie on the other side too
    counts = stats.resample_counts(n, 40, seed=1)
    fast = stats.StsBootstrap(gold, counts)(sims)
    for row, got in zip(counts, fast):
        idx = np.repeat(np.arange(n), row.astype(int))
        assert got == pytest.approx(100 * st.spearmanr(gold[idx], sims[idx]).statistic, abs=1e-9)


def test_resample_counts_are_multinomial_rows():
    c = stats.resample_counts(50, 30, seed=0)
    assert c.shape == (30, 50) and (c.sum(axis=1) == 50).all() and (c >= 0).all()
    with pytest.raises(ValueError, match="at least 2"):
        stats.resample_counts(1)


def test_sts_intervals_cover_the_true_spearman_at_about_the_nominal_rate():
    # bivariate normal with correlation r: Spearman's rho is (6/pi) asin(r/2)
    r, n, reps = 0.6, 200, 200
    truth = 100 * 6 / math.pi * math.asin(r / 2)
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(reps):
        x = rng.normal(size=n)
        y = r * x + math.sqrt(1 - r * r) * rng.normal(size=n)
        lo, hi = stats.interval(stats.StsBootstrap(x, stats.resample_counts(n, 400, seed=i))(y))
        hits += lo <= truth <= hi
    assert 0.88 <= hits / reps <= 0.99, hits / reps


def test_mean_intervals_cover_the_true_mean_at_about_the_nominal_rate():
    a, b, n, reps = 0.7, 1.3, 150, 300  # per-query scores in [0, 100] from a Beta: known mean
    truth = 100 * a / (a + b)
    rng = np.random.default_rng(1)
    hits = 0
    for i in range(reps):
        per_query = 100 * rng.beta(a, b, size=n)
        lo, hi = stats.interval(stats.mean_bootstrap(per_query, stats.resample_counts(n, 400, seed=i)))
        hits += lo <= truth <= hi
    assert 0.90 <= hits / reps <= 0.985, hits / reps


def test_paired_difference_detects_a_real_gap_and_not_a_null_one():
    rng = np.random.default_rng(2)
    n = 300
    gold = rng.normal(size=n)
    good = gold + rng.normal(0, 0.5, n)
    bad = gold + rng.normal(0, 2.0, n)
    twin = good + rng.normal(0, 1e-3, n)
    boot = stats.StsBootstrap(gold, stats.resample_counts(n, 500, seed=0))
    assert stats.paired(boot(good), boot(bad))["significant"]
    assert not stats.paired(boot(good), boot(twin))["significant"]


def test_per_query_scores_average_to_the_reported_scores():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 1}, "q3": {"d9": 1}}
    run = {"q1": {"d1": 0.9, "d2": 0.1}, "q2": {"d3": 0.8, "d2": 0.7, "d1": 0.2}}  # q3 absent: scores 0
    per = per_query_scores(run, qrels)
    means = retrieval_scores_from_run(run, qrels)
    assert per["ndcg_at_10"][2] == 0.0 and per["ndcg_at_10"][0] == pytest.approx(100.0)
    for metric, values in per.items():
        assert values.mean() == pytest.approx(means[metric])


# --------------------------------------------------------------------------- cross-fitting
def _sts(n_pairs=60, seed=0, shared=True) -> StsData:
    rng = np.random.default_rng(seed)
    s1 = [f"sentence {i}" for i in range(n_pairs)]
    s2 = [f"other {i}" for i in range(n_pairs)]
    if shared:  # pairs sharing a sentence must land in one fold
        for i in range(0, n_pairs - 1, 7):
            s2[i + 1] = s1[i]
    return StsData("syn", s1, s2, rng.uniform(0, 5, n_pairs), split="dev")


def _vectors(task, n_layers=3, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(len(task.texts), dim))
    return {Variant(layer, p): base + rng.normal(0, 0.5 + layer, size=base.shape)
            for layer in range(n_layers + 1) for p in ("mean", "last")}


def test_folds_keep_groups_together_and_are_balanced():
    groups = np.array([0, 0, 0, 1, 2, 2, 3, 4, 5, 6, 7, 7, 8, 9, 9, 9])
    f = probe.fold_ids(groups, 4, seed=0)
    for g in np.unique(groups):
        assert len(set(f[groups == g])) == 1
    sizes = np.bincount(f, minlength=4)
    assert sizes.max() - sizes.min() <= 3 and sizes.sum() == len(groups)


def test_crossfitting_never_lets_a_fitted_piece_see_its_scoring_fold(monkeypatch):
    data = _sts()
    task = probe.make_task(data)
    vectors = _vectors(task)
    seen_train, seen_pairs, fits = [], [], []
    real_fit_rows, real_learn, real_fit = task.fit_rows, scoring.learn_mix, scoring.fit_transform

    def spy_fit_rows(items):
        seen_train.append(np.asarray(items))
        return real_fit_rows(items)

    def spy_learn(encoder, variant, labels):
        seen_pairs.append(set(zip(labels.sentence1, labels.sentence2)))
        return real_learn(encoder, variant, labels)

    def spy_fit(name, chunks, **kw):
        fits.append(sum(len(c) for c in chunks))
        return real_fit(name, chunks, **kw)

    task.fit_rows = spy_fit_rows
    monkeypatch.setattr(scoring, "fit_transform", spy_fit)
    monkeypatch.setattr(scoring, "learn_mix", spy_learn)
    log: list[probe.Fit] = []
    scored = probe.score_variants(task, vectors, n_layers=3, mixes="all,learned:all", transforms=("center", "abtt1"),
                                  folds=5, resamples=50, log=log, say=lambda *a, **k: None)
    assert log and seen_pairs
    for fit in log:  # indices: the fitted items and the scored items never meet, and the folds cover everything
        assert not set(fit.fitted) & set(fit.scored)
        assert sorted([*fit.fitted, *fit.scored]) == list(range(task.n))
    scored_sets = [set(f.scored) for f in log]
    assert sorted(i for s in scored_sets[:5] for i in s) == list(range(task.n))
    # the learned mixes' labels: every fit saw exactly the pairs outside one scoring fold
    folds = {frozenset(f.scored) for f in log}
    all_pairs = list(zip(data.sentence1, data.sentence2))
    for pairs in seen_pairs:
        held = [i for i, p in enumerate(all_pairs) if p not in pairs]
        assert frozenset(held) in folds
    # the transforms: fitted only on texts of training folds, none of them a scoring-fold sentence
    assert fits and seen_train
    for train in seen_train:
        held = np.setdiff1d(np.arange(task.n), train)
        assert frozenset(held) in folds
        assert not set(real_fit_rows(train)) & (set(task.rows1[held]) | set(task.rows2[held]))
    fitted = [s for s in scored if s.variant.transform != "none" or (s.variant.mix or "").startswith("learned")]
    assert fitted and all("cross-fitted" in s.fitted_on for s in fitted)


def test_transform_fit_rows_exclude_the_scoring_fold():
    task = probe.make_task(_sts())
    fold = probe.fold_ids(task.groups, 5)
    for k in range(5):
        train, test = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        scored_texts = set(task.rows1[test]) | set(task.rows2[test])
        assert not set(task.fit_rows(train)) & scored_texts


def test_uniform_and_raw_scores_equal_the_plain_spearman():
    data = _sts(shared=False)
    task = probe.make_task(data)
    vectors = _vectors(task)
    scored = {s.variant: s for s in probe.score_variants(task, vectors, n_layers=3, mixes="all", transforms=(),
                                                          resamples=20, say=lambda *a, **k: None)}
    v = Variant(2, "mean")
    m = vectors[v]
    cos = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(m[task.rows1], m[task.rows2])]
    assert scored[v].score == pytest.approx(100 * st.spearmanr(data.scores, cos).statistic)
    assert scored[v].low <= scored[v].score <= scored[v].high


# --------------------------------------------------------------------------- choice
def _scored(name, score, samples):
    return probe.Scored(Variant.parse(name), score, *stats.interval(samples), samples)


def test_a_statistical_tie_is_resolved_towards_the_shallowest_layer():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, 500)
    deep = _scored("L30.mean", 60.0, 60 + noise)
    shallow = _scored("L6.mean", 59.8, 59.8 + noise + rng.normal(0, 0.5, 500))
    default = _scored("L30.last", 30.0, 30 + noise)
    c = probe.choose([deep, shallow, default], n_layers=30)
    assert c.top is deep and c.chosen is shallow and len(c.tied) == 2
    assert c.vs_default["significant"] and not c.vs_top["significant"]


def test_a_clear_winner_is_chosen_even_when_deeper():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, 500)
    c = probe.choose([_scored("L30.mean", 70.0, 70 + noise), _scored("L2.mean", 50.0, 50 + noise)], n_layers=30)
    assert c.chosen.variant.name == "L30.mean" and len(c.tied) == 1


# --------------------------------------------------------------------------- signals
def test_signals_match_plain_pairwise_loops():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)) + 0.5
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    pairs = [(i, j) for i in range(40) for j in range(40) if i != j]
    assert anisotropy(x) == pytest.approx(np.mean([z[i] @ z[j] for i, j in pairs]))
    assert uniformity(x) == pytest.approx(np.log(np.mean([np.exp(-2 * np.sum((z[i] - z[j]) ** 2)) for i, j in pairs])))
    lam = np.linalg.eigvalsh(z @ z.T)
    p = np.clip(lam, 0, None) / np.clip(lam, 0, None).sum()
    p = p[p > 1e-15]
    assert entropy(x) == pytest.approx(-(p * np.log(p)).sum() / np.log(6), rel=1e-6)


def test_signals_order_a_collapsed_space_below_an_isotropic_one():
    rng = np.random.default_rng(0)
    iso = rng.normal(size=(200, 16))
    collapsed = rng.normal(size=(200, 16)) * 0.05 + np.r_[10.0, np.zeros(15)]
    assert anisotropy(collapsed) > 0.9 > 0.2 > anisotropy(iso)
    assert entropy(iso) > 0.9 > 0.5 > entropy(collapsed)
    assert uniformity(iso) < uniformity(collapsed)


# --------------------------------------------------------------------------- bad input
def test_budget_parsing():
    assert probe.Budget.parse("300") == probe.Budget(items=300)
    assert probe.Budget.parse("5m") == probe.Budget(seconds=300.0)
    assert probe.Budget.parse("90s") == probe.Budget(seconds=90.0)
    assert probe.Budget.parse(None).items == probe.DEFAULT_ITEMS
    for bad in ("0", "-3", "five", "0m"):
        with pytest.raises(probe.ProbeError, match="budget"):
            probe.Budget.parse(bad)


def test_labels_too_few_for_the_folds_name_the_minimum():
    with pytest.raises(probe.ProbeError, match=r"12 labelled pairs.*at least 50"):
        probe.check_labels(_sts(12), 5)
    with pytest.raises(probe.ProbeError, match="at least 2 folds"):
        probe.check_labels(_sts(60), 1)


def test_folds_that_cannot_be_formed_are_refused_naming_the_largest_group():
    n = 60  # every pair shares its first sentence: one group, so one fold would hold everything
    data = StsData("hub", ["the same anchor"] * n, [f"candidate {i}" for i in range(n)],
                   np.random.default_rng(0).uniform(0, 5, n))
    task = probe.make_task(data)
    with pytest.raises(probe.ProbeError, match=r"largest such group has 60"):
        probe.score_variants(task, _vectors(task), n_layers=3, mixes="", transforms=(), resamples=20,
                             say=lambda *a, **k: None)


def test_labels_with_missing_texts_are_refused():
    d = _sts(60)
    d.sentence2[4] = "  "
    with pytest.raises(probe.ProbeError, match=r"1 labelled pair\(s\) have an empty sentence \(first: pair 5\)"):
        probe.check_labels(d, 5)
    beir = BeirData("b", ["d1"], ["doc"], ["q1", "q2"], ["query", "other"], {"q1": {"d1": 1}, "q2": {"d7": 1}})
    with pytest.raises(probe.ProbeError, match=r"no relevant document in the corpus \(first: 'q2'\)"):
        probe.check_labels(beir, 5)


# --------------------------------------------------------------------------- end to end, tiny model
@pytest.fixture(scope="module")
def sts_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the cat dog sat on mat ran fast slow red blue green big small house tree car".split()
    rows = [f"{' '.join(rng.choice(words, 6))}\t{' '.join(rng.choice(words, 5))}\t{rng.uniform(0, 5):.2f}"
            for _ in range(80)]
    path = tmp_path_factory.mktemp("labels") / "pairs.tsv"
    path.write_text("sentence1\tsentence2\tscore\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def probed(model_dir, sts_file, tmp_path_factory):
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("probe")
    rc = main(["probe", "--model", str(model_dir), "--labels", str(sts_file), "--output", str(out), "-q",
               "--templates", "plain,prompteol", "--transforms", "center,abtt1", "--mixes", "all,learned:all",
               "--resamples", "200", "--top", "40"])
    assert rc == 0
    return out, json.loads((out / "probe.json").read_text())


def test_probe_writes_a_ranked_recipe_a_report_and_a_job(probed):
    out, result = probed
    ranked = [r for r in result["ranked"] if r["score"] is not None]  # undefined (constant) scores come last
    assert result["ranked"][:len(ranked)] == ranked
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    assert all(r["low"] <= r["score"] <= r["high"] for r in ranked)
    assert len(ranked) == len({r["variant"] for r in ranked})
    assert result["chosen"]["variant"] == result["recipe"][0]["variant"]
    assert result["chosen"]["variant"] in result["chosen"]["tied"]
    assert set(result["signals"]["agreement"]) == {"anisotropy", "entropy", "uniformity"}
    assert (out / "report.md").read_text().count("![") == 2
    # each ranked variant says how `strata export` writes it; the tiny model has N = 4 and the probe
    # does not normalise, so only plain layer-4 raw cells (and their affine transforms) are standard
    for r in result["ranked"]:
        v = Variant.parse(r["variant"])
        want = v.template == "plain" and v.layer == 4 and v.mix is None and v.pooling in STANDARD_POOLING
        assert r["serving"] == ("standard" if want else "custom"), r
    assert "| serving |" in (out / "report.md").read_text()
    job = (out / "job.yaml").read_text()
    assert "recipe:" in job and str(out / "probe.json") in job


def test_recipe_evaluation_gives_the_probes_scores_on_the_same_data(probed, sts_file, tmp_path, capsys):
    """Scored on the labels it was probed on: raw cells give the probe's scores; every row says the
    variants were chosen there, and learned mixes (weights fitted on these labels) are left out."""
    from pipeline.cli import main

    out, result = probed
    raw = [e for e in result["recipe"] if Variant.parse(e["variant"]).is_raw]
    assert raw
    top = result["recipe"].index(raw[-1]) + 1
    learned = {e["variant"] for e in result["recipe"][:top] if e.get("mix_fitted_on")}
    capsys.readouterr()
    assert main(["eval", "sts", str(sts_file), "--recipe", str(out / "probe.json"), "--top", str(top),
                 "--output", str(tmp_path), "-q"]) == 0
    said = capsys.readouterr()
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    got = {Variant.from_row(r).name: r["score"] for r in rows if r["metric"] == "cosine_spearman"}
    probed_scores = {r["variant"]: r["score"] for r in result["ranked"]}
    assert set(got) == {e["variant"] for e in result["recipe"][:top]} - learned
    assert all(f"left out {v}: its mix weights were fitted on" in said.err for v in learned)
    assert all(r["selected_on"].startswith(f"chosen by the probe on {result['labels']['items']} of ") for r in rows)
    assert "(chosen on this data: optimistic)" in said.out
    for e in raw:
        assert got[e["variant"]] == pytest.approx(probed_scores[e["variant"]], abs=1e-3)


def test_recipe_pieces_are_applied_as_recorded(probed, sts_file):
    from pipeline.encoder import Encoder
    from pipeline.evaldata import load_sts
    from pipeline.mixes import apply_mix
    from pipeline.transforms import Transform

    out, result = probed
    fitted = [e for e in result["recipe"] if e.get("transform_path") or e.get("weights")]
    assert fitted, "the recipe should hold a fitted variant with --top 40"
    recipe = Recipe.load(out / "probe.json", top=len(result["recipe"]))
    enc = Encoder.from_request(recipe.request(digest=False))
    texts = load_sts(sts_file).sentence1[:10]
    got = RecipeEncoder(recipe, enc).encode(texts)
    raw = {v.name: m for v, m in enc.encode(texts).items()}
    for e in fitted:
        x = apply_mix([raw[s] for s in e["sources"]], e["weights"]) if e.get("weights") else raw[e["sources"][0]]
        if e.get("transform_path"):
            x = Transform.load(out / e["transform_path"]).apply(x)
        np.testing.assert_allclose(got[Variant.parse(e["variant"])], x, rtol=1e-5, atol=1e-6)


def test_a_recipe_of_other_weights_or_contract_is_refused(probed, tmp_path):
    out, result = probed
    other = dict(result, model={**result["model"], "weights_digest": "sha256:" + "0" * 64})
    (tmp_path / "probe.json").write_text(json.dumps(other))
    with pytest.raises(RecipeError, match="probed on model"):
        Recipe.load(tmp_path / "probe.json").request(digest=True)
    (tmp_path / "probe.json").write_text(json.dumps(dict(result, contract=1)))
    with pytest.raises(RecipeError, match="naming contract 1"):
        Recipe.load(tmp_path / "probe.json")
    with pytest.raises(RecipeError, match="--top 99"):
        Recipe.load(out / "probe.json", top=99)


def test_a_budget_that_fits_nothing_says_what_would(model_dir, sts_file, tmp_path):
    from pipeline.evaldata import load_sts

    with pytest.raises(probe.ProbeError, match=r"fits about \d+ labelled items .* needs about [\d.]+ min"):
        probe.run_probe(str(model_dir), load_sts(sts_file), tmp_path, budget=probe.Budget(seconds=0.001),
                        templates=("plain",), say=lambda *a, **k: None)


def test_a_corpus_job_from_the_recipe_uses_the_probed_pieces_and_records_the_probe(ray_local, probed, tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.jobs import run_job
    from pipeline.storage import Output
    from pipeline.transforms import Transform

    out, result = probed
    first_fitted = next(i for i, e in enumerate(result["recipe"]) if e.get("transform_path"))
    entry = result["recipe"][first_fitted]
    (tmp_path / "corpus").mkdir()
    texts = [f"the red car number {i} ran fast" for i in range(30)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "corpus" / "a.parquet")
    spec = (out / "job.yaml").read_text().replace("CORPUS_URL  # the Parquet corpus to embed (any fsspec URL)",
                                                  str(tmp_path / "corpus"))
    spec = spec.replace("output: out/jobs", f"output: {tmp_path / 'jobs'}")
    spec = spec.replace("  recipe:", f"  recipe_top: {first_fitted + 1}\n  recipe:")

    spec = re.sub(r"  layers: .*", "  layers: all", spec)  # the grid the probe saw covers every recipe source
    spec = re.sub(r"  poolings: .*", "  poolings: [last, mean, wmean, mean_nosink, wmean_nosink]", spec)
    spec = re.sub(r"  templates: .*", "  templates: [plain, prompteol]", spec)
    (tmp_path / "job.yaml").write_text(spec)
    summary = run_job(str(tmp_path / "job.yaml"), progress=False, stream=io.StringIO())
    root = next((tmp_path / "jobs").glob("*/v-*"))
    manifest = Output(str(root)).read_manifest()
    assert manifest["probe"]["sha256"] and manifest["probe"]["variants"][-1] == entry["variant"]
    derived = manifest["derived"][entry["variant"]]
    got = Transform.load(root / derived["transform"])
    want = Transform.load(out / entry["transform_path"])
    np.testing.assert_array_equal(got.mean, want.mean)
    assert "probe" in derived["fitted_on"]
    assert entry["variant"] in str(summary["indexes"]["built"])


def test_a_corpus_sample_fits_the_transforms_and_carries_the_signals(model_dir, sts_file, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.evaldata import load_sts

    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"body": [f"a blue house with {i} green trees" for i in range(40)] + ["", "  "]}), corpus)
    result = probe.run_probe(str(model_dir), load_sts(sts_file), tmp_path / "out", corpus=str(corpus),
                             text_column="body", templates=("plain",), transforms=("center",),
                             mixes="all,learned:all", resamples=100, say=lambda *a, **k: None)
    fitted = [r for r in result["ranked"] if r["transform"] == "center"]
    assert fitted and all("40 texts sampled from" in r["fitted_on"] for r in fitted)
    assert result["signals"]["on"].startswith("40 texts sampled from")
    assert "text_column: body" in (tmp_path / "out" / "job.yaml").read_text()


def test_a_recipe_scored_elsewhere_keeps_everything_and_learned_mixes_never_score_their_labels(tmp_path):
    """held_out_from: entries whose mix weights saw the scored labels are left out (all of them: an
    error); the probe's own labels mark the rows as chosen there; other labels change nothing."""
    from types import SimpleNamespace

    fitted = {"task": "sts", "data": "stsb", "split": "dev", "pairs": 400}
    entries = [{"variant": "L2.mean"}, {"variant": "mix(learned:1-4).mean", "mix_fitted_on": fitted}]
    recipe = Recipe(tmp_path / "probe.json", {}, {}, {}, entries, "0" * 64,
                    {"data": "stsb", "split": "dev", "items": 500, "of": 1500})
    dev, test = SimpleNamespace(name="stsb", split="dev"), SimpleNamespace(name="stsb", split="test")
    same, dropped, chosen = recipe.held_out_from(dev)
    assert [e["variant"] for e in same.entries] == ["L2.mean"] and len(dropped) == 1
    assert "mix(learned:1-4).mean" in dropped[0] and "stsb/dev labels" in dropped[0]
    assert chosen == "chosen by the probe on 500 of 1500 items of stsb/dev: optimistic here"
    other, dropped, chosen = recipe.held_out_from(test)
    assert other.entries == entries and dropped == [] and chosen is None
    with pytest.raises(RecipeError, match="every variant asked for has mix weights fitted on stsb/dev"):
        Recipe(recipe.path, {}, {}, {}, entries[1:], "0" * 64, None).held_out_from(dev)


def test_encoding_with_progress_gives_the_whole_pass_and_no_bar_off_a_terminal(capsys):
    from types import SimpleNamespace

    class Fake:
        def tokenize_templates(self, texts):
            return {"plain": SimpleNamespace(ids=[[0] * (1 + len(t) % 5) for t in texts])}

        def encode(self, texts):
            self.calls = getattr(self, "calls", 0) + 1
            return {Variant(1, "mean"): np.array([[int(t.split()[1]), len(t)] for t in texts], dtype=np.float32)}

    texts, enc = [f"text {i}" for i in range(300)], Fake()
    got = probe.encode_with_progress(enc, texts, "sample")
    assert enc.calls == 4  # chunks of 64 texts or more, at most 20
    want = np.array([[i, len(t)] for i, t in enumerate(texts)], dtype=np.float32)
    np.testing.assert_array_equal(got[Variant(1, "mean")], want)
    assert capsys.readouterr().err == ""


def test_retrieval_crossfitting_hides_each_scored_fold_from_its_pieces(monkeypatch):
    """Retrieval: a learned mix of fold k sees only the other folds' queries and qrels, and a transform of
    fold k never sees a document judged for fold k's queries."""
    n_q, n_d = 60, 150
    qrels = {f"q{i}": {f"d{i}": 1, f"d{(i * 7) % n_d}": 1} for i in range(n_q)}
    data = BeirData("syn-beir", [f"d{i}" for i in range(n_d)], [f"document {i}" for i in range(n_d)],
                    [f"q{i}" for i in range(n_q)], [f"query {i}" for i in range(n_q)], qrels, split="train")
    task = probe.make_task(data)
    vectors = _vectors(task)
    seen_queries, fitted_rows = [], []
    real_learn, real_fit_rows = scoring.learn_mix, task.fit_rows

    def spy_learn(encoder, variant, labels):
        seen_queries.append(set(labels.query_ids))
        return real_learn(encoder, variant, labels)

    def spy_fit_rows(items):
        rows = real_fit_rows(items)
        fitted_rows.append((np.asarray(items), rows))
        return rows

    monkeypatch.setattr(scoring, "learn_mix", spy_learn)
    task.fit_rows = spy_fit_rows
    log: list[probe.Fit] = []
    probe.score_variants(task, vectors, n_layers=3, mixes="all,learned:all", transforms=("center",), folds=5,
                         resamples=50, log=log, say=lambda *a, **k: None)
    folds = {frozenset(f.scored) for f in log}
    for queries in seen_queries:  # the queries a mix was fitted on: every query outside one scored fold
        held = frozenset(i for i, q in enumerate(task.query_ids) if q not in queries)
        assert held in folds
    assert fitted_rows
    doc_row = dict(zip(data.doc_ids, task.doc_rows))
    for train, rows in fitted_rows:
        scored = np.setdiff1d(np.arange(task.n), train)
        judged = {doc_row[d] for i in scored for d in qrels[task.query_ids[i]]}
        assert not set(rows.tolist()) & judged


def test_a_corpus_sample_transforms_learned_mixes_with_each_folds_weights():
    """``--corpus`` with a learned mix among the bases: the transform is fitted on the corpus sample mixed by
    the weights of the fold being scored, never on the labelled texts."""
    data = _sts()
    task = probe.make_task(data)
    vectors = _vectors(task)
    rng = np.random.default_rng(9)
    corpus = {v: rng.normal(size=(30, 8)) for v in vectors}
    scored = probe.score_variants(task, vectors, n_layers=3, mixes="learned:all", transforms=("center",), folds=5,
                                  resamples=50, shortlist=100, fit_vectors=corpus, fit_source="30 corpus texts",
                                  say=lambda *a, **k: None)
    both = [s for s in scored if s.variant.transform == "center" and (s.variant.mix or "").startswith("learned")]
    assert both and all(np.isfinite(s.score) for s in both)
    assert all("transform fitted on 30 corpus texts" in s.fitted_on and "mix weights cross-fitted" in s.fitted_on
               for s in both)

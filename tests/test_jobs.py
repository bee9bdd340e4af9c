"""Job specs and ``strata run``: incremental re-runs, versioning, LATEST, and one-line spec errors."""

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.index import load_index
from pipeline.jobs import JobSpecError, add_run_arguments, cmd_run, load_spec, read_latest, run_job
from pipeline.runner import read_embeddings
from conftest import data_file  # noqa: E402

VARIANTS = ["L1.mean", "L1.last", "L4.mean", "L4.last"]






@pytest.fixture(scope="module")
def sentences():
    rows = [line.split("\t") for line in (data_file("stsb", "sts-test.csv")).read_text(encoding="utf-8").splitlines()]
    return rows[:40]


def write_inputs(root: Path, rows, shards=3, per_shard=20):
    texts = [r[5] for r in rows] + [r[6] for r in rows]
    (root / "in").mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        sl = texts[i * per_shard:(i + 1) * per_shard]
        pq.write_table(pa.table({"id": [f"s{i}-{j}" for j in range(len(sl))], "text": sl}),
                       root / "in" / f"part-{i}.parquet")
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as f:  # a tiny STS set
        for r in rows[:12]:
            f.write(json.dumps({"sentence1": r[5], "sentence2": r[6], "score": float(r[4])}) + "\n")


def write_spec(path: Path, model_dir: str, *, output="out", poolings="[mean, last]", evaluations=True,
               kind="flat") -> Path:
    text = f"""
name: tiny
input: {{location: in, id_column: id}}
model: {model_dir}
variants: {{layers: "1,-1", poolings: {poolings}}}
embedding: {{max_length: 64, batch_tokens: 2048}}
resources: {{actors: 1}}
output: {output}
indexes: {{variants: all, kind: {kind}}}
"""
    if evaluations:
        text += "evaluations:\n  - {task: sts, data: pairs.jsonl}\n"
    path.write_text(text)
    return path


def run(spec, **kw) -> dict:
    return run_job(spec, progress=False, stream=io.StringIO(), **kw)


def tree(root: Path) -> dict:
    """Every file under root with (size, mtime): a snapshot to compare before and after."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def index_mtimes(pdir: Path) -> dict:
    return {v: (pdir / "indexes" / f"{v}.faiss").stat().st_mtime_ns for v in VARIANTS}


def published(job_dir: Path) -> Path:
    """The published version LATEST names (its manifest, indexes and job.json; parts by reference)."""
    latest = read_latest(str(job_dir))
    return job_dir / latest["version"] / "published" / latest["published"]


def by_id(path: Path) -> dict:
    t = read_embeddings(str(path))
    ids = t.column("id").to_pylist()
    return {c: dict(zip(ids, np.stack(t.column(c).to_numpy(zero_copy_only=False))))
            for c in t.column_names if c.startswith("emb_")}


# --------------------------------------------------------------------------- (a) incremental re-run
def test_rerun_embeds_only_the_changed_shard_rebuilds_only_stale_indexes_and_equals_fresh_run(
        ray_local, model_dir, sentences, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the spec's relative paths resolve against the working directory
    write_inputs(tmp_path, sentences)
    spec = write_spec(tmp_path / "job.yaml", model_dir)

    first = run(spec)
    vdir = tmp_path / "out" / "tiny" / first["version"]
    assert first["new_version"] and first["embed"]["shards_embedded"] == 3 and first["published_new"]
    assert read_latest("out/tiny")["version"] == first["version"]
    assert sorted(i["variant"] for i in first["indexes"]["built"]) == sorted(VARIANTS)
    m1 = {s["rel"]: s for s in json.loads((vdir / "manifest.json").read_text())["shards"]}
    pdir1 = published(tmp_path / "out" / "tiny")
    snapshot1 = tree(pdir1)
    eval_cache1 = json.loads((vdir / "eval-cache" / "manifest.json").read_text())["shards"]

    # change one shard's texts
    t = pq.read_table(tmp_path / "in" / "part-1.parquet")
    pq.write_table(t.set_column(1, "text", pa.array([x.upper() for x in t.column("text").to_pylist()])),
                   tmp_path / "in" / "part-1.parquet")

    # the dry run (through the CLI glue) names exactly that shard, and writes nothing
    before = tree(tmp_path / "out")
    parser = add_run_arguments(argparse.ArgumentParser())
    assert cmd_run(parser.parse_args([str(spec), "--dry-run", "--json"])) == 0
    plan = run(spec, dry_run=True)
    assert [e["shard"] for e in plan["shards"]["embed"]] == ["part-1.parquet"]
    assert sorted(plan["shards"]["skip"]) == ["part-0.parquet", "part-2.parquet"] and plan["shards"]["drop"] == []
    assert plan["estimated_tokens"] > 0 and sorted(plan["indexes"]["build"]) == sorted(VARIANTS)
    assert plan["version"] == first["version"]
    assert plan["evaluations"][0]["texts"] > 0 and plan["evaluations"][0]["to_embed"] == 0  # cached
    assert tree(tmp_path / "out") == before

    second = run(spec)
    assert second["version"] == first["version"] and not second["new_version"] and second["published_new"]
    assert (second["embed"]["shards_embedded"], second["embed"]["shards_skipped"]) == (1, 2)
    m2 = {s["rel"]: s for s in json.loads((vdir / "manifest.json").read_text())["shards"]}
    assert {rel for rel in m2 if m2[rel]["output"] != m1[rel]["output"]} == {"part-1.parquet"}
    assert all(m2[rel]["committed_at"] == m1[rel]["committed_at"] for rel in ("part-0.parquet", "part-2.parquet"))
    # a new published version, indexed from the new files; the previous one is untouched and readable,
    # its replaced shard's folder kept (retired) because it still reads it
    pdir2 = published(tmp_path / "out" / "tiny")
    assert pdir2 != pdir1 and tree(pdir1) == snapshot1
    assert read_embeddings(str(pdir1)).num_rows == read_embeddings(str(pdir2)).num_rows == 60
    assert json.loads((vdir / "manifest.json").read_text())["retired"] == [m1["part-1.parquet"]["output"]]
    record = json.loads((pdir2 / "indexes" / "_built.json").read_text())
    files = sorted(f"../../{s['output']}/{f}" for s in m2.values() for f in s["files"])
    assert all(sorted(record[v]["files"]) == files for v in VARIANTS)
    built2 = index_mtimes(pdir2)
    # the evaluation texts were not embedded again
    assert json.loads((vdir / "eval-cache" / "manifest.json").read_text())["shards"] == eval_cache1

    # nothing changed but one index is gone: no new version, only that index is built
    for suffix in (".faiss", ".ids.parquet", ".json"):
        (pdir2 / "indexes" / f"L1.mean{suffix}").unlink()
    third = run(spec)
    assert third["embed"]["shards_embedded"] == 0 and not third["published_new"]
    assert published(tmp_path / "out" / "tiny") == pdir2
    assert [i["variant"] for i in third["indexes"]["built"]] == ["L1.mean"]
    built3 = index_mtimes(pdir2)
    assert all(built3[v] == built2[v] for v in VARIANTS if v != "L1.mean")

    # a fresh full run of the same spec elsewhere gives the same embeddings, indexes and evaluation
    fresh = run(write_spec(tmp_path / "fresh.yaml", model_dir, output="fresh"))
    fdir = tmp_path / "fresh" / "tiny" / fresh["version"]
    assert fresh["version"] == first["version"]  # the version names the settings, not the place
    inc, new = by_id(pdir2), by_id(fdir)
    assert inc.keys() == new.keys()
    for col in new:
        assert inc[col].keys() == new[col].keys()
        for k in new[col]:
            np.testing.assert_allclose(inc[col][k], new[col][k], rtol=0, atol=1e-6)
    got = json.loads((vdir / "eval" / "results.json").read_text())
    want = json.loads((fdir / "eval" / "results.json").read_text())
    assert [{k: v for k, v in r.items() if k != "score"} for r in got] == \
        [{k: v for k, v in r.items() if k != "score"} for r in want]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-6)
    assert (vdir / "report.md").is_file() and list(vdir.glob("heatmap_*.png"))
    query = np.stack(list(new["emb_4_mean"].values())[:3])
    fpub = published(tmp_path / "fresh" / "tiny")
    for v in VARIANTS:
        a, b = load_index(pdir2 / "indexes" / f"{v}.faiss"), load_index(fpub / "indexes" / f"{v}.faiss")
        assert sorted(a.ids) == sorted(b.ids)
        if v == "L4.mean":
            assert a.search(query, 5)[1] == b.search(query, 5)[1]


# --------------------------------------------------------------------------- (b) versions
def test_changed_variants_write_a_new_version_and_leave_the_old_one_intact(ray_local, model_dir, sentences,
                                                                            tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_inputs(tmp_path, sentences, shards=1)
    spec = tmp_path / "job.yaml"
    old = run(write_spec(spec, model_dir, poolings="[mean]", evaluations=False))
    old_dir = tmp_path / "out" / "tiny" / old["version"]
    snapshot = tree(old_dir)

    new = run(write_spec(spec, model_dir, poolings="[mean, max]", evaluations=False))
    assert new["version"] != old["version"] and new["new_version"]
    assert new["previous_latest"] == old["version"]
    assert read_latest(str(tmp_path / "out" / "tiny"))["version"] == new["version"]
    assert not [p for p in (tmp_path / "out" / "tiny").iterdir() if p.name.startswith("LATEST.tmp")]
    # the old version is untouched and still complete and readable
    assert tree(old_dir) == snapshot
    t = read_embeddings(str(old_dir))
    assert [c for c in t.column_names if c.startswith("emb_")] == ["emb_1_mean", "emb_4_mean"] and t.num_rows == 20
    old_pub = next((old_dir / "published").iterdir())
    assert load_index(old_pub / "indexes" / "L4.mean.faiss").index.ntotal == 20
    t = read_embeddings(str(tmp_path / "out" / "tiny" / new["version"]))
    assert {c for c in t.column_names if c.startswith("emb_")} == {"emb_1_mean", "emb_1_max", "emb_4_mean",
                                                                    "emb_4_max"}
    # a job that fails after embedding (here: in the index stage) does not move LATEST
    import pipeline.jobs.run as jobs

    def broken(*a, **k):
        raise RuntimeError("index build failed")

    monkeypatch.setattr(jobs, "build_indexes", broken)
    with pytest.raises(RuntimeError, match="index build failed"):
        run(write_spec(spec, model_dir, poolings="[mean]", evaluations=False, kind="hnsw"))
    assert read_latest("out/tiny")["version"] == new["version"]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    # going back to the old settings finds the old version: nothing is embedded or built again
    back = run(write_spec(spec, model_dir, poolings="[mean]", evaluations=False))
    assert back["version"] == old["version"] and not back["new_version"]
    assert back["embed"]["shards_embedded"] == 0 and back["indexes"]["built"] == []
    assert read_latest(str(tmp_path / "out" / "tiny"))["version"] == old["version"]


# --------------------------------------------------------------------------- index-only on a remote output
def test_index_only_job_on_an_object_store_output(tmp_path, monkeypatch):
    """input.embeddings: nothing embedded; the index is built from a local mirror and uploaded."""
    import fsspec

    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    root = f"/strata-test-{os.getpid()}/out"
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 8)).astype(np.float32)
    table = pa.table({"id": [f"d{i}" for i in range(30)],
                      "emb_2_mean": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8)})
    with fs.open(f"{root}/embeddings/a-1/part-0.parquet", "wb") as f:
        pq.write_table(table, f)
    manifest = {"signature": {"model": "some-model", "weights_digest": "sha256:0", "variants": ["L2.mean"],
                              "max_length": 64, "dtype": "float32", "normalize": False, "format": "parquet"},
                "variants": [{"name": "L2.mean", "column": "emb_2_mean", "layer": 2, "pooling": "mean", "dim": 8}],
                "shards": [{"path": "in/a.parquet", "rel": "a.parquet", "output": "embeddings/a-1",
                            "files": ["part-0.parquet"]}]}
    with fs.open(f"{root}/manifest.json", "wb") as f:
        f.write(json.dumps(manifest).encode())
    spec = tmp_path / "index-only.yaml"
    spec.write_text(f"name: idx\ninput: {{embeddings: 'memory://{root}'}}\nindexes: {{kind: flat}}\n")

    first = run(spec)
    assert [i["variant"] for i in first["indexes"]["built"]] == ["L2.mean"]
    assert fs.exists(f"{root}/indexes/L2.mean.faiss") and fs.exists(f"{root}/indexes/_built.json")
    assert not (tmp_path / "cache" / "jobs" / "idx" / "out" / "embeddings").exists()  # parts read, not copied
    for suffix in (".faiss", ".ids.parquet", ".json"):
        fs.get_file(f"{root}/indexes/L2.mean{suffix}", str(tmp_path / f"L2.mean{suffix}"))
    local = load_index(tmp_path / "L2.mean.faiss")
    scores, ids = local.search(vectors[:2], 1)
    assert [row[0] for row in ids] == ["d0", "d1"]
    again = run(spec)
    assert again["indexes"] == {"built": [], "up_to_date": ["L2.mean"]}
    fs.rm(f"/strata-test-{os.getpid()}", recursive=True)


# --------------------------------------------------------------------------- (c) spec errors
GOOD = "name: t\ninput: {location: in}\noutput: out\n"
BAD_SPECS = {
    "typo-key": (GOOD + "variants: {layers: 1, poolngs: [mean]}\n", "variants.poolngs",
                 "unknown key (did you mean 'poolings'?"),
    "typo-top-key": (GOOD + "evaluation: []\n", "evaluation", "did you mean 'evaluations'?"),
    "wrong-type": (GOOD + "embedding: {max_length: lots}\n", "embedding.max_length", "expected an integer, got str"),
    "wrong-type-bool": (GOOD + "embedding: {normalize: 'yes'}\n", "embedding.normalize", "expected true or false"),
    "missing-input": ("name: t\noutput: out\n", "input", "missing (required)"),
    "bad-template": (GOOD + "variants: {layers: 1, templates: ['Summarise this']}\n", "variants.templates",
                     "has no {text} slot"),
    "bad-transform": (GOOD + "variants: {layers: 1, transforms: [center, pca3]}\n", "variants.transforms",
                      "unknown transform 'pca3'"),
    "mix-not-embedded": (GOOD + "model: smollm2-135m\nvariants: {layers: '8:12', mixes: ['4:12']}\n",
                         "variants.mixes", "needs layers 4..12, but layers [4, 5, 6, 7] are not embedded"),
    "learned-mix-no-labels": (GOOD + "model: smollm2-135m\nvariants: {layers: all, mixes: ['learned:all']}\n",
                              "variants.mix_labels", "a learned mix needs training labels"),
    "query-template-not-embedded": (GOOD + "model: smollm2-135m\nevaluations: [{task: retrieval, data: d, "
                                    "query_template: prompteol}]\n", "evaluations[0].query_template",
                                    "'prompteol' is not one of variants.templates (plain)"),
    "unknown-pooling": (GOOD + "variants: {layers: 1, poolings: [mean, avg]}\n", "variants.poolings[1]",
                        "unknown pooling 'avg' (choose from last, first, mean"),
    "layer-out-of-range-alias": (GOOD + "model: smollm2-135m\nvariants: {layers: 31}\n", "variants.layers",
                                 "layer 31 is out of range: this model has layers 0..30"),
    "layer-bad-syntax": (GOOD + "variants: {layers: 'middle'}\n", "variants.layers", "expected an integer"),
    "malformed-yaml": ("name: t\ninput: {location: in\noutput: out\n", "line 3, column 7", "invalid YAML"),
    "not-a-mapping": ("- name: t\n", "", "expected a mapping of job settings"),
    "unsafe-name": ("name: ../../etc\ninput: in\noutput: out\n", "name", "not a safe directory name"),
    "eval-unknown-task": (GOOD + "evaluations: [{task: translation, data: x}]\n", "evaluations[0]",
                          "unknown task 'translation'"),
    "eval-typo": (GOOD + "evaluations: [{task: retrieval, data: x, max_doc: 5}]\n", "evaluations[0].max_doc",
                  "did you mean 'max_docs'?"),
    "eval-url": (GOOD + "evaluations: [{task: sts, data: 's3://b/sts.csv'}]\n", "evaluations[0].data",
                 "read from local disk"),
    "index-kind": (GOOD + "indexes: {kind: annoy}\n", "indexes.kind", "'annoy' is not allowed"),
    "index-variant-not-in-grid": (GOOD + "model: smollm2-135m\nindexes: {variants: [L3.mean]}\n",
                                  "indexes.variants[0]", "L3.mean is not one of the job's variants"),
    "eval-only-with-indexes": ("name: t\ninput: null\noutput: o\nindexes: {}\nevaluations: [{task: sts, data: x}]\n",
                               "indexes", "evaluation only"),
    "existing-with-variants": ("name: t\ninput: {embeddings: o/t}\nvariants: {layers: 1}\nindexes: {}\n",
                               "variants", "not allowed with input.embeddings"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_malformed_spec_is_one_clear_line(case, tmp_path):
    text, field, expected = BAD_SPECS[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(JobSpecError) as err:
        load_spec(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {field}: " if field else f"{path}: "), msg
    assert expected in msg, msg


def test_layer_range_checked_against_a_model_directory(model_dir, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(f"name: t\ninput: in\noutput: out\nmodel: {model_dir}\nvariants: {{layers: '2,9'}}\n")
    with pytest.raises(JobSpecError, match=r"job.yaml: variants.layers: layer 9 is out of range: this model has "
                                           r"layers 0..4"):
        load_spec(path)
    path.write_text(f"name: t\ninput: in\noutput: out\nmodel: {model_dir}\nvariants: {{layers: '50%,-1'}}\n")
    assert load_spec(path).variants.layers == "50%,-1"


def test_missing_spec_and_missing_eval_data_fail_before_any_work(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(JobSpecError, match="nope.yaml: job spec not found"):
        load_spec("nope.yaml")
    Path("job.yaml").write_text(f"name: t\ninput: null\noutput: out\nmodel: {model_dir}\n"
                                "evaluations: [{task: sts, data: missing.jsonl}]\n")
    with pytest.raises(JobSpecError, match=r"job.yaml: evaluations\[0\].data: missing.jsonl: file not found"):
        run("job.yaml")
    assert not Path("out").exists()


def test_an_evaluation_only_job_moves_latest_to_its_version_folder(ray_local, model_dir, sentences, tmp_path,
                                                                    monkeypatch):
    """No corpus, so nothing is published: LATEST names the version folder holding the report."""
    monkeypatch.chdir(tmp_path)
    write_inputs(tmp_path, sentences, shards=1)
    Path("job.yaml").write_text(f"name: ev\ninput: null\noutput: out\nmodel: {model_dir}\n"
                                "variants: {layers: '1,-1', poolings: [mean]}\nembedding: {max_length: 64}\n"
                                "evaluations: [{task: sts, data: pairs.jsonl}]\n")
    summary = run("job.yaml")
    latest = read_latest("out/ev")
    assert latest["version"] == summary["version"] and latest["published"] is None
    assert summary["evaluations"] > 0 and (tmp_path / "out" / "ev" / summary["version"] / "report.md").is_file()

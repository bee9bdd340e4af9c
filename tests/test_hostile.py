"""Hostile inputs and outputs (issue #17): each case names the problem in one line, and every
input row is written or recorded as rejected, none lost or duplicated. Tiny model, few rows."""

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.runner import Committer, EmbedSummary, Shard, list_shards, plan, read_embeddings, write_parts
from pipeline.storage import DamagedOutput, Output, OutputInUse
from reference import embed

OPTS = dict(layers="1,-1", poolings="mean", id_column="id", progress=False)


def write_input(directory: Path, shards=2, rows=6, texts=None) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    ids = []
    for s in range(shards):
        part_ids = [f"s{s}-r{r}" for r in range(rows)]
        part_texts = texts[s] if texts else [f"sentence {r} of shard {s} about strata" for r in range(rows)]
        pq.write_table(pa.table({"id": part_ids, "text": part_texts}), directory / f"part-{s}.parquet")
        ids += part_ids
    return ids


def manifest(out) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def accounted(out) -> list[str]:
    """Every id written or recorded as rejected, from the committed files."""
    m = manifest(out)
    ids = read_embeddings(str(out), ["id"]).column("id").to_pylist()
    for s in m["shards"]:
        for f in s.get("rejects_files", []):
            ids += [f"{s['rel']}#{r}" for r in pq.read_table(Path(out) / s["output"] / f).column("row").to_pylist()]
    return ids


@pytest.fixture(scope="module")
def first_run(ray_local, model_dir, tmp_path_factory):
    """One embed into an output that already holds user files under embeddings/ and _staging/."""
    d = tmp_path_factory.mktemp("first")
    ids = write_input(d / "in")
    (d / "out" / "embeddings").mkdir(parents=True)
    (d / "out" / "_staging").mkdir()
    (d / "out" / "embeddings" / "mine.parquet").write_bytes(b"user data")
    (d / "out" / "_staging" / "notes.txt").write_text("user notes")
    summary = embed(str(d / "in"), str(d / "out"), model=model_dir, **OPTS)
    return d, ids, summary


# ---------------------------------------------------------------- 5: only Strata's own files are swept
def test_user_files_under_embeddings_and_staging_survive_the_sweep(first_run):
    d, ids, summary = first_run
    assert (d / "out" / "embeddings" / "mine.parquet").read_bytes() == b"user data"
    assert (d / "out" / "_staging" / "notes.txt").read_text() == "user notes"
    assert summary.rows == len(ids) and sorted(accounted(d / "out")) == sorted(ids)


def test_sweep_removes_only_what_the_manifest_or_its_run_ids_name(tmp_path):
    out = Output(str(tmp_path / "out"))
    for rel in ["_staging/run1/k/part-1.parquet", "_staging/theirs/x.txt", "embeddings/k-run1/part-1.parquet",
                "embeddings/k-keep/part-0.parquet", "embeddings/users-folder/data.parquet"]:
        (tmp_path / "out" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / rel).write_bytes(b"x")
    removed = out.sweep({"runs": ["run1"], "shards": [{"output": "embeddings/k-keep"}]})
    assert sorted(removed) == ["_staging/run1", "embeddings/k-run1"]
    assert (tmp_path / "out" / "_staging" / "theirs" / "x.txt").exists()
    assert (tmp_path / "out" / "embeddings" / "users-folder" / "data.parquet").exists()
    assert (tmp_path / "out" / "embeddings" / "k-keep" / "part-0.parquet").exists()


def test_a_non_empty_folder_that_is_not_a_strata_output_is_refused(model_dir, tmp_path):
    write_input(tmp_path / "in")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError) as e:
        embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert "not a Strata output" in one_line(e) and "thesis.tex" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["thesis.tex"]  # nothing written


# ---------------------------------------------------------------- 10: overlapping INPUT and OUTPUT
@pytest.mark.parametrize("where", ["same", "output_inside", "input_inside"])
def test_overlapping_input_and_output_are_refused(model_dir, tmp_path, where):
    root = tmp_path / "data"
    ids = write_input(root / "in" if where == "input_inside" else root)
    (root / "embeddings").mkdir(exist_ok=True)
    inp, out = {"same": (root, root), "output_inside": (root, root / "out"),
                "input_inside": (root / "in", root)}[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError) as e:
        embed(str(inp), str(out), model=model_dir, **OPTS)
    assert {"same": "the same location", "output_inside": "OUTPUT is inside INPUT",
            "input_inside": "INPUT is inside OUTPUT"}[where] in one_line(e)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing touched
    assert len(ids) == 12


# ---------------------------------------------------------------- 8: the lock is an atomic create
def test_the_lock_is_never_taken_from_a_live_holder_even_when_a_read_misses_it(tmp_path, monkeypatch):
    import os
    import socket
    import time

    out = Output(str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    theirs = {"token": "theirs", "host": socket.gethostname(), "pid": os.getpid(), "started": "now",
              "heartbeat": time.time()}
    (tmp_path / "out" / "_lock.json").write_text(json.dumps(theirs))
    real = Output.read_json
    # the race of a read-then-write lock: our read happens just before the other run's write
    monkeypatch.setattr(Output, "read_json", lambda self, rel: None if rel == "_lock.json" else real(self, rel))
    with pytest.raises(OutputInUse) as e:
        with out.lock():
            pass
    assert "another run" in one_line(e)
    assert json.loads((tmp_path / "out" / "_lock.json").read_text())["token"] == "theirs"  # not overwritten


def test_two_runs_starting_together_get_exactly_one_lock(tmp_path):
    out = tmp_path / "out"
    held, refused, barrier = [], [], threading.Barrier(8)

    def run():
        barrier.wait()
        try:
            with Output(str(out)).lock():
                held.append(1)
                barrier_done.wait()
        except OutputInUse:
            refused.append(1)

    barrier_done = threading.Event()
    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for _ in range(100):
        if len(held) + len(refused) == 8 or (held and len(refused) == 7):
            break
        threading.Event().wait(0.05)
    barrier_done.set()
    for t in threads:
        t.join()
    assert len(held) == 1 and len(refused) == 7


# ---------------------------------------------------------------- 7: staged parts missing at commit
def _stage_batch(rows: list[int], rel: str) -> pa.Table:
    n = len(rows)
    return pa.table({
        "_shard": pa.array([0] * n, pa.int32()), "_row": pa.array(rows, pa.int64()),
        "id": pa.array([f"{rel}#{r}" for r in rows]), "_truncated": pa.array([False] * n),
        "_reject": pa.array([None] * n, pa.string()), "_error": pa.array([None] * n, pa.string()),
        "_tokens": pa.array([1] * n, pa.int64()), "_padded": pa.array([1] * n, pa.int64()),
        "_key": pa.array([None] * n, pa.binary(16)),
        "emb_1_mean": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 2, dtype=np.float32)), 2),
    })


def _commit_run(out: Output, shard: Shard, lose_staging: bool) -> EmbedSummary:
    m = out.read_manifest() or {"variants": [{"name": "L1.mean", "column": "emb_1_mean"}], "shards": []}
    out.sweep(m)
    m["runs"] = ["r1" if lose_staging else "r2"]
    out.write_manifest(m)
    todo, _, _ = plan(m, [shard])
    summary = EmbedSummary(output=out.url)
    committer = Committer(out, m, todo, summary, m["runs"][0])
    metas = []
    for rows in ([0, 1, 2], [3, 4]):
        metas += write_parts(_stage_batch(rows, shard.rel), output_url=out.url, run_id=m["runs"][0],
                             keys=[shard.key], columns=["emb_1_mean"], fmt="parquet").to_pylist()
    if lose_staging:
        shutil.rmtree(Path(out.root) / "_staging")  # _staging disappears mid-run
    for meta in metas:
        committer.feed(meta)
    committer.finish()
    out.write_manifest(m)
    return summary


def test_a_shard_whose_staged_parts_vanished_is_not_committed(tmp_path):
    out = Output(str(tmp_path / "out"))
    shard = Shard("/in/s0.parquet", "s0.parquet", "fp", rows=5, row_groups=[5])
    summary = _commit_run(out, shard, lose_staging=True)
    msg = summary.shards_failed["s0.parquet"]
    assert "vanished before the commit" in msg and "\n" not in msg
    assert out.read_manifest()["shards"] == []  # never recorded as done
    summary = _commit_run(out, shard, lose_staging=False)  # the re-run commits it in full
    assert not summary.shards_failed
    assert sorted(out.read_table(["id"]).column("id").to_pylist()) == [f"s0.parquet#{r}" for r in range(5)]
    (entry,) = out.read_manifest()["shards"]
    assert sum(p["rows"] for p in entry["parts"].values()) == 5


# ---------------------------------------------------------------- 9: damaged committed parts
def test_damaged_parts_are_named_on_read_and_re_embedded_on_resume(first_run, model_dir, tmp_path, caplog):
    d, ids, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(d / "out", out)
    shutil.copytree(d / "in", tmp_path / "in")
    m = manifest(out)
    a, b = sorted(m["shards"], key=lambda s: s["rel"])
    truncated = out / a["output"] / a["files"][0]
    truncated.write_bytes(truncated.read_bytes()[:1024])  # cut to 1 KB
    fewer = out / b["output"] / b["files"][0]
    pq.write_table(pq.read_table(fewer).slice(0, 2), fewer)  # a valid file with fewer rows
    with pytest.raises(DamagedOutput) as e:
        read_embeddings(str(out), ["id"])
    assert a["files"][0] in one_line(e) and "re-run `strata embed`" in str(e.value)
    from pipeline.index import build_indexes

    with pytest.raises(DamagedOutput) as e:  # strata index: the same line, before reading any part
        build_indexes(str(out), None, "flat")
    assert a["files"][0] in one_line(e)

    with caplog.at_level("WARNING", logger="pipeline.runner.run"):
        summary = embed(str(tmp_path / "in"), str(out), model=model_dir, **OPTS)  # resume
    assert summary.shards_embedded == 2 and summary.shards_skipped == 0
    said = [r.getMessage() for r in caplog.records if "re-embedding shard" in r.getMessage()]
    assert len(said) == 2 and any(a["files"][0] in m for m in said)  # each damaged shard, by name
    got = read_embeddings(str(out), ["id"]).column("id").to_pylist()
    assert sorted(got) == sorted(ids)  # exactly once

    # an older manifest without per-part records still reads and resumes (existence checked only)
    m = manifest(out)
    for s in m["shards"]:
        s.pop("parts")
    (out / "manifest.json").write_text(json.dumps(m))
    assert sorted(read_embeddings(str(out), ["id"]).column("id").to_pylist()) == sorted(ids)


# ---------------------------------------------------------------- 12: Spark's leftovers are not data
def test_underscore_and_dot_paths_are_not_shards(tmp_path):
    write_input(tmp_path / "in", shards=1)
    attempt = tmp_path / "in" / "_temporary" / "0" / "_temporary" / "attempt_202611301200_0001_m_000000_0"
    attempt.mkdir(parents=True)
    shutil.copy(tmp_path / "in" / "part-0.parquet", attempt / "part-00000.parquet")
    (tmp_path / "in" / "_SUCCESS").write_bytes(b"")
    (tmp_path / "in" / ".part-0.parquet.crc").write_bytes(b"crc")
    (tmp_path / "in" / ".hidden").mkdir()
    shutil.copy(tmp_path / "in" / "part-0.parquet", tmp_path / "in" / ".hidden" / "x.parquet")
    shutil.copy(tmp_path / "in" / "part-0.parquet", tmp_path / "in" / "_partial.parquet")
    _, shards = list_shards(str(tmp_path / "in"))
    assert [s.rel for s in shards] == ["part-0.parquet"]
    _, shards = list_shards(str(tmp_path / "in" / "*.parquet"))
    assert [s.rel for s in shards] == ["part-0.parquet"]


# ---------------------------------------------------------------- 11: invalid UTF-8 rejects one row
def test_invalid_utf8_rejects_only_that_row(ray_local, model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    raw = [b"a good sentence", b"binary \xff\xfe junk", b"cesu \xed\xa0\x80 surrogate", b"another good one"]
    text = pa.array(raw, type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "text": text}), tmp_path / "in" / "part-0.parquet")
    summary = embed(str(tmp_path / "in"), str(tmp_path / "out"), model=model_dir, **OPTS)
    assert not summary.shards_failed and summary.rows == 4 and summary.rows_rejected == 2
    (entry,) = manifest(tmp_path / "out")["shards"]
    assert entry["rows_written"] == 2 and entry["rows_rejected"] == 2
    assert set(entry["rejected_reasons"]) == {"invalid UTF-8 (byte 0xff at offset 7)",
                                              "invalid UTF-8 (byte 0xed at offset 5)"}
    assert sorted(read_embeddings(str(tmp_path / "out"), ["id"]).column("id").to_pylist()) == ["a", "d"]
    assert sorted(accounted(tmp_path / "out")) == ["a", "d", "part-0.parquet#1", "part-0.parquet#2"]


# ---------------------------------------------------------------- 1: empty BEIR documents, empty STS sentences
def test_empty_beir_documents_are_left_out_and_counted(ray_local, model_dir, tmp_path, capsys):
    from pipeline.cli import main

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": f"document {i} about river stone"} for i in range(6)]
    docs += [{"_id": "e1", "title": "", "text": ""}, {"_id": "e2", "title": " ", "text": "  "}]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                                                for q, t in [("q1", "river"), ("q2", "stone")]))
    # q2's only relevant document is empty: a miss
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\te1\t1\n")
    out = tmp_path / "out"
    assert main(["eval", "retrieval", str(beir), "--output", str(out), "--model", model_dir, "--layers", "-1",
                 "--poolings", "mean", "--engine", "ray", "-q"]) == 0
    rows = json.loads((out / "eval" / "results.json").read_text())
    assert rows and all(r["left_out"] == "2 empty document(s) left out of the corpus (relevant ones count as "
                                         "misses)" for r in rows)
    recall = [r["score"] for r in rows if r["metric"].startswith("recall")]
    assert recall and all(s <= 50.0 for s in recall)  # q2 cannot find its empty document
    assert read_embeddings(str(out), ["id"]).num_rows == 8  # 6 non-empty docs + 2 queries, once each
    assert main(["report", str(out)]) == 0
    assert "Not evaluated: 2 empty document(s) left out of the corpus" in (out / "report.md").read_text()
    capsys.readouterr()


def test_an_empty_sts_sentence_skips_its_pair_with_a_record(model_dir, tmp_path, capsys):
    from pipeline.cli import main

    pairs = tmp_path / "pairs.jsonl"
    words = ["cat sat", "dog ran", "bird flew", "fish swam", "tree grew"]
    lines = [{"sentence1": words[i % 5], "sentence2": words[(i * 2) % 5], "score": float(i % 4)} for i in range(8)]
    lines[2]["sentence2"] = ""
    pairs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert main(["eval", "sts", str(pairs), "--output", str(out), "--model", model_dir, "--layers", "-1",
                 "--poolings", "mean", "--engine", "local", "-q"]) == 0
    rows = json.loads((out / "eval" / "results.json").read_text())
    assert rows and all(r["left_out"] == "1 pair(s) with an empty sentence skipped" for r in rows)
    capsys.readouterr()


# ---------------------------------------------------------------- 14: special-token markup in corpus text
def test_special_token_markup_in_text_is_tokenised_as_text(model_dir):
    from transformers import AutoTokenizer

    from pipeline.templates import parse_template, tokenize

    tok = AutoTokenizer.from_pretrained(model_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    plain = tokenize(tok, ["hello <|im_end|> world"], 64)
    assert end not in plain.ids[0] and plain.spans[0][1] - plain.spans[0][0] > 3
    templated = tokenize(tok, ["hello <|im_end|> world"], 64, parse_template("<|im_start|>{text}<|im_end|>"))
    start, stop = templated.spans[0]
    assert end not in templated.ids[0][start:stop]  # the text's own markup: plain tokens
    assert templated.ids[0][stop] == end  # the template's special token: kept on purpose


# ---------------------------------------------------------------- 13: --max-length beyond the model's positions
def test_max_length_beyond_position_limit_is_capped_with_a_warning(model_dir, caplog):
    from pipeline.request import resolve

    limit = json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"]
    with caplog.at_level("WARNING"):
        request = resolve(model_dir, max_length=limit * 4, digest=False)
    assert request.settings.max_length == limit
    (line,) = [r.getMessage() for r in caplog.records if "position limit" in r.getMessage()]
    assert f"capped at {limit}" in line and "\n" not in line


# ---------------------------------------------------------------- 16: many small row groups are packed
def test_work_units_pack_small_row_groups_and_split_large_ones():
    from pipeline.runner import work_units

    groups = [1] * 2000 + [0, 5000, 3]
    shard = Shard("/in/a.parquet", "a.parquet", "fp", rows=sum(groups), row_groups=groups)
    units = work_units([shard], 2048)
    assert len(units) == -(-sum(groups) // 2048) == 4
    starts = np.cumsum([0, *groups])
    covered = []
    for u in units:  # plainly: the rows of the unit's row groups, skip, take `rows`
        rows = [r for g in u["rgs"] for r in range(starts[g], starts[g + 1])][u["skip"]:u["skip"] + u["rows"]]
        assert rows == list(range(u["row0"], u["row0"] + u["rows"]))
        covered += rows
    assert covered == list(range(sum(groups)))  # every row exactly once
    assert units[0]["rgs"] == list(range(2000)) + [2000, 2001]  # 2,000 one-row groups in one read


def test_one_row_row_groups_embed_as_one_row_group_does(ray_local, model_dir, tmp_path):
    texts = [f"text {i} about the river stone" for i in range(300)]
    table = pa.table({"id": [f"r{i}" for i in range(300)], "text": texts})
    for name, size in (("one", None), ("many", 1)):
        (tmp_path / name).mkdir()
        pq.write_table(table, tmp_path / name / "a.parquet", row_group_size=size)
    assert pq.ParquetFile(tmp_path / "many" / "a.parquet").num_row_groups == 300
    got = {}
    for name in ("one", "many"):
        summary = embed(str(tmp_path / name), str(tmp_path / f"out-{name}"), model=model_dir, unit_rows=128, **OPTS)
        assert summary.rows == 300 and not summary.shards_failed
        t = read_embeddings(str(tmp_path / f"out-{name}")).sort_by("id")
        got[name] = t
    assert got["one"].column("id").to_pylist() == sorted(table.column("id").to_pylist())
    for col in ("emb_1_mean", "emb_4_mean"):
        a = np.stack(got["one"].column(col).to_numpy(zero_copy_only=False))
        b = np.stack(got["many"].column(col).to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(a, b, atol=1e-5)

"""The hostile-input sweep (issue #17): each case is a command a new user could type, on data and
setups nobody here wrote, run through the CLI exactly as `strata` runs it. Every case asserts all four:

1. the exit status;
2. stderr: no traceback, every line bounded, and on failure exactly one ``strata CMD:`` line that
   names the problem (on success, the line that records what was left out or changed);
3. rows: every input row is in the output or recorded as rejected, once; a refused command
   leaves no committed rows (and touches neither input nor output);
4. no secret: every case works under a folder named like ``KEY:SECRET@host`` with the secret also
   in the environment, and the secret is in none of stdout, stderr, the output's files, Strata's
   log files or Ray's session logs.

Shards that cannot be read at all are named in the error; their rows stay in the input and the
next run retries them (their rows are counted nowhere else, so none are lost)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.errors import MAX_MESSAGE
from pipeline.jobs.load import SpecLoader
from pipeline.runner import read_embeddings
from pipeline.storage import Output

SECRET = "SWEEPSECRET7319"


@dataclass
class Case:
    argv: list[str]
    rc: int
    says: list[str]  # substrings of the one error line (rc != 0) or of some stderr/stdout line (rc 0)
    rows: list[str] | None = None  # ids expected in the output (written + rejected); None: not an embed
    out: Path | None = None
    unchanged: list[Path] = field(default_factory=list)  # trees that a refused command must not touch (must exist)
    absent: list[Path] = field(default_factory=list)  # paths the command must not create (a marker)
    # (owner, attribute): callables the command must stop before; each is replaced by one that records its call
    never: list[tuple[object, str]] = field(default_factory=list)
    writes: list[Path] = field(default_factory=list)  # files outside OUTPUT the command is asked to write


CASES: dict[str, Callable[..., Case]] = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------- helpers
def shard(path: Path, ids, texts, **kw) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "text": texts}, **kw), path)
    return list(ids)


def simple(path: Path, tag: str, n: int = 4) -> list[str]:
    return shard(path, [f"{tag}-{i}" for i in range(n)], [f"sentence {i} of {tag} about rivers" for i in range(n)])


def embed_argv(root: Path, model: str, *extra: str, inp: Path | None = None, out: Path | None = None) -> list[str]:
    """``strata embed`` with small defaults; ``extra`` options come last, so they override them."""
    return ["embed", str(inp or root / "in"), str(out or root / "out"), "--model", model, "--layers", "-1",
            "--poolings", "mean", "--id-column", "id", "-q", *extra]


def _outside(top: Path, allowed: list[Path]) -> dict:
    """``snapshot`` of ``top`` without what lies in (or is) an allowed path."""
    skip = [str(a) for a in allowed]
    # a folder's own mtime moves when an allowed entry appears in it: folders are compared by presence
    return {k: None if (top / k).is_dir() else v for k, v in snapshot(top).items()
            if not any(str(top / k) == a or str(top / k).startswith(a + "/") for a in skip)}


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))} \
        if path.exists() else {}


def accounted(out: Path) -> list[str]:
    """Every id in the committed output: written rows, then rejected rows (as their recorded ids)."""
    if not (out / "manifest.json").exists():
        return []
    m = json.loads((out / "manifest.json").read_text())
    if not m.get("shards"):
        return []
    ids = read_embeddings(str(out), ["id"]).column("id").to_pylist()
    for s in m["shards"]:
        for f in s.get("rejects_files", []):
            t = pq.read_table(out / s["output"] / f)
            ids += t.column("id").to_pylist() if "id" in t.column_names and all(t.column("id").to_pylist()) \
                else [f"{s['rel']}#{r}" for r in t.column("row").to_pylist()]
    return ids


# ---------------------------------------------------------------- input layout
@case
def spark_layout(root, model):
    ids = simple(root / "in" / "part-00000.parquet", "a") + simple(root / "in" / "part-00001.parquet", "b")
    (root / "in" / "_SUCCESS").write_bytes(b"")
    (root / "in" / ".part-00000.parquet.crc").write_bytes(b"\x00crc")
    simple(root / "in" / "_temporary" / "0" / "_temporary" / "attempt_1_m_0" / "part-00002.parquet", "tmp")
    simple(root / "in" / ".hidden" / "x.parquet", "hidden")
    return Case(embed_argv(root, model), 0, ["2 shards embedded"], rows=ids)


@case
def nested_folders(root, model):
    ids = simple(root / "in" / "top.parquet", "t") + simple(root / "in" / "year=2026" / "month=11" / "p.parquet", "n")
    ids += simple(root / "in" / "a" / "top.parquet", "same-name-deeper")
    return Case(embed_argv(root, model), 0, ["3 shards embedded"], rows=ids)


@case
def text_file_named_parquet(root, model):
    ids = simple(root / "in" / "good.parquet", "g")
    (root / "in" / "notes.parquet").write_text("id,text\n1,hello\n")
    return Case(embed_argv(root, model), 2, ["1 shard(s) failed", "notes.parquet", "not a readable Parquet file"],
                rows=ids)


@case
def zero_byte_parquet(root, model):
    ids = simple(root / "in" / "good.parquet", "g")
    (root / "in" / "empty.parquet").write_bytes(b"")
    return Case(embed_argv(root, model), 2, ["empty.parquet", "not a readable Parquet file"], rows=ids)


@case
def zero_row_shard(root, model):
    ids = simple(root / "in" / "good.parquet", "g")
    shard(root / "in" / "none.parquet", pa.array([], pa.string()), pa.array([], pa.string()))
    return Case(embed_argv(root, model), 0, ["2 shards embedded"], rows=ids)


@case
def input_missing(root, model):
    return Case(embed_argv(root, model), 2, ["does not exist", "in"], rows=[], out=root / "out")


@case
def input_without_parquet(root, model):
    (root / "in").mkdir()
    (root / "in" / "data.csv").write_text("id,text\n1,a\n")
    return Case(embed_argv(root, model), 2, ["no Parquet files"], rows=[], unchanged=[root / "in"])


@case
def glob_input(root, model):
    ids = simple(root / "in" / "a.parquet", "a") + simple(root / "in" / "b.parquet", "b")
    simple(root / "in" / "c.other.parquet.bak", "bak")
    return Case(embed_argv(root, model, inp=root / "in" / "*.parquet"), 0, ["2 shards embedded"], rows=ids)


# ---------------------------------------------------------------- schema drift between shards
@case
def text_column_missing_in_one_shard(root, model):
    simple(root / "in" / "a.parquet", "a")
    pq.write_table(pa.table({"id": ["b-0"], "body": ["x"]}), root / "in" / "b.parquet")
    return Case(embed_argv(root, model), 2, ["text column 'text' not found in b.parquet", "body"], rows=[],
                unchanged=[root / "in"])


@case
def duplicate_text_column_in_one_shard(root, model):
    simple(root / "in" / "a.parquet", "a")
    twice = pa.Table.from_arrays([pa.array(["b-0"]), pa.array(["x"]), pa.array(["y"])], names=["id", "text", "text"])
    pq.write_table(twice, root / "in" / "b.parquet")
    return Case(embed_argv(root, model), 2, ["b.parquet has 2 columns named 'text'", "rename one"], rows=[],
                unchanged=[root / "in"])


@case
def folder_name_with_brackets(root, model):
    ids = simple(root / "in[v2]" / "a.parquet", "a")  # a folder that exists is read as given, not as a glob
    return Case(embed_argv(root, model, inp=root / "in[v2]"), 0, ["1 shards embedded"], rows=ids)


@case
def fifo_named_parquet(root, model):
    ids = simple(root / "in" / "a.parquet", "a")
    os.mkfifo(root / "in" / "b.parquet")  # reading it would wait for a writer forever
    return Case(embed_argv(root, model), 0, ["skipping", "b.parquet: not a regular file"], rows=ids)


@case
def directory_symlink_in_input(root, model):
    ids = simple(root / "in" / "a.parquet", "a") + simple(root / "elsewhere" / "2024" / "b.parquet", "b")
    (root / "in" / "2024").symlink_to(root / "elsewhere" / "2024")  # fsspec's find skipped it, exit 0
    (root / "in" / "loop").symlink_to(root / "in")  # a cycle: each real folder is read once
    return Case(embed_argv(root, model), 0, ["2 shards embedded"], rows=ids)


@case
def directory_symlink_into_output(root, model):
    simple(root / "in" / "a.parquet", "a")
    (root / "out").mkdir()
    (root / "in" / "back").symlink_to(root / "out")
    return Case(embed_argv(root, model), 2, ["in/back under INPUT leads to", "inside OUTPUT"],
                unchanged=[root / "in"])


@case
def text_column_int_in_one_shard(root, model):
    simple(root / "in" / "a.parquet", "a")
    pq.write_table(pa.table({"id": ["b-0"], "text": [7]}), root / "in" / "b.parquet")
    return Case(embed_argv(root, model), 2, ["b.parquet", "int64", "expected a string column"], rows=[])


@case
def extra_and_reordered_columns(root, model):
    ids = simple(root / "in" / "a.parquet", "a")
    pq.write_table(pa.table({"lang": ["en", "fr"], "text": ["one", "deux"], "id": ["b-0", "b-1"], "n": [1, 2]}),
                   root / "in" / "b.parquet")
    return Case(embed_argv(root, model), 0, ["2 shards embedded"], rows=ids + ["b-0", "b-1"])


@case
def large_string_and_string_shards(root, model):
    ids = simple(root / "in" / "a.parquet", "a")
    pq.write_table(pa.table({"id": pa.array(["b-0", "b-1"], pa.large_string()),
                             "text": pa.array(["large one", "large two"], pa.large_string())}), root / "in" / "b.parquet")
    return Case(embed_argv(root, model), 0, ["2 shards embedded"], rows=ids + ["b-0", "b-1"])


@case
def int_ids_in_one_shard(root, model):
    ids = simple(root / "in" / "a.parquet", "a")
    pq.write_table(pa.table({"id": [10, 11], "text": ["ten", "eleven"]}), root / "in" / "b.parquet")
    return Case(embed_argv(root, model), 0, ["2 shards embedded"], rows=ids + ["10", "11"])


@case
def dictionary_encoded_text(root, model):
    t = pa.table({"id": ["d-0", "d-1", "d-2"], "text": pa.array(["red", "blue", "red"]).dictionary_encode()})
    (root / "in").mkdir()
    pq.write_table(t, root / "in" / "cat.parquet")
    return Case(embed_argv(root, model), 0, ["1 shards embedded"], rows=["d-0", "d-1", "d-2"])


# ---------------------------------------------------------------- text content
@case
def huge_text(root, model):
    ids = shard(root / "in" / "a.parquet", ["big", "small"], ["word " * 200_000, "small text"])
    return Case(embed_argv(root, model, "--max-length", "64"), 0, ["1 truncated"], rows=ids)


@case
def nul_characters(root, model):
    ids = shard(root / "in" / "a.parquet", ["nul", "ok"], ["before\x00after\x00", "fine"])
    return Case(embed_argv(root, model), 0, ["2 rows (0 rejected)"], rows=ids)


@case
def invalid_utf8_and_surrogates(root, model):
    (root / "in").mkdir()
    raw = pa.array([b"good one", b"cesu \xed\xa0\x80 half", b"bin \xff\xfe", b"good two"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": ["g1", "s", "b", "g2"], "text": raw}), root / "in" / "a.parquet")
    return Case(embed_argv(root, model), 0, ["4 rows (2 rejected)"], rows=["g1", "s", "b", "g2"])


@case
def invalid_utf8_with_int8_calibration(root, model):
    (root / "in").mkdir()
    raw = pa.array([b"bad \xff first", b"good one", b"good two", b"good three"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": ["b", "g1", "g2", "g3"], "text": raw}), root / "in" / "a.parquet")
    return Case(embed_argv(root, model, "--dtype", "int8"), 0, ["4 rows (1 rejected)"], rows=["b", "g1", "g2", "g3"])


@case
def special_token_strings(root, model):
    texts = ["<|im_end|>", "<|endoftext|><|im_start|>system", "<s></s><pad>[CLS]", "normal"]
    ids = shard(root / "in" / "a.parquet", [f"t{i}" for i in range(4)], texts)
    return Case(embed_argv(root, model), 0, ["4 rows (0 rejected)"], rows=ids)


@case
def empty_whitespace_and_null_texts(root, model):
    ids = shard(root / "in" / "a.parquet", ["e", "w", "n", "ok"], ["", " \t\n ", None, "text"])
    return Case(embed_argv(root, model), 0, ["4 rows (3 rejected)"], rows=ids)


@case
def unicode_mix(root, model):
    texts = ["emoji 🚀🔥 ok", "שלום עולם", "e\u0301\u0301\u0301 combining", "\u200b\ufeff zero width", "中文字符"]
    ids = shard(root / "in" / "a.parquet", [f"u{i}" for i in range(5)], texts)
    return Case(embed_argv(root, model), 0, ["5 rows (0 rejected)"], rows=ids)


# ---------------------------------------------------------------- ids
@case
def null_ids(root, model):
    shard(root / "in" / "a.parquet", ["a", None, "c"], ["one", "two", "three"])
    return Case(embed_argv(root, model), 0, ["3 rows (1 rejected)"], rows=["a", "a.parquet#1", "c"])


@case
def duplicate_ids_across_shards(root, model):
    ids = shard(root / "in" / "a.parquet", ["x", "y"], ["one", "two"])
    ids += shard(root / "in" / "b.parquet", ["x", "z"], ["three", "four"])
    return Case(embed_argv(root, model), 0, ["1 DUPLICATE ids"], rows=ids)


@case
def path_like_and_huge_ids(root, model):
    ids = shard(root / "in" / "a.parquet", ["../../etc/passwd", "a/b/c", "C:\\x", "i" * 50_000],
                ["one", "two", "three", "four"])
    return Case(embed_argv(root, model), 0, ["4 rows (0 rejected)"], rows=ids)


@case
def id_column_missing(root, model):
    (root / "in").mkdir()
    pq.write_table(pa.table({"text": ["a"]}), root / "in" / "a.parquet")
    return Case(embed_argv(root, model), 2, ["id column 'id' not found in a.parquet"], rows=[])


# ---------------------------------------------------------------- options out of range
@case
def layer_out_of_range(root, model):
    simple(root / "in" / "a.parquet", "a")
    return Case(embed_argv(root, model, "--layers", "99"), 2, ["layer 99 is out of range"], rows=[], out=root / "out")


@case
def unknown_pooling(root, model):
    simple(root / "in" / "a.parquet", "a")
    return Case(embed_argv(root, model, "--poolings", "avg"), 2, ["unknown pooling 'avg'"], rows=[], out=root / "out")


@case
def max_length_zero(root, model):
    simple(root / "in" / "a.parquet", "a")
    return Case(embed_argv(root, model, "--max-length", "0"), 2, ["max_length must be positive, got 0"], rows=[], out=root / "out")


@case
def max_length_beyond_positions(root, model):
    ids = simple(root / "in" / "a.parquet", "a")
    return Case(embed_argv(root, model, "--max-length", "10000000"), 0, ["position limit", "capped at"], rows=ids)


@case
def batch_tokens_negative(root, model):
    simple(root / "in" / "a.parquet", "a")
    return Case(embed_argv(root, model, "--batch-tokens", "-5"), 2, ["batch_tokens must be positive, got -5"], rows=[], out=root / "out")


@case
def actors_zero(root, model):
    simple(root / "in" / "a.parquet", "a")
    return Case(embed_argv(root, model, "--actors", "0"), 2, ["actors must be at least 1, got 0"], rows=[], out=root / "out")


@case
def calibration_rows_zero(root, model):
    simple(root / "in" / "a.parquet", "a")
    return Case(embed_argv(root, model, "--dtype", "int8", "--calibration-rows", "0"), 2, ["--calibration-rows 0"],
                rows=[])


@case
def max_output_size_garbage(root, model):
    simple(root / "in" / "a.parquet", "a")
    return Case(embed_argv(root, model, "--max-output-size", "lots"), 2, ["lots"], rows=[], out=root / "out")


# ---------------------------------------------------------------- output paths
@case
def output_inside_input(root, model):
    simple(root / "in" / "a.parquet", "a")
    return Case(embed_argv(root, model, out=root / "in" / "emb"), 2, ["OUTPUT is inside INPUT"], rows=[],
                unchanged=[root / "in"])


@case
def output_is_a_file(root, model):
    simple(root / "in" / "a.parquet", "a")
    (root / "out").write_text("a file")
    return Case(embed_argv(root, model), 2, ["***@host/out is a file, not a directory"], rows=[], unchanged=[root / "in"])


@case
def output_not_writable(root, model):
    simple(root / "in" / "a.parquet", "a")
    out = Path("/proc/strata-sweep-out")  # writable by nobody, root included
    # before any work: the runner does everything to an output (sweep, manifest, embedding) under its lock
    return Case(embed_argv(root, model, out=out), 2, ["output location /proc/strata-sweep-out is not writable: "],
                rows=[], unchanged=[root / "in"], never=[(Output, "lock")])


@case
def output_is_someone_elses_folder(root, model):
    simple(root / "in" / "a.parquet", "a")
    (root / "out").mkdir()
    (root / "out" / "thesis.tex").write_text("mine")
    return Case(embed_argv(root, model), 2, ["not a Strata output", "thesis.tex"], rows=[],
                unchanged=[root / "out", root / "in"])


@case
def output_made_with_other_settings(root, model):
    ids = simple(root / "in" / "a.parquet", "a")
    assert main(embed_argv(root, model)) == 0
    return Case(embed_argv(root, model, "--poolings", "last"), 2, ["different", "--force"], rows=ids, unchanged=[root / "out"])


@case
def different_input_into_an_existing_output(root, model):
    ids = simple(root / "in" / "a.parquet", "a")
    assert main(embed_argv(root, model)) == 0
    simple(root / "other" / "b.parquet", "b")
    return Case(embed_argv(root, model, inp=root / "other"), 2,
                ["holds the embeddings of INPUT", "/in, not", "/other", "drop or replace 1 of its 1 committed shard",
                 "--replace-input"], rows=ids, unchanged=[root / "out"])


@case
def different_input_with_replace_input(root, model):
    simple(root / "in" / "a.parquet", "a")
    assert main(embed_argv(root, model)) == 0
    ids = simple(root / "other" / "b.parquet", "b")
    return Case(embed_argv(root, model, "--replace-input", inp=root / "other"), 0, ["1 dropped"], rows=ids)


# ---------------------------------------------------------------- evaluation data
def beir(root: Path, docs: list[dict], queries: list[tuple[str, str]], qrels: str) -> Path:
    d = root / "beir"
    (d / "qrels").mkdir(parents=True)
    (d / "corpus.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    (d / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries))
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return d


DOCS = [{"_id": f"d{i}", "title": "", "text": f"document {i} about river stone"} for i in range(6)]


def eval_argv(root: Path, model: str, task: str, data: Path) -> list[str]:
    return ["eval", task, str(data), "--output", str(root / "out"), "--model", model, "--layers", "-1",
            "--poolings", "mean", "--engine", "local", "-q"]


@case
def beir_empty_documents(root, model):
    d = beir(root, DOCS + [{"_id": "e1", "title": "", "text": ""}], [("q1", "river"), ("q2", "stone")],
             "q1\td1\t1\nq2\te1\t1\n")
    return Case(eval_argv(root, model, "retrieval", d), 0, ["1 empty document(s) left out"])


@case
def beir_queries_without_qrels(root, model):
    d = beir(root, DOCS, [("q1", "river"), ("q2", "stone"), ("q3", "cloud")], "q1\td1\t1\n")
    return Case(eval_argv(root, model, "retrieval", d), 0, ["1 queries judged in test (2 unjudged not evaluated)"])


@case
def beir_qrels_to_missing_documents(root, model):
    d = beir(root, DOCS, [("q1", "river"), ("q2", "stone")], "q1\td1\t1\nq2\tnope\t1\n")
    return Case(eval_argv(root, model, "retrieval", d), 0, ["1 relevant document id(s) in the qrels are not in the corpus"])


@case
def beir_without_corpus(root, model):
    d = beir(root, DOCS, [("q1", "river")], "q1\td1\t1\n")
    (d / "corpus.jsonl").unlink()
    return Case(eval_argv(root, model, "retrieval", d), 2, ["corpus.jsonl"])


@case
def beir_bad_json_line(root, model):
    d = beir(root, DOCS, [("q1", "river")], "q1\td1\t1\n")
    with (d / "corpus.jsonl").open("a") as f:
        f.write("{not json\n")
    return Case(eval_argv(root, model, "retrieval", d), 2, ["corpus.jsonl:7: invalid JSON"])


def sts_file(root: Path, scores) -> Path:
    words = ["cat sat", "dog ran", "bird flew", "fish swam", "tree grew"]
    rows = [{"sentence1": words[i % 5], "sentence2": words[(i * 2 + 1) % 5], "score": s} for i, s in enumerate(scores)]
    p = root / "pairs.jsonl"
    p.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in rows))
    return p


@case
def sts_nan_scores(root, model):
    p = sts_file(root, [0.0, 1.0, float("nan"), 3.0, 4.0, 2.0, 1.5, float("nan")])
    return Case(eval_argv(root, model, "sts", p), 2, ["pairs.jsonl:3: score nan is not finite"])


@case
def sts_missing_column(root, model):
    p = root / "pairs.jsonl"
    p.write_text(json.dumps({"sentence1": "a", "score": 1.0}) + "\n")
    return Case(eval_argv(root, model, "sts", p), 2, ["sentence2"])


@case
def sts_constant_scores(root, model):
    p = sts_file(root, [2.0] * 8)
    return Case(eval_argv(root, model, "sts", p), 2, ["every pair has the same score", "undefined"])


# ---------------------------------------------------------------- probe recipes
def recipe_with_transform(root: Path, model: str, transform_path: str, dim: int | None = None) -> Path:
    """A probe.json (as ``strata probe`` writes one) whose one entry has a fitted centering at ``transform_path``
    (relative to the recipe's folder), its mean ``dim`` wide (the model's width when None)."""
    import numpy as np

    from pipeline.recipe import CONTRACT
    from pipeline.request import resolve
    from pipeline.transforms import Transform

    request = resolve(model, layers="-1", poolings="mean", device="cpu")
    width = request.model.dim
    folder = root / "probe"
    Transform("center", np.zeros(dim or width), None, {"source": "a sample"}).save(folder / transform_path)
    (folder / "probe.json").write_text(json.dumps({
        "contract": CONTRACT,
        "model": {"name": request.model.name, "path": request.model.path,
                  "weights_digest": request.model.weights_digest, "n_layers": request.model.n_layers, "dim": width},
        "settings": {"max_length": 32, "append_eos": False, "templates": request.template_texts()},
        "recipe": [{"variant": f"L{request.model.n_layers}.mean|center", "sources": [f"L{request.model.n_layers}.mean"],
                    "transform_path": transform_path}]}))
    return folder / "probe.json"


@case
def recipe_transform_outside_its_folder(root, model):
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    p = recipe_with_transform(root, model, "../elsewhere/center")  # a probe.json is data: it never steers reads
    return Case(["export", str(p), "L4.mean|center", str(root / "served")], 2,
                ["L4.mean|center's transform_path '../elsewhere/center' points outside the recipe's folder"],
                unchanged=[elsewhere], absent=[root / "served"])


@case
def recipe_transform_of_the_wrong_shape(root, model):
    p = recipe_with_transform(root, model, "pieces/center", dim=7)
    return Case(["export", str(p), "L4.mean|center", str(root / "served")], 2,
                ["transform 'pieces/center' has shape(s) (7,)", "have 32 dimensions"], absent=[root / "served"])


# ---------------------------------------------------------------- job specs
def spec(root: Path, text: str) -> Path:
    p = root / "job.yaml"
    p.write_text(text)
    return p


@case
def job_alias_bomb(root, model):
    lines = ["name: x", 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    # refused by the loader while it parses (composes) the document: no value is ever constructed
    return Case(["run", "--dry-run", str(spec(root, "\n".join(lines) + "\n"))], 2,
                ["job.yaml: line ", "invalid YAML: ", "aliases (*name)", "refused"],
                never=[(SpecLoader, "construct_document")])


@case
def job_python_tag(root, model):
    marker = root / "ran"
    p = spec(root, f'name: !!python/object/apply:os.system ["touch {marker}"]\n')  # yaml.unsafe_load makes it
    # nothing runs: no marker, and nothing else appears under root either
    return Case(["run", "--dry-run", str(p)], 2, ["could not determine a constructor"], unchanged=[root],
                absent=[marker])


@case
def job_wrong_types(root, model):
    p = spec(root, f"name: x\ninput: null\nmodel: {model}\nvariants: {{layers: {{a: 1}}, poolings: 7}}\n"
                   f"output: {root / 'out'}\n")
    return Case(["run", "--dry-run", str(p)], 2, ["job.yaml", "variants.layers"])


@case
def job_unknown_key(root, model):
    p = spec(root, f"name: x\ninput: null\nmodel: {model}\noutptu: {root / 'out'}\n")
    return Case(["run", "--dry-run", str(p)], 2, ["outptu", "unknown key"])


@case
def job_not_a_mapping(root, model):
    return Case(["run", "--dry-run", str(spec(root, "- just\n- a list\n"))], 2, ["job.yaml"])


@case
def job_bad_name(root, model):
    p = spec(root, f"name: ../../escape\ninput: null\nmodel: {model}\noutput: {root / 'out'}\n")
    return Case(["run", "--dry-run", str(p)], 2, ["name"])


@case
def flipped_byte_in_a_committed_part(root, model):
    simple(root / "in" / "a.parquet", "a")
    assert main(embed_argv(root, model)) == 0
    m = json.loads((root / "out" / "manifest.json").read_text())
    (entry,) = m["shards"]
    part = root / "out" / entry["output"] / entry["files"][0]
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0x01  # same size, same rows: only the checksum tells
    part.write_bytes(bytes(data))
    return Case(["index", str(root / "out"), "--kind", "flat"], 2,
                [entry["files"][0], "does not match its checksum", "re-run `strata embed`"],
                absent=[root / "out" / "indexes"])


@case
def build_record_steering_deletion_outside(root, model):
    simple(root / "in" / "a.parquet", "a")
    assert main(embed_argv(root, model)) == 0
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim.faiss").write_bytes(b"keep me")
    record = root / "out" / "indexes" / "L4.mean.build.json"  # a record is data: never steers a deletion
    record.parent.mkdir()
    record.write_text(json.dumps({"user": {}, "options": {}, "shards": {"gone-0123456789": {
        "fingerprint": {}, "offset": 0, "rows": 4, "part": "../../../elsewhere/victim.faiss"}}}))
    return Case(["index", str(root / "out"), "--variants", "L4.mean", "--kind", "ivfpq", "--engine", "ray"], 2,
                ["L4.mean.build.json", "'gone-0123456789'", "'../../../elsewhere/victim.faiss'",
                 "not a file inside L4.mean.parts/"], unchanged=[elsewhere])


@case
def flipped_byte_then_resume(root, model):
    ids = simple(root / "in" / "a.parquet", "a")
    assert main(embed_argv(root, model)) == 0
    m = json.loads((root / "out" / "manifest.json").read_text())
    (entry,) = m["shards"]
    part = root / "out" / entry["output"] / entry["files"][0]
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0x01  # the run that committed it was the last: a resume reads its checksum
    part.write_bytes(bytes(data))
    return Case(embed_argv(root, model), 0, ["re-embedding shard a.parquet", "does not match its checksum"],
                rows=ids)


class _Evil:
    def __reduce__(self):  # a pickle that calls print when loaded without weights_only
        return (print, ("pwned",))


def _model_copy(root: Path, model: str) -> Path:
    import shutil

    d = root / "model"
    shutil.copytree(model, d)
    return d


@case
def model_pickle_refused_by_weights_only(root, model):
    import torch
    from safetensors.torch import load_file

    d = _model_copy(root, model)
    sd = load_file(d / "model.safetensors")
    sd["evil"] = _Evil()
    torch.save(sd, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    simple(root / "in" / "a.parquet", "a")
    return Case(embed_argv(root, str(d), "--allow-pickle"), 2,
                ["pytorch_model.bin: torch refused to unpickle it (weights_only)"], rows=[], out=root / "out")


@case
def model_safetensors_garbage(root, model):
    d = _model_copy(root, model)
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 64)  # a valid config, random weights bytes
    simple(root / "in" / "a.parquet", "a")
    return Case(embed_argv(root, str(d)), 2, ["model.safetensors is not a readable safetensors file"], rows=[],
                out=root / "out")


@case
def model_weights_of_another_shape(root, model):
    from safetensors.torch import load_file, save_file

    d = _model_copy(root, model)
    sd = load_file(d / "model.safetensors")  # a valid header, every tensor there, one of another model's shape
    sd["layers.0.mlp.up_proj.weight"] = sd["layers.0.mlp.up_proj.weight"].T.contiguous()
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    simple(root / "in" / "a.parquet", "a")
    return Case(embed_argv(root, str(d)), 2, ["model.safetensors: tensor layers.0.mlp.up_proj.weight has shape "
                                              "[32, 64]", "expects [64, 32]"], rows=[], out=root / "out")


@case
def stale_index_searched(root, model):
    simple(root / "in" / "a.parquet", "a")
    assert main(embed_argv(root, model)) == 0
    assert main(["index", str(root / "out"), "--kind", "flat"]) == 0
    simple(root / "in" / "b.parquet", "b")  # committed after the index was built
    assert main(embed_argv(root, model)) == 0
    pq.write_table(pa.table({"query_id": ["q0"], "text": ["rivers"]}), root / "q.parquet")
    return Case(["search", str(root / "out"), "L4.mean", "--queries", str(root / "q.parquet"), "--out",
                 str(root / "res.parquet")], 0,
                ["index of", "is stale", "from 1 of the 2 committed file(s)", "Refresh it: strata index"],
                writes=[root / "res.parquet"])


@case
def job_output_symlinked_into_input(root, model):
    simple(root / "in" / "a.parquet", "a")
    (root / "in" / "jobs").mkdir()
    (root / "outlink").symlink_to(root / "in" / "jobs")  # the output, resolved, is inside INPUT
    p = spec(root, f"name: x\ninput: {{location: {root / 'in'}, id_column: id}}\nmodel: {model}\n"
                   f"variants: {{layers: '-1', poolings: [mean]}}\noutput: {root / 'outlink'}\n")
    return Case(["run", str(p)], 2, ["output: OUTPUT is inside INPUT"], unchanged=[root / "in"])


# ---------------------------------------------------------------- credentials in URLs
@case
def credentials_in_output_url(root, model):
    simple(root / "in" / "a.parquet", "a")
    return Case(embed_argv(root, model, out=f"s3://AKIAKEY:{SECRET}@bucket/out"), 2, ["***@bucket"], rows=[],
                unchanged=[root / "in"])


@case
def credentials_in_input_url(root, model):
    return Case(embed_argv(root, model, inp=f"s3://AKIAKEY:{SECRET}@bucket/in"), 2, ["***@bucket"], rows=[],
                out=root / "out")


@case
def credentials_in_https_query(root, model):
    url = f"https://storage.example/in.parquet?X-Amz-Signature={SECRET}&X-Amz-Credential={SECRET}"
    return Case(embed_argv(root, model, inp=url), 2, ["storage.example"], rows=[], out=root / "out")


@case
def credentials_in_job_spec(root, model):
    p = spec(root, f"name: x\ninput: {{location: 's3://AK:{SECRET}@bucket/in'}}\nmodel: {model}\n"
                   f"output: {root / 'out'}\n")
    return Case(["run", "--dry-run", str(p)], 2, ["***@bucket"])


# ---------------------------------------------------------------- the check: all four, every case
def _ray_logs() -> str:
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return ""
    logs = Path(node.get_session_dir_path()) / "logs"
    return "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file())


def _texts_under(path: Path) -> str:
    if not path.exists():
        return ""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in files)


@pytest.fixture(autouse=True)
def no_cached_filesystems():
    """fsspec keeps filesystem instances: none made with a case's credentials may outlive it."""
    yield
    import fsspec

    for protocol in ("s3", "https"):
        try:
            fsspec.get_filesystem_class(protocol).clear_instance_cache()
        except ImportError:
            pass


def _recorder(calls: list[str], name: str):
    def called(*args, **kwargs):
        calls.append(name)
        raise RuntimeError(f"{name} must not be called in this case")
    return called


def _check_preconditions(c: Case) -> None:
    """Every case, once set up and before its command runs: its unchanged= paths exist (a snapshot of a
    path that does not exist is {} before and after: it would assert nothing) and its absent= paths do
    not. (A separate test of this alone set every case up a second time: 96 s of CI.)"""
    missing = [str(p) for p in c.unchanged if not p.exists()]
    assert not missing, f"unchanged= names paths the case never creates: {missing}"
    there = [str(p) for p in c.absent if p.exists()]
    assert not there, f"absent= names paths that exist before the command: {there}"


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case(name, ray_local, model_dir, tmp_path, monkeypatch, capsys):
    root = tmp_path / f"KEY:{SECRET}@host"
    root.mkdir()
    logs = tmp_path / "logs"
    monkeypatch.setenv("STRATA_LOG_DIR", str(logs))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAKEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    c = CASES[name](root, model_dir)
    capsys.readouterr()
    _check_preconditions(c)
    before = {p: snapshot(p) for p in c.unchanged}
    out_dir = c.out or root / "out"
    allowed = [out_dir, logs, *c.writes]
    around = _outside(tmp_path, allowed)
    calls: list[str] = []
    for owner, attr in c.never:
        monkeypatch.setattr(owner, attr, _recorder(calls, f"{owner.__name__}.{attr}"))
    rc = main(c.argv)
    out, err = capsys.readouterr()

    assert not calls, f"the command went on to {calls}"
    # 1. exit status
    assert rc == c.rc, (rc, err[-2000:])
    # 2. one bounded line naming the problem; never a traceback
    assert "Traceback" not in out + err, err
    assert all(len(line) < MAX_MESSAGE + 300 for line in (out + err).splitlines()), err
    command = c.argv[0]
    if c.rc:
        (line,) = [x for x in err.splitlines() if x.startswith(f"strata {command}:")]
        assert all(s in line for s in c.says), (c.says, line)
    else:
        assert any(all(s in x for s in c.says) for x in (out + err).splitlines()), (c.says, out, err)
    # 3. rows: written or recorded as rejected, once each; a refused command changes nothing
    if c.rows is not None:
        assert sorted(accounted(out_dir)) == sorted(c.rows)
    for p, snap in before.items():
        assert snapshot(p) == snap, p
    if c.out is not None:
        assert not c.out.exists() or not any(c.out.iterdir())
    for p in c.absent:
        assert not p.exists(), p
    # 5. nothing outside OUTPUT (and the log folder, and a file the command was asked to write) changed
    assert _outside(tmp_path, allowed) == around
    # 4. no secret anywhere
    for where, text in (("stdout", out), ("stderr", err), ("output", _texts_under(out_dir)),
                        ("strata logs", _texts_under(logs)), ("ray logs", _ray_logs())):
        assert SECRET not in text, where


def test_every_sweep_case_is_in_docs_failures():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "failures.md").read_text(encoding="utf-8")
    missing = [name for name in CASES if f"`{name}`" not in doc]
    assert not missing, f"docs/failures.md's sweep table has no row for: {', '.join(missing)}"

import json


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.evaldata import EvalDataError, load_beir, load_sts
from conftest import data_file  # noqa: E402


PAIRS = [("A cat sits.", 'He said "hi".', 4.5), ("Two dogs run.", "It rains.", 0.25)]


def test_stsb_test_split_loads_whole_with_quotes_and_extra_columns():
    data = load_sts(data_file("stsb", "sts-test.csv"))
    assert (data.name, data.split, len(data)) == ("stsb", "test", 1379)
    assert data.sentence1[0] == "A girl is styling her hair."
    assert data.scores[0] == 2.5 and data.scores.min() >= 0 and data.scores.max() <= 5
    lines = (data_file("stsb", "sts-test.csv")).read_text(encoding="utf-8").splitlines()
    extra = next(i for i, line in enumerate(lines) if len(line.split("\t")) > 7)
    assert data.sentence2[extra] == lines[extra].split("\t")[6]  # trailing source columns ignored


def test_stsb_rows_keep_quotes_verbatim(tmp_path):
    path = tmp_path / "sts-dev.csv"
    path.write_text("g\tf\ty\t1\t3.0\t\"Quoted\" start\tend \"quote\t\n", encoding="utf-8")
    path.write_text(path.read_text() + "g\tf\ty\t2\t1.0\ta\tb\tsrc1\tsrc2\n", encoding="utf-8")
    data = load_sts(path)
    assert data.sentence1 == ['"Quoted" start', "a"] and data.sentence2 == ['end "quote', "b"]
    assert data.split == "dev"


@pytest.mark.parametrize("fmt", ["jsonl", "tsv", "parquet"])
def test_generic_pair_formats_agree(tmp_path, fmt):
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(dict(zip(("sentence1", "sentence2", "score"), p))) for p in PAIRS))
    elif fmt == "tsv":
        path.write_text("score\tsentence1\tsentence2\n" + "".join(f"{c}\t{a}\t{b}\n" for a, b, c in PAIRS))
    else:
        pq.write_table(pa.table({k: [p[i] for p in PAIRS] for i, k in enumerate(("sentence1", "sentence2", "score"))}),
                       path)
    data = load_sts(path)
    assert data.sentence1 == [p[0] for p in PAIRS] and data.sentence2 == [p[1] for p in PAIRS]
    np.testing.assert_array_equal(data.scores, [4.5, 0.25])
    assert data.name == "pairs"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_line_separators_inside_a_sentence_stay_in_it(tmp_path, fmt):
    """Rows end at "\n" (or "\r\n") only: U+2028, U+0085, a form feed and a lone "\r" inside a
    sentence (raw, as JSON allows for all but "\r", which it escapes) are part of it, not a row end."""
    pairs = [("one\u2028line", "form\x0cfeed", 1.0), ("next\x85line", "lone\rreturn", 2.0)]
    path = tmp_path / f"sts-test.{fmt}"
    if fmt == "csv":
        text = "".join(f"g\tf\ty\t{i}\t{c}\t{a}\t{b}\r\n" for i, (a, b, c) in enumerate(pairs))
    else:
        text = "".join(json.dumps(dict(zip(("sentence1", "sentence2", "score"), p)), ensure_ascii=False) + "\r\n"
                       for p in pairs)
    path.write_bytes(text.encode("utf-8"))
    data = load_sts(path)
    assert data.sentence1 == [p[0] for p in pairs] and data.sentence2 == [p[1] for p in pairs]
    np.testing.assert_array_equal(data.scores, [1.0, 2.0])


@pytest.mark.parametrize("content, fragment", [
    ("g\tf\ty\t1\tfive\ta\tb\ng\tf\ty\t1\t1\ta\tb\n", r"x\.csv:1: score 'five' is not a number"),
    ("g\tf\ty\t1\t2\ta\tb\ng\tf\ty\t1\t2\ta\n", r"x\.csv:2: expected at least 7"),
    ("just one column\n", r"x\.csv:1: unrecognised pairs format"),
    ("", "no data"),
])
def test_malformed_sts_names_file_and_line(tmp_path, content, fragment):
    path = tmp_path / "x.csv"
    path.write_text(content)
    with pytest.raises(EvalDataError, match=fragment):
        load_sts(path)


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a", "score": 2}\n')
    with pytest.raises(EvalDataError, match=r"p\.jsonl:2: missing field\(s\) sentence2"):
        load_sts(path)


# ------------------------------------------------------------------ BEIR


def write_beir(root, corpus, queries, qrels, split="test"):
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return root


def test_scifact_loads_as_published():
    data = load_beir(data_file("scifact"))
    assert (data.name, len(data.doc_ids), len(data.query_ids)) == ("scifact", 5183, 300)
    assert sum(len(v) for v in data.qrels.values()) == 339
    assert set(data.query_ids) == set(data.qrels)
    first = json.loads((data_file("scifact", "corpus.jsonl")).open().readline())
    assert data.doc_texts[0] == first["title"] + " " + first["text"]


def test_beir_text_join_and_query_filter(tmp_path):
    root = write_beir(tmp_path / "toy",
                      corpus=[{"_id": "d1", "title": "", "text": "body"}, {"_id": 2, "text": "no title"},
                              {"_id": "d3", "title": "T", "text": ""}],
                      queries=[{"_id": "q1", "text": "one"}, {"_id": "q2", "text": "unjudged"}],
                      qrels=[("q1", "d1", 2), ("q1", "2", 1)])
    data = load_beir(root)
    assert data.doc_ids == ["d1", "2", "d3"] and data.doc_texts == ["body", "no title", "T"]
    assert data.query_ids == ["q1"] and data.query_texts == ["one"]
    assert data.qrels == {"q1": {"d1": 2, "2": 1}}


@pytest.mark.parametrize("bad, fragment", [
    ("corpus", r"corpus\.jsonl:2: duplicate _id 'a'"),
    ("qrels", r"test\.tsv:2: relevance 'x' is not an integer"),
    ("query", "absent from queries.jsonl"),
])
def test_malformed_beir_names_the_problem(tmp_path, bad, fragment):
    corpus = [{"_id": "a", "text": "x"}, {"_id": "a" if bad == "corpus" else "b", "text": "y"}]
    qrels = [("q1" if bad != "query" else "qX", "a", "x" if bad == "qrels" else 1)]
    root = write_beir(tmp_path / "bad", corpus, [{"_id": "q1", "text": "t"}], qrels)
    with pytest.raises(EvalDataError, match=fragment):
        load_beir(root)


def test_missing_split_file_is_named(tmp_path):
    root = write_beir(tmp_path / "toy", [{"_id": "a", "text": "x"}], [{"_id": "q", "text": "t"}], [("q", "a", 1)])
    with pytest.raises(EvalDataError, match=r"dev\.tsv: qrels file not found"):
        load_beir(root, split="dev")


def test_subset_is_deterministic_and_keeps_every_judged_doc():
    data = load_beir(data_file("scifact"))
    sub = data.subset(20, max_docs=300, seed=3)
    again = data.subset(20, max_docs=300, seed=3)
    assert sub.query_ids == again.query_ids and sub.doc_ids == again.doc_ids
    assert len(sub.query_ids) == 20 and len(sub.doc_ids) == 300
    judged = {d for q in sub.query_ids for d in sub.qrels[q]}
    assert judged <= set(sub.doc_ids)
    assert sub.name == "scifact-subset" and "20 of 300 queries" in sub.subset_note
    positions = [data.doc_ids.index(d) for d in sub.doc_ids]
    assert positions == sorted(positions)  # corpus order kept
    assert data.subset(20, max_docs=300, seed=4).query_ids != sub.query_ids

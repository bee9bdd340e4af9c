"""Evaluation data: STS sentence pairs and BEIR-layout retrieval sets, loaded into small typed objects.

Readers are strict on purpose: a silently skipped or mis-split line changes a benchmark
score without anyone noticing, so every malformed input raises an error that names the
file and the line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

PAIR_COLUMNS = ("sentence1", "sentence2", "score")
_SPLITS = ("train", "dev", "validation", "test")


def default_data_dir() -> Path:
    """The evaluation data folder (stsb/, scifact/): ``$STRATA_DATA``, else the checkout's sibling ``shared/data``."""
    env = os.environ.get("STRATA_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


class EvalDataError(ValueError):
    """Evaluation data that is missing or malformed."""


@dataclass
class StsData:
    name: str
    sentence1: list[str]
    sentence2: list[str]
    scores: np.ndarray  # gold similarity, float64, any scale (only the ranking matters)
    split: str = "test"

    def __post_init__(self):
        if not (len(self.sentence1) == len(self.sentence2) == len(self.scores)):
            raise EvalDataError(f"{self.name}: sentence1, sentence2 and scores differ in length")

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class BeirData:
    name: str
    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: graded relevance}
    split: str = "test"
    # Set on subsets: their scores are NOT comparable to published full-corpus numbers.
    subset_note: str | None = field(default=None)
    unjudged_queries: int = 0  # queries in queries.jsonl with no judgement in this split: not evaluated

    def subset(self, n_queries: int, max_docs: int | None = None, seed: int = 0,
                  name: str | None = None) -> "BeirData":
        """A small deterministic slice for fast demos.

        Keeps ``n_queries`` queries (seeded sample, original order) and a corpus made of every
        document judged for them plus a seeded sample of the others, up to ``max_docs`` in all
        (judged documents are always kept, even beyond ``max_docs``). A smaller corpus has
        fewer distractors, so scores come out higher than on the full set and must never be
        compared with published numbers; the result is renamed ``{name}-subset`` to say so.
        """
        if n_queries < 1:
            raise EvalDataError(f"subset: n_queries must be positive, got {n_queries}")
        rng = np.random.default_rng(seed)
        n_queries = min(n_queries, len(self.query_ids))
        keep_q = np.sort(rng.choice(len(self.query_ids), size=n_queries, replace=False))
        query_ids = [self.query_ids[i] for i in keep_q]
        judged = {d for q in query_ids for d in self.qrels[q]}
        judged_idx = [i for i, d in enumerate(self.doc_ids) if d in judged]
        others = np.array([i for i, d in enumerate(self.doc_ids) if d not in judged], dtype=np.int64)
        room = len(others) if max_docs is None else max(0, max_docs - len(judged_idx))
        sampled = rng.choice(others, size=min(room, len(others)), replace=False) if room else []
        keep_d = sorted([*judged_idx, *(int(i) for i in sampled)])
        return BeirData(
            name=name or f"{self.name}-subset",
            doc_ids=[self.doc_ids[i] for i in keep_d],
            doc_texts=[self.doc_texts[i] for i in keep_d],
            query_ids=query_ids,
            query_texts=[self.query_texts[i] for i in keep_q],
            qrels={q: dict(self.qrels[q]) for q in query_ids},
            split=self.split,
            subset_note=f"{n_queries} of {len(self.query_ids)} queries, {len(keep_d)} of {len(self.doc_ids)} docs, "
                   f"seed {seed}",
        )


def read_texts(path: str | Path, column: str = "text") -> list[str]:
    """Unlabelled texts: a Parquet file's ``column``, or a text file with one text per line."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        try:
            table = pq.read_table(path, columns=[column])
        except FileNotFoundError:
            raise EvalDataError(f"{path}: file not found") from None
        except (KeyError, ValueError) as e:
            raise EvalDataError(f"{path}: no {column!r} column ({e})") from None
        texts = [t for t in table.column(column).to_pylist() if t and t.strip()]
    else:
        texts = [line for _, line in _read_lines(path)]
    if not texts:
        raise EvalDataError(f"{path}: no texts")
    return texts


# --------------------------------------------------------------------------- STS


def _infer_split(stem: str) -> str:
    m = re.search(r"(?:^|[-_.])(" + "|".join(_SPLITS) + r")$", stem)
    return m.group(1) if m else "test"


def _score(value, where: str) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise EvalDataError(f"{where}: score {value!r} is not a number") from None
    if not np.isfinite(score):
        raise EvalDataError(f"{where}: score {value!r} is not finite")
    return score


def _read_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_bytes().decode("utf-8")  # not read_text: it would turn a lone "\r" into a line end
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path}: not UTF-8 ({e})") from None
    # lines end at "\n" (and a "\r" before it) only: str.splitlines would also cut at U+2028,
    # U+0085, form feeds and other separators that may stand inside a sentence or a JSON string
    lines = (line[:-1] if line.endswith("\r") else line for line in text.split("\n"))
    return [(n, line) for n, line in enumerate(lines, 1) if line.strip()]


def _stsb_rows(path: Path, lines) -> tuple[list, list, list]:
    s1, s2, scores = [], [], []
    for n, line in lines:
        fields = line.split("\t")
        if len(fields) < 7:
            raise EvalDataError(f"{path}:{n}: expected at least 7 tab-separated fields "
                                f"(genre, file, year, id, score, sentence1, sentence2), got {len(fields)}")
        scores.append(_score(fields[4], f"{path}:{n}"))
        s1.append(fields[5])
        s2.append(fields[6])
    return s1, s2, scores


def _header_tsv_rows(path: Path, lines) -> tuple[list, list, list]:
    (_, head), rows = lines[0], lines[1:]
    header = head.split("\t")
    col = {c: header.index(c) for c in PAIR_COLUMNS}
    s1, s2, scores = [], [], []
    for n, line in rows:
        fields = line.split("\t")
        if len(fields) != len(header):
            raise EvalDataError(f"{path}:{n}: expected {len(header)} tab-separated fields, got {len(fields)}")
        scores.append(_score(fields[col["score"]], f"{path}:{n}"))
        s1.append(fields[col["sentence1"]])
        s2.append(fields[col["sentence2"]])
    return s1, s2, scores


def _json_line(path: Path, n: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}:{n}: invalid JSON ({e.msg})") from None


def _jsonl_rows(path: Path, lines) -> tuple[list, list, list]:
    s1, s2, scores = [], [], []
    for n, line in lines:
        obj = _json_line(path, n, line)
        missing = [c for c in PAIR_COLUMNS if not isinstance(obj, dict) or c not in obj]
        if missing:
            raise EvalDataError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
        for c in ("sentence1", "sentence2"):
            if not isinstance(obj[c], str):
                raise EvalDataError(f"{path}:{n}: {c} must be a string, got {type(obj[c]).__name__}")
        scores.append(_score(obj["score"], f"{path}:{n}"))
        s1.append(obj["sentence1"])
        s2.append(obj["sentence2"])
    return s1, s2, scores


def _parquet_rows(path: Path) -> tuple[list, list, list]:
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise EvalDataError(f"{path}: missing column(s) {', '.join(missing)}; has {', '.join(table.column_names)}")
    cols = {c: table.column(c).to_pylist() for c in PAIR_COLUMNS}
    for c in PAIR_COLUMNS:
        if None in cols[c]:
            raise EvalDataError(f"{path}: row {cols[c].index(None)} has a null {c}")
    scores = [_score(v, f"{path}: row {i}") for i, v in enumerate(cols["score"])]
    return cols["sentence1"], cols["sentence2"], scores


def load_sts(path: str | Path, *, name: str | None = None, split: str | None = None) -> StsData:
    """Load sentence pairs with gold scores.

    Formats, chosen by suffix and first line: the raw STS Benchmark file (tab-separated, no
    header; fields 4, 5, 6 are score, sentence1, sentence2; extra trailing fields ignored;
    no CSV quoting because sentences contain quotes), a tab-separated file whose header
    names ``sentence1``, ``sentence2`` and ``score``, JSON Lines with those keys, or
    Parquet with those columns. ``name`` defaults to the folder for STS-B files
    (``stsb/sts-test.csv`` -> ``stsb``), else the file stem; ``split`` to the stem's
    ``-train``/``-dev``/``-test`` suffix, else ``test``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    stsb_layout = False
    if suffix == ".parquet":
        s1, s2, scores = _parquet_rows(path)
    else:
        lines = _read_lines(path)
        if not lines:
            raise EvalDataError(f"{path}: no data")
        if suffix in (".jsonl", ".json") or lines[0][1].lstrip().startswith("{"):
            s1, s2, scores = _jsonl_rows(path, lines)
        elif all(c in lines[0][1].split("\t") for c in PAIR_COLUMNS):
            s1, s2, scores = _header_tsv_rows(path, lines)
        elif len(lines[0][1].split("\t")) >= 7:
            s1, s2, scores = _stsb_rows(path, lines)
            stsb_layout = True
        else:
            raise EvalDataError(
                f"{path}:{lines[0][0]}: unrecognised pairs format: expected STS-B rows (7+ tab-separated "
                f"fields), a tab-separated header with {', '.join(PAIR_COLUMNS)}, JSON Lines or Parquet")
    if len(scores) < 2:
        raise EvalDataError(f"{path}: {len(scores)} pair(s); a correlation needs at least 2")
    if len(set(scores)) == 1:
        raise EvalDataError(f"{path}: every pair has the same score ({scores[0]}): a rank correlation with constant "
                            "gold scores is undefined")
    default_name = path.parent.name if stsb_layout and path.parent.name else path.stem
    return StsData(name=name or default_name, sentence1=list(s1), sentence2=list(s2),
                   scores=np.asarray(scores, dtype=np.float64), split=split or _infer_split(path.stem))


# --------------------------------------------------------------------------- BEIR


def _jsonl_objects(path: Path, required: tuple[str, ...]):
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found (BEIR layout needs corpus.jsonl, queries.jsonl, qrels/)")
    for n, line in _read_lines(path):
        obj = _json_line(path, n, line)
        if not isinstance(obj, dict) or any(k not in obj for k in required):
            raise EvalDataError(f"{path}:{n}: expected an object with {', '.join(required)}")
        yield n, obj


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    if not path.is_file():
        raise EvalDataError(f"{path}: qrels file not found")
    lines = _read_lines(path)
    if not lines or lines[0][1].split("\t")[:2] != ["query-id", "corpus-id"]:
        raise EvalDataError(f"{path}:1: expected the header 'query-id<TAB>corpus-id<TAB>score'")
    qrels: dict[str, dict[str, int]] = {}
    for n, line in lines[1:]:
        fields = line.split("\t")
        if len(fields) != 3:
            raise EvalDataError(f"{path}:{n}: expected 3 tab-separated fields, got {len(fields)}")
        try:
            rel = int(fields[2])
        except ValueError:
            raise EvalDataError(f"{path}:{n}: relevance {fields[2]!r} is not an integer") from None
        qrels.setdefault(fields[0], {})[fields[1]] = rel
    if not qrels:
        raise EvalDataError(f"{path}: no judgements")
    return qrels


def load_beir(directory: str | Path, split: str = "test", *, name: str | None = None) -> BeirData:
    """Load a BEIR-layout retrieval set; keep only the queries judged in ``split``.

    Documents are the text that gets embedded, ``(title + " " + text).strip()``, as BEIR
    and MTEB build it. Judged documents missing from the corpus stay in the qrels (they
    are unretrievable, which is what the published numbers assume too).
    """
    directory = Path(directory)
    qrels = _read_qrels(directory / "qrels" / f"{split}.tsv")
    doc_ids, doc_texts, seen = [], [], set()
    corpus = directory / "corpus.jsonl"
    for n, obj in _jsonl_objects(corpus, ("_id",)):
        doc_id = str(obj["_id"])
        if doc_id in seen:
            raise EvalDataError(f"{corpus}:{n}: duplicate _id {doc_id!r}")
        seen.add(doc_id)
        doc_ids.append(doc_id)
        doc_texts.append(f"{obj.get('title') or ''} {obj.get('text') or ''}".strip())
    query_text: dict[str, str] = {}
    for _, obj in _jsonl_objects(directory / "queries.jsonl", ("_id", "text")):
        query_text[str(obj["_id"])] = obj["text"]
    missing = [q for q in qrels if q not in query_text]
    if missing:
        raise EvalDataError(f"{directory}/qrels/{split}.tsv judges {len(missing)} query id(s) absent from "
                            f"queries.jsonl, e.g. {missing[:3]}")
    query_ids = [q for q in query_text if q in qrels]
    return BeirData(name=name or directory.name, doc_ids=doc_ids, doc_texts=doc_texts, query_ids=query_ids,
                    query_texts=[query_text[q] for q in query_ids], qrels={q: qrels[q] for q in query_ids},
                    split=split, unjudged_queries=len(query_text) - len(query_ids))

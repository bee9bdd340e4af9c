"""Labelled records of the task types: JSON Lines, CSV or Parquet, read strictly.

Every record carries ``where`` (``file:line`` for text files, ``file: row N`` for Parquet) so that an
error names the place to fix. A text that is null or blank is not an error: the task leaves its
item out and counts it (``left_out``), as STS does.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from ..evaldata import EvalDataError, _read_lines

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclass(frozen=True)
class Record:
    where: str
    fields: dict


def read_records(path: str | Path) -> list[Record]:
    """Every record of a JSON Lines, CSV/TSV (with a header) or Parquet file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except FileNotFoundError:
            raise EvalDataError(f"{path}: file not found") from None
        except Exception as e:  # noqa: BLE001 - not Parquet at all
            raise EvalDataError(f"{path}: not a readable Parquet file ({e})") from None
        return [Record(f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist())]
    lines = _read_lines(path)
    if not lines:
        raise EvalDataError(f"{path}: no data")
    if suffix in (".jsonl", ".json") or lines[0][1].lstrip().startswith("{"):
        out = []
        for n, line in lines:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise EvalDataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            out.append(Record(f"{path}:{n}", obj))
        return out
    if suffix not in (".csv", ".tsv"):
        raise EvalDataError(f"{path}: unknown format: expected .jsonl, .csv, .tsv or .parquet")
    text = "\n".join(line for _, line in lines)
    reader = csv.reader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
    try:
        rows = list(reader)
    except csv.Error as e:
        raise EvalDataError(f"{path}: not valid CSV ({e})") from None
    header, numbers = rows[0], [n for n, _ in lines]
    out = []
    for k, row in enumerate(rows[1:], 1):
        n = numbers[k] if k < len(numbers) else numbers[-1]  # a quoted field over several lines shifts these
        if len(row) != len(header):
            raise EvalDataError(f"{path}:{n}: expected {len(header)} fields like the header, got {len(row)}")
        out.append(Record(f"{path}:{n}", dict(zip(header, row))))
    return out


def require(records: list[Record], path: Path, fields: tuple[str, ...]) -> None:
    """Every record has ``fields`` (a missing one is an error naming the record)."""
    if not records:
        raise EvalDataError(f"{path}: no records")
    for r in records:
        missing = [f for f in fields if f not in r.fields]
        if missing:
            raise EvalDataError(f"{r.where}: missing field(s) {', '.join(missing)} (expected {', '.join(fields)})")


def text_of(record: Record, field: str = "text") -> str | None:
    """The record's text, or None when it is null or blank (left out and counted)."""
    value = record.fields.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise EvalDataError(f"{record.where}: {field} must be a string, got {type(value).__name__}")
    return value if value.strip() else None


def labels_of(records: list[Record], field: str = "label") -> list:
    """The records' labels: all strings or all integers (a file mixing them names its first odd line)."""
    out, kind = [], None
    for r in records:
        value = r.fields.get(field)
        if value is None:
            raise EvalDataError(f"{r.where}: {field} is null: every record needs a label")
        if isinstance(value, bool) or isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, (str, int)):
            raise EvalDataError(f"{r.where}: {field} {value!r} must be a string or an integer")
        this = "string" if isinstance(value, str) else "integer"
        if kind is None:
            kind, first = this, r.where
        elif this != kind:
            raise EvalDataError(f"{r.where}: {field} {value!r} is {'a' if this == 'string' else 'an'} {this}, but "
                                f"{first} has {'a' if kind == 'string' else 'an'} {kind}: use one kind of label")
        out.append(value)
    return out


def subset(data, keep, name: str | None = None):
    """Items ``keep`` of classification, clustering or pairs data: the same type, its per-item fields
    (arrays, and lists as long as the data) sliced, ``classes`` kept whole."""
    import dataclasses

    import numpy as np

    fields = {}
    for f in dataclasses.fields(data):
        value = getattr(data, f.name)
        if isinstance(value, np.ndarray):
            value = value[keep]
        elif isinstance(value, list) and len(value) == len(data) and f.name != "classes":
            value = [value[i] for i in keep]
        fields[f.name] = value
    if name is not None:
        fields["name"] = name
    return type(data)(**fields)


def data_name(path: Path) -> str:
    """A data file's dataset name: its stem, or its folder's name when the stem is a split's
    (``banking77/test.jsonl`` -> ``banking77``)."""
    from ..evaldata import _SPLITS

    return path.parent.name if path.stem.lower() in _SPLITS and path.parent.name else path.stem


def find_file(directory: Path, stem: str, required: bool = True) -> Path | None:
    """``directory/stem.{jsonl,json,csv,tsv,parquet}``: the one there is."""
    found = [directory / f"{stem}{s}" for s in SUFFIXES if (directory / f"{stem}{s}").is_file()]
    if len(found) > 1:
        raise EvalDataError(f"{directory}: several {stem} files ({', '.join(p.name for p in found)}): keep one")
    if not found and required:
        raise EvalDataError(f"{directory}: no {stem}.jsonl, .csv or .parquet")
    return found[0] if found else None


def first_fields(path: str | Path) -> set[str]:
    """The fields of a data file's first record (of a folder: its test file's), to tell its task."""
    path = Path(path)
    if path.is_dir():
        if (path / "qrels").is_dir() or (path / "corpus.jsonl").is_file():
            return {"_beir"}
        found = find_file(path, "test", required=False) or find_file(path, "train", required=False)
        if found is None:
            raise EvalDataError(f"{path}: no test or train file (.jsonl, .csv or .parquet) to read the task from")
        fields = first_fields(found)
        return fields | ({"_train"} if find_file(path, "train", required=False) else set())
    if path.suffix.lower() == ".parquet":
        try:
            return set(pq.read_schema(path).names)
        except FileNotFoundError:
            raise EvalDataError(f"{path}: file not found") from None
    return set(read_records(path)[0].fields) if path.suffix.lower() in SUFFIXES else set()

"""Quantised outputs: ``--dtype int8`` and ``--dtype binary``, for embeddings, indexes and evaluations.

The numbers live here (calibrate, quantise, decode, Arrow types, the ranges file); the writer
(``runner/stages.py``), the index (``index/``) and the evaluators only call these functions.
The encoder always works in floats (``float_request``); vectors are quantised on their way out.

int8 (per-dimension ranges, as sentence-transformers' ``quantize_embeddings(precision="int8")``):

- every vector is first L2-normalised (every consumer here computes cosines; ranges over raw
  norms would spend the 256 levels on the spread of norms, not of directions);
- ranges are the per-dimension ``min`` and ``max`` of a calibration sample of such unit vectors
  (an ``(2, dim)`` array, sentence-transformers' layout), ``step = (max - min) / 255`` (``ZERO_STEP``,
  1e-30, where max == min: such a dimension decodes to its one value);
- ``code = clip(floor((x - min) / step), 0, 255) - 128``: the bucket index, truncated as
  sentence-transformers does, so the codes are bit-identical to its ``int8`` codes for the same
  ranges (tested);
- decoded to the bucket's **centre**, ``min + (code + 128 + 0.5) * step``, so that a value inside
  the calibrated range comes back within half a step (sentence-transformers decodes to the
  bucket's lower edge: up to a whole step, biased low). FAISS's ``QT_8bit`` scalar quantiser
  decodes the same way (``vmin + (code + 0.5) / 255 * vdiff``), which is why the int8 index is a
  ``QT_8bit`` index given these ranges: it stores exactly these codes, 1 byte per dimension.

binary (sign bits, sentence-transformers' ``"ubinary"``): ``bit = x > 0``, packed 8 per byte by
``np.packbits`` (big-endian: dimension 0 is the high bit of byte 0); a column of
``fixed_size_list<uint8>[dim / 8]``. A dim not divisible by 8 is refused (no padding). Decoded,
a bit vector is the sign vector ``(2 * bit - 1) / sqrt(dim)``: the cosine of two sign vectors is
``1 - 2 * hamming / dim``, the score a binary index reports.

Stored columns stay plain Arrow: ``fixed_size_list<int8>[dim]`` and ``fixed_size_list<uint8>[dim/8]``.
An int8 output keeps its ranges in ``quantization/int8_ranges.parquet`` (one row per variant:
``variant``, ``column``, ``min`` and ``max`` as ``fixed_size_list<float32>[dim]``; plain Parquet),
named by each manifest variant's ``quantization`` entry; the manifest's ``calibration`` says which
rows they were calibrated on. A resumed or incremental run reuses them (new shards get the same
codes as old ones), and ``embed --int8-ranges OTHER_OUTPUT`` starts a new output with another
output's ranges, so a re-embedding job stays comparable with an index built before.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .norms import l2_normalize

QUANTIZED = ("int8", "binary")
LEVELS = 255  # int8: 256 codes, 255 steps between min and max
ZERO_STEP = 1e-30  # the step of a dimension whose calibrated min == max: every code decodes to ~min
MIN_CALIBRATION_ROWS = 2
DEFAULT_CALIBRATION_ROWS = 1000
RANGES_FILE = "quantization/int8_ranges.parquet"

INT8_SCHEME = ("x / |x|, then per dimension code = clip(floor((x - min) / step), 0, 255) - 128 with "
               "step = (max - min) / 255; decoded as min + (code + 128.5) * step")
BINARY_SCHEME = "bit = x > 0, np.packbits (big-endian: dimension 0 is the high bit of byte 0); 8 dims per byte"


class QuantizationError(ValueError):
    """A quantisation that cannot be done as asked (one line, names what is wrong)."""


def is_quantized(dtype: str | None) -> bool:
    return dtype in QUANTIZED


def check_dim(dtype: str, dim: int) -> None:
    """Refuse a binary output whose dim cannot be packed 8 dimensions per byte."""
    if dtype == "binary" and dim % 8:
        raise QuantizationError(f"--dtype binary packs 8 dimensions per byte: dim {dim} is not divisible by 8 "
                                f"(use int8, float16 or float32 for this model or variant)")


def stored_dim(dtype: str, dim: int) -> int:
    """Values per stored vector: dim, or dim / 8 bytes for binary."""
    check_dim(dtype, dim)
    return dim // 8 if dtype == "binary" else dim


def value_type(dtype: str) -> pa.DataType:
    return {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(), "binary": pa.uint8()}[dtype]


def numpy_type(dtype: str):
    return {"float32": np.float32, "float16": np.float16, "int8": np.int8, "binary": np.uint8}[dtype]


def arrow_type(dtype: str, dim: int) -> pa.DataType:
    """The stored column's type: ``fixed_size_list<float32|float16|int8>[dim]`` or ``<uint8>[dim/8]``."""
    return pa.list_(value_type(dtype), stored_dim(dtype, dim))


def bytes_per_vector(dtype: str, dim: int) -> int:
    return stored_dim(dtype, dim) * np.dtype(numpy_type(dtype)).itemsize


def float_request(request):
    """The request the encoder runs: quantised dtypes are produced from float32 vectors."""
    if not is_quantized(request.settings.dtype):
        return request
    return dataclasses.replace(request, settings=dataclasses.replace(request.settings, dtype="float32"))


# --------------------------------------------------------------------------- the numbers


def unit_rows(x) -> np.ndarray:
    """float32 rows of unit length (``norms.l2_normalize``: a zero row stays zero), checked to be (rows, dim)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise QuantizationError(f"expected a (rows, dim) array, got shape {x.shape}")
    return l2_normalize(x)


def calibrate(x) -> np.ndarray:
    """int8 ranges, shape (2, dim) float32: per-dimension min and max of the unit-length rows of ``x``."""
    u = unit_rows(x)
    if len(u) < MIN_CALIBRATION_ROWS:
        raise QuantizationError(f"int8 calibration needs at least {MIN_CALIBRATION_ROWS} vectors, got {len(u)} "
                                f"(a larger calibration sample, or the ranges of an earlier output)")
    return np.vstack([u.min(axis=0), u.max(axis=0)]).astype(np.float32)


def _check_ranges(ranges, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if ranges is None:
        raise QuantizationError("int8 needs calibrated ranges (quantize.calibrate)")
    r = np.asarray(ranges, dtype=np.float32)
    if r.shape != (2, dim):
        raise QuantizationError(f"int8 ranges have shape {r.shape}, vectors need (2, {dim})")
    starts = r[0]
    steps = (r[1] - starts) / np.float32(LEVELS)
    return starts, np.where(steps == 0, np.float32(ZERO_STEP), steps).astype(np.float32)


def quantize_int8(x, ranges) -> np.ndarray:
    """int8 codes of the unit-length rows of ``x`` (see the module doc)."""
    u = unit_rows(x)
    starts, steps = _check_ranges(ranges, u.shape[1])
    q = np.clip(np.floor((u - starts) / steps), 0, LEVELS)
    return (q - 128).astype(np.int8)


def dequantize_int8(codes, ranges) -> np.ndarray:
    """The bucket centres of int8 codes, float32."""
    codes = np.asarray(codes)
    starts, steps = _check_ranges(ranges, codes.shape[-1])
    return (starts + (codes.astype(np.float32) + np.float32(128.5)) * steps).astype(np.float32)


def binarize(x) -> np.ndarray:
    """Sign bits ``x > 0`` packed 8 per byte (uint8, big-endian bit order)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise QuantizationError(f"expected a (rows, dim) array, got shape {x.shape}")
    check_dim("binary", x.shape[1])
    return np.packbits(x > 0, axis=1)


def unpack_bits(bits) -> np.ndarray:
    """The 0/1 bits of packed vectors, (rows, 8 * bytes) uint8."""
    return np.unpackbits(np.asarray(bits, dtype=np.uint8), axis=-1)


def sign_vectors(bits) -> np.ndarray:
    """Packed bits as unit sign vectors ``(2 * bit - 1) / sqrt(dim)``, float32."""
    b = unpack_bits(bits).astype(np.float32)
    return (2 * b - 1) / np.float32(math.sqrt(b.shape[-1]))


def quantize(dtype: str, x, ranges=None) -> np.ndarray:
    """Vectors as stored for ``dtype``: float32, float16, int8 codes or packed sign bits."""
    if dtype == "int8":
        return quantize_int8(x, ranges)
    if dtype == "binary":
        return binarize(x)
    return np.asarray(x, dtype=numpy_type(dtype))


def decode(dtype: str, stored, ranges=None) -> np.ndarray:
    """Stored vectors as float32 for cosine: floats as they are, int8 dequantised, bits as sign vectors."""
    if dtype == "int8":
        return dequantize_int8(stored, ranges)
    if dtype == "binary":
        return sign_vectors(stored)
    return np.asarray(stored, dtype=np.float32)


def to_arrow(stored: np.ndarray, mask=None) -> pa.FixedSizeListArray:
    """A (rows, k) array of stored values as a ``fixed_size_list`` column (``mask``: null rows)."""
    stored = np.ascontiguousarray(stored)
    values = pa.array(stored.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, stored.shape[1],
                                             mask=None if mask is None else pa.array(mask, type=pa.bool_()))


def from_arrow(column) -> np.ndarray:
    """A ``fixed_size_list`` column (or chunked column) as a (rows, k) numpy array of its value type."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


# --------------------------------------------------------------------------- the ranges file


def manifest_entry(dtype: str, dim: int) -> dict | None:
    """A manifest variant's ``quantization`` entry (None for float outputs)."""
    if dtype == "int8":
        return {"method": "int8", "scheme": INT8_SCHEME, "ranges": RANGES_FILE}
    if dtype == "binary":
        return {"method": "binary", "scheme": BINARY_SCHEME, "bits": dim}
    return None


def ranges_table(ranges: Mapping[str, np.ndarray], columns: Mapping[str, str], calibration: dict) -> pa.Table:
    names = list(ranges)
    dim = int(np.asarray(ranges[names[0]]).shape[1])
    lo = np.stack([np.asarray(ranges[n], dtype=np.float32)[0] for n in names])
    hi = np.stack([np.asarray(ranges[n], dtype=np.float32)[1] for n in names])
    t = pa.table({"variant": names, "column": [columns.get(n) for n in names], "min": to_arrow(lo),
                  "max": to_arrow(hi)})
    return t.replace_schema_metadata({"strata.calibration": json.dumps(calibration), "strata.dim": str(dim)})


def write_ranges(out, ranges: Mapping[str, np.ndarray], columns: Mapping[str, str], calibration: dict) -> str:
    """Write an output's int8 ranges (``RANGES_FILE``, atomically); returns its path relative to the root."""
    from .parts import write_part

    out.fs.makedirs(out.path(RANGES_FILE.rsplit("/", 1)[0]), exist_ok=True)
    write_part(out.fs, out.path(RANGES_FILE), ranges_table(ranges, columns, calibration))
    return RANGES_FILE


def read_ranges(source: str) -> tuple[dict[str, np.ndarray], dict]:
    """int8 ranges {variant name: (2, dim)} and their calibration record, from an output (any fsspec URL)
    or a ranges file."""
    from .stores import filesystem

    from .storage import Output

    path = source
    if not str(source).endswith(".parquet"):
        out = Output(str(source))
        path = out.path(RANGES_FILE)
        fs = out.fs
    else:
        fs, path = filesystem(str(source))
    try:
        with fs.open(path, "rb") as f:
            t = pq.read_table(f)
    except FileNotFoundError:
        raise QuantizationError(f"{source}: no int8 ranges ({RANGES_FILE}); is it an output embedded with "
                                f"--dtype int8?") from None
    lo, hi = from_arrow(t.column("min")), from_arrow(t.column("max"))
    ranges = {n: np.vstack([lo[i], hi[i]]).astype(np.float32) for i, n in enumerate(t.column("variant").to_pylist())}
    meta = t.schema.metadata or {}
    calibration = json.loads(meta.get(b"strata.calibration", b"{}"))
    return ranges, calibration


def ranges_for(ranges: Mapping[str, np.ndarray], names, dim: int, source: str) -> dict[str, np.ndarray]:
    """The ranges of every variant in ``names``, checked (each present, of this dim)."""
    missing = [n for n in names if n not in ranges]
    if missing:
        raise QuantizationError(f"the int8 ranges of {source} lack variant(s) {', '.join(missing)} "
                                f"(they have {', '.join(ranges) or 'none'})")
    bad = [n for n in names if np.asarray(ranges[n]).shape != (2, dim)]
    if bad:
        raise QuantizationError(f"the int8 ranges of {source} for {bad[0]} have shape "
                                f"{np.asarray(ranges[bad[0]]).shape}, this model needs (2, {dim})")
    return {n: np.asarray(ranges[n], dtype=np.float32) for n in names}


@dataclass(frozen=True)
class Quantized:
    """How an evaluation scores a quantised variant: as its index would answer (``pipeline/evaluate.py``).

    Retrieval: documents quantised (int8 ranges calibrated on the first ``calibration_rows``
    documents, as ``embed`` calibrates on the first rows of its input), an in-memory flat index of
    that dtype searched with the float queries (int8) or their sign bits (binary), ``rescore`` as
    the index's. STS: both sentences quantised and decoded (ranges from the first
    ``calibration_rows`` sentences), then cosine: what comparing two stored vectors gives.
    """

    dtype: str
    rescore: int = 0
    calibration_rows: int = DEFAULT_CALIBRATION_ROWS

    def __post_init__(self):
        if self.dtype not in QUANTIZED:
            raise QuantizationError(f"quantised evaluation of dtype {self.dtype!r}: choose {' or '.join(QUANTIZED)}")
        if self.rescore < 0:
            raise QuantizationError(f"rescore multiplier must be 0 (off) or more, got {self.rescore}")
        if self.dtype == "int8" and self.calibration_rows < MIN_CALIBRATION_ROWS:
            raise QuantizationError(f"calibration rows {self.calibration_rows}: int8 calibration needs at least "
                                    f"{MIN_CALIBRATION_ROWS}")

    def label(self, task: str) -> str:
        """The results rows' ``quantization`` field: ``int8``, ``binary``, ``binary+rescore4`` (retrieval)."""
        return self.dtype + (f"+rescore{self.rescore}" if task == "retrieval" and self.rescore > 1 else "")

    def ranges(self, x) -> np.ndarray | None:
        return calibrate(np.asarray(x)[: self.calibration_rows]) if self.dtype == "int8" else None

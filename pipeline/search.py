"""``strata search``: queries -> the output's model, in-process -> a variant's index -> ranked documents.

Queries are embedded exactly as the output's documents were: the model, max length,
normalisation, templates and EOS of the manifest's ``signature`` (the weights digest is
checked), and for a derived variant (mix, fitted transform) the same recorded pieces
(``derive.vectors_for``). Results are tidy rows ``(query_id, rank, doc_id, score)``, rank from 1,
score the index's cosine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .index import IndexBuildError, load_index, local_index, wanted_variants
from .index.fresh import staleness
from .variants import Variant

log = logging.getLogger(__name__)

QUERY_ID_COLUMNS = ("query_id", "id", "_id")


def read_queries(path: str | Path, text_column: str = "text", id_column: str | None = None) -> tuple[list, list]:
    """(ids, texts) of a Parquet file; ids from ``id_column`` or the first of query_id/id/_id, else row numbers."""
    table = pq.read_table(path)
    if text_column not in table.column_names:
        raise ValueError(f"{path}: no column {text_column!r} (columns: {', '.join(table.column_names)}); "
                         f"pass --text-column")
    if id_column and id_column not in table.column_names:
        raise ValueError(f"{path}: no id column {id_column!r} (columns: {', '.join(table.column_names)})")
    id_column = id_column or next((c for c in QUERY_ID_COLUMNS if c in table.column_names), None)
    texts = table.column(text_column).to_pylist()
    if any(t is None for t in texts):
        raise ValueError(f"{path}: {sum(t is None for t in texts)} null {text_column!r} value(s)")
    ids = [str(i) for i in table.column(id_column).to_pylist()] if id_column else [str(i) for i in range(len(texts))]
    blank = [i for i, t in zip(ids, texts) if not str(t).strip()]
    if blank:
        raise ValueError(f"{path}: {len(blank)} empty or whitespace-only {text_column!r} value(s), e.g. query "
                         f"{'id ' + repr(blank[0]) if id_column else 'row ' + blank[0]}; every query needs text")
    return ids, texts


def query_request(manifest: dict, variant: Variant):
    """The request that embeds queries as the output's documents were, for this variant's sources only."""
    from .request import resolve
    from .templates import check_tokens_rule

    sig = manifest.get("signature", {})
    sources = variant.sources
    named = sig.get("templates") or {}
    templates = []
    for t in dict.fromkeys(s.template for s in sources):
        templates.append(named[t] if t.startswith("t_") and t in named else t)
    check_tokens_rule(named, (s.template for s in sources), sig.get("template_tokens"), "the output")
    request = resolve(sig.get("model") or manifest.get("model", {}).get("name"),
                      layers=",".join(str(s.layer) for s in dict.fromkeys(sources)),
                      poolings=",".join(dict.fromkeys(s.pooling for s in sources)),
                      max_length=int(sig["max_length"]), dtype="float32", normalize=bool(sig.get("normalize")),
                      templates=templates, append_eos=bool(sig.get("append_eos")),
                      digest=bool(sig.get("weights_digest")))
    want = sig.get("weights_digest")
    if want and request.model.weights_digest != want:
        raise ValueError(f"model {sig.get('model')!r} now has weights {request.model.weights_digest[:12]}…, the "
                         f"output was embedded with {want[:12]}…: queries would not match the documents")
    return dataclasses.replace(request, variants=tuple(dict.fromkeys(sources)))


def search_output(output: str | Path, variant: str, queries: str | Path, k: int = 10, out: str | Path | None = None,
                  *, text_column: str = "text", id_column: str | None = None, nprobe: int | None = None,
                  encoder=None) -> pa.Table:
    """Search a variant's index with the queries' texts; write (and return) the results table."""
    from .derive import vectors_for
    from .encoder import Encoder
    from .storage import Output, redact
    from .stores import is_local

    store = Output(str(output))
    remote = not is_local(store.fs)
    output = redact(store.url) if remote else Path(output)
    manifest = store.read_manifest()
    if not manifest:
        raise FileNotFoundError(f"{output}: no manifest.json (nothing embedded yet)")
    v = wanted_variants(manifest, [variant], str(output))[0]
    if k < 1:
        raise ValueError(f"--k must be positive, got {k}")
    with tempfile.TemporaryDirectory(prefix="strata-search-") as scratch:
        path = local_index(store, v, Path(scratch))
        if path is None:
            raise IndexBuildError(f"{v.name} has no index in {output}: run `strata index {output} --variants {v.name}`")
        index = load_index(path, nprobe=nprobe)
    why = staleness(store, manifest, v)
    if why:
        log.warning("the %s index of %s is stale: %s; its results miss what changed. Refresh it: strata index %s "
                    "--variants '%s'", v.name, output, why, output, v.name)
    ids, texts = read_queries(queries, text_column, id_column)
    encoder = encoder or Encoder.from_request(query_request(manifest, v))
    q = vectors_for(store.url if remote else output, manifest, v, encoder.encode(texts)) if texts else np.zeros((0, index.index.d), np.float32)
    scores, found = index.search(q, k) if len(q) else (np.zeros((0, 0), np.float32), [])
    rows = {"query_id": [], "rank": [], "doc_id": [], "score": []}
    for qid, srow, drow in zip(ids, scores, found):
        for r, (s, d) in enumerate(((s, d) for s, d in zip(srow, drow) if d is not None), start=1):
            rows["query_id"].append(qid)
            rows["rank"].append(r)
            rows["doc_id"].append(d)
            rows["score"].append(float(s))
    table = pa.table({"query_id": pa.array(rows["query_id"], pa.string()), "rank": pa.array(rows["rank"], pa.int32()),
                      "doc_id": pa.array(rows["doc_id"], pa.string()), "score": pa.array(rows["score"], pa.float32())})
    # which settings answered (kept in the results file): kind, search knobs, a recall measured at build
    answered = {key: index.params.get(key) for key in ("kind", "engine", "nprobe", "rerank", "efSearch", "tuned")}
    table = table.replace_schema_metadata({"strata.index": json.dumps(answered)})
    if out is not None:
        tmp = Path(f"{out}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(out)
    return table

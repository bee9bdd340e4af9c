"""``strata search``: query texts embedded as the output's documents were, searched through a variant's index."""

from __future__ import annotations

import json

from .options import add_storage_options


def register(sub) -> None:
    p = sub.add_parser("search", help="search a variant's index with query texts embedded as the output's documents",
                       description="Embed the queries in-process with the output's model and settings (and, for a "
                                   "derived variant, its recorded mix and transform), search the variant's index "
                                   "(any kind, any engine), write (query_id, rank, doc_id, score) rows.")
    p.add_argument("output", help="an output directory with an index (`strata index`)")
    p.add_argument("variant", help="e.g. L15.mean, L15.mean|whiten256")
    p.add_argument("--queries", required=True, help="Parquet file with a text column and an id column")
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default=None, help="default: query_id, id or _id, else the row number")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int, default=None, help="IVF indexes: lists to search (default: the recorded one)")
    p.add_argument("--out", required=True, help="results Parquet file")
    add_storage_options(p, "output")
    p.set_defaults(func=cmd_search)


def cmd_search(args) -> int:
    from ..index.tune import describe_tuned
    from ..search import search_output
    from ..storage import redact

    table = search_output(args.output, args.variant, args.queries, args.k, args.out, text_column=args.text_column,
                          id_column=args.id_column, nprobe=args.nprobe)
    print(f"{args.variant}: {len(set(table.column('query_id').to_pylist())):,} queries, {table.num_rows:,} results "
          f"-> {redact(args.out)}")
    tuned = describe_tuned(json.loads(table.schema.metadata[b"strata.index"]))
    if tuned:
        print(f"  index: {tuned}")
    return 0

"""``strata export``: one variant of an output or a recipe as a sentence-transformers model folder."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="write one variant as a sentence-transformers model folder",
                       description="Write VARIANT of an embed output or a probe recipe to DIR as a sentence-transformers "
                                   "model: the model truncated to the blocks it needs, the template, the pooling, "
                                   "the normalisation, the mix and the fitted transform as recorded. Needs "
                                   "sentence-transformers (pip install 'strata[serve]').")
    p.add_argument("source", help="an embed output directory (manifest.json) or a probe recipe (probe.json or its "
                                  "folder)")
    p.add_argument("variant", help="e.g. L15.mean_nosink, prompteol/L30.last, L15.mean|whiten128")
    p.add_argument("dir", help="the folder to write")
    p.add_argument("--force", action="store_true", help="replace DIR when it holds a previous export")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from ..export import export

    record = export(args.source, args.variant, args.dir, force=args.force)
    print(f"exported {record['variant']} of {record['model']} ({record['blocks_kept']} of {record['n_layers']} blocks, "
          f"{record['dim']} dims) to {args.dir}")
    print(f"serve: SentenceTransformer({str(args.dir)!r}, trust_remote_code=True).encode(texts)")
    return 0

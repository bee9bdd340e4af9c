"""``strata export``: one variant of an output or a recipe as a sentence-transformers model folder."""

from __future__ import annotations

USAGE = "strata export SOURCE VARIANT DIR | strata export RECIPE DIR --standard | strata export --check DIR"


def register(sub) -> None:
    p = sub.add_parser("export", help="write one variant as a sentence-transformers model folder", usage=USAGE,
                       description="Write VARIANT of an embed output or a probe recipe to DIR as a sentence-transformers "
                                   "model: the model truncated to the blocks it needs, the template, the pooling, "
                                   "the normalisation, the mix and the fitted transform as recorded. Standard "
                                   "sentence-transformers modules (servable by Text Embeddings Inference and vLLM) "
                                   "where the variant allows, Strata's own otherwise, saying why. Needs "
                                   "sentence-transformers (pip install 'strata[serve]').")
    p.add_argument("paths", nargs="+", metavar="SOURCE [VARIANT] DIR",
                   help="SOURCE: an embed output directory (manifest.json) or a probe recipe (probe.json or its "
                        "folder); VARIANT: e.g. L30.mean, L15.last|whiten128, prompteol/L30.last (left out with "
                        "a recipe and --standard: its best-ranked standard variant); DIR: the folder to write")
    p.add_argument("--standard", action="store_true",
                   help="refuse a variant that needs Strata's own modules instead of writing them")
    p.add_argument("--check", action="store_true",
                   help="load DIR as a serving stack would (config.json, weights, tokenizer.json, modules.json, "
                        "the pooling config) and compare with the vectors kept at export")
    p.add_argument("--force", action="store_true", help="replace DIR when it holds a previous export")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from ..export import ExportError

    if args.check:
        if len(args.paths) != 1:
            raise ExportError(f"--check takes one folder, not {len(args.paths)} paths: {USAGE}")
        return check(args.paths[0])
    if len(args.paths) == 2 and not args.standard:
        raise ExportError(f"name the variant to export (SOURCE VARIANT DIR), or give --standard to take a recipe's "
                         f"best standard one: {USAGE}")
    if len(args.paths) not in (2, 3):
        raise ExportError(f"{len(args.paths)} paths: {USAGE}")
    from ..export import export

    source, variant, dest = (args.paths[0], None, args.paths[1]) if len(args.paths) == 2 else args.paths
    record = export(source, variant, dest, force=args.force, standard_only=args.standard)
    print(f"exported {record['variant']} of {record['model']} ({record['blocks_kept']} of {record['n_layers']} blocks, "
          f"{record['dim']} dims) to {dest} with {record['modules']} modules")
    if record["modules"] == "standard":
        print(f"serve: SentenceTransformer({str(dest)!r}).encode(texts), or Text Embeddings Inference / vLLM on "
              f"the folder; `strata export --check {dest}` loads it as they do")
    else:
        near = record["nearest_standard"]
        score = f", probe score {near['probe_score']:.2f}" if near.get("probe_score") is not None else ""
        print(f"custom modules: {record['custom_because']}; serving stacks (TEI, vLLM, Infinity) cannot load it. "
              f"Nearest standard variant: {near['variant']}{score}")
        print(f"serve: SentenceTransformer({str(dest)!r}, trust_remote_code=True).encode(texts), with strata installed")
    return 0


def check(folder: str) -> int:
    from ..standard import NotServable, check_folder

    try:
        r = check_folder(folder)
    except NotServable as e:
        print(f"strata export --check: {e}")
        return 1
    verdict = "ok" if r["ok"] else "MISMATCH"
    print(f"{folder}: {verdict}: loaded as a serving stack reads it, {r['texts']} check texts, largest relative "
          f"error {r['right']:.1e} (right padding), {r['left']:.1e} (left padding); tolerance {r['tolerance']:.0e}")
    return 0 if r["ok"] else 1

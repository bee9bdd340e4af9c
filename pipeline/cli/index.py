"""``strata index``: one FAISS index per variant of an embedding output, in this process or on Ray."""

from __future__ import annotations

from .options import add_ray_address, add_storage_options


def register(sub) -> None:
    p = sub.add_parser("index", help="build one FAISS index per variant of an embedding output")
    p.add_argument("output", help="an output directory written by `strata embed`")
    p.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--kind", choices=["auto", "flat", "hnsw", "ivfpq"], default="auto")
    p.add_argument("--transforms", default="none",
                   help="first fit these on the output's rows (none, center, abtt{k}, whiten{k}); indexed as "
                        "e.g. 'L15.mean|whiten256'")
    p.add_argument("--mixes", default=None, help="first define uniform layer mixes ('a:b', 'all')")
    p.add_argument("--rescore", type=int, default=0, metavar="M",
                   help="int8/binary outputs: searches re-score M x k candidates with the float query (recorded in "
                        "the index's JSON; 0: off)")
    p.add_argument("--engine", choices=["auto", "local", "ray"], default="auto",
                   help="local: this process; ray: IVF-PQ trained on one worker, shards encoded in parallel Ray "
                        "tasks, lists merged on disk, resumable (docs/indexes.md); auto: ray above 1,000,000 rows "
                        "or with --ray-address (default: %(default)s)")
    add_ray_address(p)
    p.add_argument("--nprobe", type=int, default=None,
                   help="IVF kinds: lists searched by default (recorded; default: max(64, nlist/16), at most nlist, "
                        "measured: docs/indexes.md)")
    p.add_argument("--rerank", type=int, default=None,
                   help="ivfpq: searches re-rank rerank x k IVF-PQ candidates by their exact cosine (recorded; "
                        "both engines; default: 8, measured: docs/indexes.md)")
    p.add_argument("--target-recall", type=float, default=None, metavar="R",
                   help="ivfpq: after the build, choose the cheapest nprobe and rerank whose recall@10 on a sample "
                        "of the index's own vectors is at least R (e.g. 0.95), and record both and the measured "
                        "recall in the index's JSON")
    p.add_argument("--nlist", type=int, default=None,
                   help="IVF kinds: inverted lists (default: 4*sqrt(rows), at most rows/39); --engine ray keeps the "
                        "first build's quantiser until an option changes")
    add_storage_options(p, "output")
    p.set_defaults(func=cmd_index)


def cmd_index(args) -> int:
    from ..derive import add_to_output
    from ..index import build_indexes, index_path

    if args.mixes or args.transforms != "none":  # fitted on this output's rows, then indexed too
        add_to_output(args.output, args.mixes, args.transforms)
    variants = [v for v in (args.variants or "").split(",") if v] or None
    engine = _index_engine(args)
    if args.target_recall is not None:
        from ..storage import Output
        from ..stores import is_local

        if args.kind != "ivfpq" and engine != "ray":
            raise ValueError(f"--target-recall tunes ivfpq indexes (got --kind {args.kind}): pass --kind ivfpq")
        if not is_local(Output(args.output).fs):
            raise ValueError("--target-recall measures the index where it is built: index a local copy")
    rerank = {} if args.rerank is None else {"rerank": args.rerank}
    if engine == "ray":
        from ..index.ray import build_ivfpq_ray

        built = build_ivfpq_ray(args.output, variants, ray_address=args.ray_address, nprobe=args.nprobe,
                                nlist=args.nlist, **rerank)
    else:
        built = build_indexes(args.output, variants, args.kind, rescore=args.rescore, nlist=args.nlist,
                              nprobe=args.nprobe, **rerank)
    for v, params in built.items():
        quantized = f" {params['dtype']}" if params.get("rescore") is not None else ""
        if engine == "ray":
            quantized = (f" on-disk (engine ray: {len(params['encoded'])} shard(s) encoded, "
                         f"{len(params['reused'])} reused)")
        up = params.get("update")
        how = (f" (updated: {up['deleted']:,} deleted, {up['added']:,} added)" if up
               else f" (built: {params['rebuilt']})" if params.get("rebuilt") else "")
        print(f"{v.name}: {params['kind']}{quantized} index of {params['rows']:,} x {params['dim']} -> "
              f"indexes/{index_path('', v).name}{how}")
        if args.target_recall is not None:
            from ..index.tune import describe_tuned, tune_index

            print(f"  {describe_tuned(tune_index(index_path(args.output, v), args.target_recall))}")
    return 0


def _index_engine(args) -> str:
    """``strata index --engine``: ray builds ivfpq only; auto picks ray above index.ray.RAY_MIN_ROWS rows
    (or with --ray-address) when the kind allows it."""
    from ..index.ray import RAY_MIN_ROWS, choose_engine, output_rows
    from ..storage import Output, redact
    from ..stores import is_local

    if args.engine == "local" or (args.engine == "auto" and args.kind in ("flat", "hnsw")):
        return "local"
    if args.engine == "ray" and args.kind in ("flat", "hnsw"):
        raise ValueError(f"--engine ray builds ivfpq indexes only (got --kind {args.kind}); use --engine local")
    out = Output(args.output)
    if not is_local(out.fs):  # its inverted lists are one memory-mapped file on a local disk
        if args.engine == "ray":
            raise ValueError(f"--engine ray writes its inverted lists to a local disk (memory-mapped); "
                             f"{redact(args.output)} is on an object store: use --engine local (it reads the parts "
                             "in ranged reads and uploads the index), or index a local copy")
        return "local"
    manifest = out.read_manifest() or {}
    if args.engine == "auto" and (manifest.get("signature", {}).get("dtype") in ("int8", "binary")):
        return "local"
    rows = output_rows(args.output, manifest) if manifest.get("shards") and not args.ray_address else RAY_MIN_ROWS
    return choose_engine(args.engine, rows, args.ray_address)

"""``strata``: a thin command line over the library. Errors print one line, not a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import redact_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, TypeError)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Model and variant options shared by every command that embeds."""
    from .models import DEFAULT_MODEL

    g = p.add_argument_group("model and variants")
    g.add_argument("--model", default=DEFAULT_MODEL, help="alias, HF directory, .gguf file or hub id (default: %(default)s)")
    g.add_argument("--layers", default="-1", help="layer spec: ints, negatives, '50%%', 'a:b', 'all' (default: %(default)s)")
    g.add_argument("--poolings", default="mean", help="comma-separated poolings (default: %(default)s)")
    g.add_argument("--templates", default="plain",
                   help="prompt templates: built-in names (plain, prompteol, echo) comma-separated, or one template "
                        "string with a {text} slot (default: %(default)s)")
    g.add_argument("--append-eos", action="store_true", help="end every sequence with the EOS token")
    g.add_argument("--max-length", type=int, default=None,
                   help="tokens per text (default: the model's own: sentence_bert_config.json, else the tokenizer's "
                        "model_max_length, else 512)")
    g.add_argument("--dtype", choices=["float32", "float16", "int8", "binary"], default="float32",
                   help="output dtype; int8 (per-dimension ranges) and binary (sign bits) are quantised: README "
                        "'Quantised outputs' (default: %(default)s)")
    g.add_argument("--normalize", action="store_true", help="L2-normalise every embedding")
    g.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens per forward pass (default: 4096 on CPU, 16384 on GPU)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run (off by default)")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickle weight files (.bin/.pt); off by default")


def request_from_args(args, *, digest: bool = True):
    """The one resolution of the command line's model, variant, settings and resource options."""
    from .request import Resources, resolve

    resources = Resources(actors=getattr(args, "actors", None), gpus_per_actor=getattr(args, "gpus_per_actor", None),
                          ray_address=getattr(args, "ray_address", None))
    request = resolve(args.model, layers=args.layers, poolings=args.poolings, max_length=args.max_length,
                      dtype=args.dtype, normalize=args.normalize, batch_tokens=args.batch_tokens,
                      output_format=getattr(args, "format", "parquet"), resources=resources,
                      trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, digest=digest,
                      templates=args.templates, append_eos=args.append_eos)
    return request


def cmd_encode(args) -> int:
    from .encoder import Encoder

    from .derive import Derivations, check_fit, derive
    from .transforms import parse_transforms
    from .variants import mix_variants, parse_mixes

    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if args.dtype in ("int8", "binary"):
        raise ValueError(f"strata encode prints float vectors; --dtype {args.dtype} applies to embed, eval and run")
    request = request_from_args(args, digest=False)
    mixes = parse_mixes(args.mixes, request.model.n_layers)
    mix_variants(request.variants, mixes)
    derivations = Derivations(mixes=mixes, transforms=parse_transforms(args.transforms))
    check_fit(derivations, len(set(texts)), request.model.dim)  # fitted on these texts themselves
    enc = Encoder.from_request(request)
    res = enc.encode(texts)
    derived = derive(enc, res, derivations, fit_label="the texts given") if not derivations.empty else []
    for variant, arr in [*res.items(), *((v, m) for v, m, _, _ in derived)]:
        print(f"{variant.name:>20}  shape={arr.shape}  first row={arr[0, :4].round(4).tolist()}")
    print(json.dumps(res.stats.as_dict()))
    return 0


def cmd_embed(args) -> int:
    from .runner import embed

    from .derive import add_to_output
    from .transforms import parse_transforms
    from .variants import mix_variants, parse_mixes

    request = request_from_args(args)
    transforms = parse_transforms(args.transforms)  # bad names refused before any work
    if args.dtype in ("int8", "binary") and (args.mixes or set(transforms) != {"none"}):
        raise ValueError(f"--dtype {args.dtype}: derived variants (--mixes, --transforms) are computed from float "
                         "columns; embed with --dtype float32 or float16 to derive them")
    mixes = parse_mixes(args.mixes, request.model.n_layers)
    mix_variants(request.variants, mixes)
    labels = _mix_labels(args)
    if any(kind == "learned" for kind, _, _ in mixes) and labels is None:
        raise ValueError("a learned mix needs training labels (--mix-labels: STS pairs or a BEIR folder)")
    from .sizing import check_size, input_rows, plan_lines

    rows = input_rows(args.input)  # the size, planned before any work (docs/scale.md)
    for line in plan_lines(request, rows) if not args.quiet else ():
        print(line, file=sys.stderr)
    check_size(request, rows, args.yes, args.max_output_size)
    summary = embed(request, args.input, args.output, text_column=args.text_column, id_column=args.id_column,
                    force=args.force, progress=not args.quiet, calibration_rows=args.calibration_rows,
                    int8_ranges=args.int8_ranges)
    print(summary.line())
    print(f"{request.model.name}: {request.max_length_line()}")
    if args.mixes or set(transforms) != {"none"}:
        derived = add_to_output(args.output, args.mixes, transforms, request=request, mix_labels=labels)
        print(f"derived variants ({len(derived)}): {', '.join(list(derived)[:8])}"
              + (" …" if len(derived) > 8 else "") + "; transforms fitted on this output's rows")
    return 0


def add_ray_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources")
    g.add_argument("--actors", type=int, default=None, help="embedding actors (default: one per GPU, else CPUs-1)")
    g.add_argument("--gpus-per-actor", type=float, default=None)
    g.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS or a local one)")


def cmd_index(args) -> int:
    from .derive import add_to_output
    from .index import build_indexes, index_path

    if args.mixes or args.transforms != "none":  # fitted on this output's rows, then indexed too
        add_to_output(args.output, args.mixes, args.transforms)
    variants = [v for v in (args.variants or "").split(",") if v] or None
    engine = _index_engine(args)
    if engine == "ray":
        from .index_ray import build_ivfpq_ray

        built = build_ivfpq_ray(args.output, variants, ray_address=args.ray_address, nprobe=args.nprobe,
                                nlist=args.nlist)
    else:
        built = build_indexes(args.output, variants, args.kind, rescore=args.rescore, nlist=args.nlist,
                              nprobe=args.nprobe)
    for v, params in built.items():
        quantized = f" {params['dtype']}" if params.get("rescore") is not None else ""
        if engine == "ray":
            quantized = (f" on-disk (engine ray: {len(params['encoded'])} shard(s) encoded, "
                         f"{len(params['reused'])} reused)")
        print(f"{v.name}: {params['kind']}{quantized} index of {params['rows']:,} x {params['dim']} -> "
              f"indexes/{index_path('', v).name}")
    return 0


def cmd_search(args) -> int:
    from .search import search_output

    table = search_output(args.output, args.variant, args.queries, args.k, args.out, text_column=args.text_column,
                          id_column=args.id_column, nprobe=args.nprobe)
    print(f"{args.variant}: {len(set(table.column('query_id').to_pylist())):,} queries, {table.num_rows:,} results "
          f"-> {args.out}")
    return 0


def _index_engine(args) -> str:
    """``strata index --engine``: ray builds ivfpq only; auto picks ray above index_ray.RAY_MIN_ROWS rows
    (or with --ray-address) when the kind allows it."""
    from .index_ray import RAY_MIN_ROWS, choose_engine, output_rows
    from .storage import Output

    if args.engine == "local" or (args.engine == "auto" and args.kind in ("flat", "hnsw")):
        return "local"
    if args.engine == "ray" and args.kind in ("flat", "hnsw"):
        raise ValueError(f"--engine ray builds ivfpq indexes only (got --kind {args.kind}); use --engine local")
    manifest = Output(args.output).read_manifest() or {}
    if args.engine == "auto" and (manifest.get("signature", {}).get("dtype") in ("int8", "binary")):
        return "local"
    rows = output_rows(args.output, manifest) if manifest.get("shards") and not args.ray_address else RAY_MIN_ROWS
    return choose_engine(args.engine, rows, args.ray_address)


def _mix_labels(args):
    """The training labels of learned mixes (--mix-labels), or None."""
    from .evaldata import load_beir, load_sts

    if not getattr(args, "mix_labels", None):
        return None
    p = Path(args.mix_labels)
    return load_beir(p, split=args.mix_labels_split) if p.is_dir() else load_sts(p)


def derivations_from_args(args, data, n_layers: int, raw_variants, dim: int):
    """Mixes and transforms of ``strata eval``, checked before any forward pass."""
    from .derive import Derivations, check_fit, check_held_out
    from .evaldata import read_texts
    from .transforms import parse_transforms
    from .variants import mix_variants, parse_mixes

    mixes = parse_mixes(args.mixes, n_layers)
    mix_variants(raw_variants, mixes)  # a mix over layers that were not embedded: refused here
    labels = _mix_labels(args)
    fit_texts = tuple(read_texts(args.fit_on)) if args.fit_on else None
    d = Derivations(mixes=mixes, transforms=parse_transforms(args.transforms), mix_labels=labels,
                    fit_texts=fit_texts, fit_source=args.fit_on or "")
    check_held_out(d, data)
    if fit_texts is not None:
        n_fit = len(set(fit_texts))
    elif hasattr(data, "doc_texts"):
        n_fit = len(set(data.doc_texts))
    else:
        n_fit = len(set(data.sentence1) | set(data.sentence2))
    check_fit(d, n_fit, dim)
    return d


def cmd_eval(args) -> int:
    import time

    from .evaldata import load_sts
    from .evaluate import (choose_engine, eval_retrieval, eval_sts, load_retrieval, make_encoder, retrieval_texts,
                           sts_texts)
    from .report import best_variants

    if args.index_engine == "ray":
        _ray_index_engine(args, None)  # the argument checks, before any data is read
    if args.task == "sts":
        data = load_sts(args.data)
        n_texts = sts_texts(data)
    else:
        data = load_retrieval(args.data, split=args.split, max_queries=args.max_queries, max_docs=args.max_docs)
        n_texts = retrieval_texts(data)
    engine = choose_engine(args.engine, n_texts)
    if args.index and (args.task != "retrieval" or args.recipe):
        raise ValueError("--index scores retrieval through an index: use it with `eval retrieval`, without --recipe")
    if args.index_engine == "ray":
        engine = _ray_index_engine(args, engine)
    if args.recipe:
        return eval_recipe(args, data, engine)
    pair = None
    if args.task == "retrieval" and (args.query_template or args.doc_template):
        from .templates import parse_template

        pair = [parse_template(t or "plain") for t in (args.query_template, args.doc_template)]
        base = [args.templates] if "{text}" in args.templates else args.templates.split(",")
        args.templates = list(dict.fromkeys([*base, *(t.text if t.name.startswith("t_") else t.name for t in pair)]))
    if pair and pair[0].name != pair[1].name and args.transforms.strip() != "none":
        raise ValueError("--transforms with different query and document templates: not supported (a transform "
                         "is fitted once and applied to both sides, which have different templates here)")
    request = request_from_args(args, digest=engine == "ray")
    derivations = derivations_from_args(args, data, request.model.n_layers, request.variants, request.model.dim)
    quantized = _quantized(args)
    encoder = make_encoder(request, engine, args.output, force=args.force, progress=not args.quiet)
    t0 = time.perf_counter()
    if args.task == "sts":
        rows = eval_sts(data, args.output, encoder, derivations, quantized=quantized)
    else:
        rows = eval_retrieval(data, args.output, encoder, derivations, query_template=pair and pair[0].name,
                              doc_template=pair and pair[1].name, quantized=quantized, index=args.index,
                              index_engine=args.index_engine, index_options=_eval_index_options(args))
    if args.task == "sts":
        what = f"{len(data.scores):,} pairs"
    else:
        what = (f"{len(data.query_ids):,} queries judged in {data.split}"
                + (f" ({data.unjudged_queries:,} unjudged not evaluated)" if data.unjudged_queries else "")
                + f", {len(data.doc_ids):,} documents")
    print(f"{data.name}: {what}; {n_texts:,} unique texts, {len(request.variants)} embedded variants, "
          f"{len({(r['layer'], r['pooling'], r['template'], r['mix'], r['transform']) for r in rows})} scored, "
          f"engine {engine}, {time.perf_counter() - t0:.1f}s; {request.max_length_line()}")
    for dataset, best in best_variants(rows, request.model.n_layers).items():
        fitted = f" ({best['fitted_on']})" if best.get("fitted_on") else ""
        print(f"{dataset}: best {best['variant']} {best['metric']} = {best['score']:.2f}{fitted}")
    print(f"results: {redact_text(str(args.output))}/eval/results.json")
    return 0


def _ray_index_engine(args, engine: str | None) -> str | None:
    """``eval retrieval --index-engine ray``: the checks that need no model (one-line errors), and
    the eval engine, switched from an automatic local choice to ray (whose cache is what is indexed)."""
    from .quantize import is_quantized

    if args.task != "retrieval" or args.recipe:
        raise ValueError("--index-engine ray scores retrieval through an index: use it with `eval retrieval`, "
                         "without --recipe")
    if args.index not in ("ivfpq", "auto"):
        raise ValueError(f"--index-engine ray builds IVF-PQ indexes only: use --index ivfpq (or auto), not "
                         f"{'--index ' + args.index if args.index else 'exact search'}")
    if is_quantized(args.dtype):
        raise ValueError(f"--index-engine ray builds float IVF-PQ indexes only: not with --dtype {args.dtype}")
    if args.mixes or args.transforms.strip() != "none":
        raise ValueError("--index-engine ray indexes stored columns only: not with --mixes or --transforms")
    if args.engine == "local":
        raise ValueError("--index-engine ray indexes the document embeddings the ray engine caches in --output: "
                         "use --engine ray (or auto)")
    if engine in ("ray", None):
        return engine
    print("--index-engine ray: evaluating with --engine ray (the index is built from the embeddings it caches in "
          "--output)", file=sys.stderr)
    return "ray"


def _eval_index_options(args) -> dict:
    opts = {k: getattr(args, k) for k in ("nlist", "nprobe") if getattr(args, k, None) is not None}
    if args.index_engine == "ray" and args.ray_address:
        opts["ray_address"] = args.ray_address
    return opts


def _quantized(args):
    """``strata eval --dtype int8|binary``: score as a quantised output's index would (else None)."""
    from .quantize import Quantized, is_quantized

    if not is_quantized(args.dtype):
        if args.rescore:
            raise ValueError("--rescore re-scores a quantised index's candidates: use it with --dtype int8 or binary")
        return None
    return Quantized(args.dtype, rescore=args.rescore, calibration_rows=args.calibration_rows)


def eval_recipe(args, data, engine: str) -> int:
    """``strata eval ... --recipe probe.json [--top K]``: exactly the probe's variant(s), pieces included."""
    from .evaldata import StsData
    from .evaluate import evaluate_retrieval, evaluate_sts, make_encoder
    from .probe import Recipe, RecipeEncoder
    from .report import merge_results
    from .variants import Variant

    recipe, dropped, chosen_here = Recipe.load(args.recipe, top=args.top).held_out_from(data)
    for line in dropped + ([f"note: the recipe's variants were {chosen_here}"] if chosen_here else []):
        print(f"strata eval: {line}", file=sys.stderr)
    request = recipe.request(digest=True)
    encoder = RecipeEncoder(recipe, make_encoder(request, engine, args.output, force=args.force,
                                                 progress=not args.quiet))
    quantized = _quantized(args)
    rows = evaluate_sts(encoder, data, quantized=quantized) if isinstance(data, StsData) else \
        evaluate_retrieval(encoder, data, quantized=quantized)
    fitted = {e["variant"]: recipe.fitted_on(e) for e in recipe.entries}
    for r in rows:
        note = fitted.get(Variant.from_row(r).name)
        if note:
            r["fitted_on"] = note + f" (recipe {recipe.path})"
        if chosen_here:
            r["selected_on"] = chosen_here
    merge_results(args.output, rows)
    metric = "cosine_spearman" if isinstance(data, StsData) else "ndcg_at_10"
    for r in rows:
        if r["metric"] == metric:
            print(f"{data.name}/{data.split}: {Variant.from_row(r).name} {metric} = {r['score']:.2f}"
                  + (" (chosen on this data: optimistic)" if chosen_here else ""))
    print(f"results: {redact_text(str(args.output))}/eval/results.json")
    return 0


def cmd_probe(args) -> int:
    from .evaldata import load_beir, load_sts
    from .probe import Budget, run_probe, summary_lines
    from .transforms import parse_transforms

    labels = load_beir(args.labels, split=args.split) if Path(args.labels).is_dir() else load_sts(args.labels)
    result = run_probe(args.model, labels, args.output, budget=Budget.parse(args.budget), corpus=args.corpus,
                       text_column=args.text_column,
                       templates=[t.strip() for t in args.templates.split(",")] if "{text}" not in args.templates
                       else [args.templates], poolings=args.poolings,
                       transforms=[t for t in parse_transforms(args.transforms) if t != "none"],
                       mixes=None if args.mixes == "none" else args.mixes, max_length=args.max_length,
                       max_docs=args.max_docs, folds=args.folds, resamples=args.resamples, top=args.top,
                       seed=args.seed, say=_say(args.quiet))
    for line in summary_lines(result):
        print(line)
    out = redact_text(str(args.output))
    print(f"probe: {out}/probe.json, {out}/report.md; corpus job: {out}/job.yaml")
    return 0


def _say(quiet: bool):
    def say(text: str = "", end: str = "\n") -> None:
        if quiet and end == "\r":
            return
        print(text, end=end, file=sys.stderr, flush=True)
    return say


def cmd_export(args) -> int:
    from .export import export

    record = export(args.source, args.variant, args.dir, force=args.force)
    print(f"exported {record['variant']} of {record['model']} ({record['blocks_kept']} of {record['n_layers']} blocks, "
          f"{record['dim']} dims) to {args.dir}")
    print(f"serve: SentenceTransformer({str(args.dir)!r}, trust_remote_code=True).encode(texts)")
    return 0


def cmd_report(args) -> int:
    from .report import load_results, write_report
    from .storage import Output

    manifest = Output(args.dir).read_manifest() or {}
    n_layers = manifest.get("model", {}).get("n_layers")  # absent in outputs written before it was recorded
    written = write_report(load_results(f"{args.dir}/eval/results.json"), args.dir, n_layers=n_layers)
    print(f"report: {written['report']}")
    for png in written["heatmaps"]:
        print(f"heatmap: {png}")
    return 0


def cmd_demo(args) -> int:
    from .demo import DEMO_DATA, run_demo

    return run_demo(args.output, quick=args.quick, data=Path(args.data) if args.data else DEMO_DATA,
                    model=args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("encode", help="embed a few texts in-process and print shapes and stats")
    p.add_argument("text", nargs="*", help="texts (default: one per line on stdin)")
    p.add_argument("--transforms", default="none", help="fitted on the given texts themselves (none, center, ...)")
    p.add_argument("--mixes", default=None, help="uniform layer mixes ('a:b', 'all')")
    add_model_options(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("embed", help="embed Parquet shards through Ray Data into an output directory",
                       description="Embed every row of the Parquet shards at INPUT (any fsspec URL, directory or glob) "
                                   "into OUTPUT. Re-running resumes: committed shards are skipped, new or changed "
                                   "shards re-embedded, removed shards dropped. A change of model or settings is "
                                   "refused unless --force (which replaces the old output).")
    p.add_argument("input")
    p.add_argument("output")
    add_model_options(p)
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default=None, help="default: ids derived from shard path and row number")
    add_ray_options(p)
    p.add_argument("--format", choices=["parquet", "arrow"], default="parquet", help="embedding file format")
    p.add_argument("--calibration-rows", type=int, default=1000,
                   help="--dtype int8: calibrate the per-dimension ranges on the input's first N texts (default: "
                        "%(default)s); a resumed output keeps its ranges")
    p.add_argument("--int8-ranges", default=None,
                   help="--dtype int8: take the ranges of an earlier output (or its quantization/int8_ranges.parquet) "
                        "instead of calibrating, so the codes stay comparable with that output's index")
    p.add_argument("--transforms", default="none",
                   help="fit these on the output's own rows after embedding (none, center, abtt{k}, whiten{k}); "
                        "`strata index` then indexes e.g. 'L15.mean|whiten256'")
    p.add_argument("--mixes", default=None, help="layer mixes to define: 'a:b', 'all' (uniform, e.g. 'M8-16.mean'), "
                                                "'learned:a:b' (fitted on --mix-labels)")
    p.add_argument("--mix-labels", default=None,
                   help="training labels for learned mixes: STS pairs, or a BEIR folder (its --mix-labels-split qrels)")
    p.add_argument("--mix-labels-split", default="train", help="BEIR qrels split for learned mixes (default: train)")
    p.add_argument("--force", action="store_true", help="replace an output made with other settings")
    p.add_argument("--yes", action="store_true", help="go on when the projected output is above the limit "
                                                      "(docs/scale.md)")
    p.add_argument("--max-output-size", default=None, metavar="SIZE",
                   help="the projected output size that goes on without --yes, e.g. 5TB (default: 100GB)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_embed)

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
                        "tasks, lists merged on disk, resumable (README 'Indexes'); auto: ray above 1,000,000 rows "
                        "or with --ray-address (default: %(default)s)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS or a local one)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF kinds: lists searched by default (recorded)")
    p.add_argument("--nlist", type=int, default=None,
                   help="IVF kinds: inverted lists (default: 4*sqrt(rows), at most rows/39); --engine ray keeps the "
                        "first build's quantiser until an option changes")
    p.set_defaults(func=cmd_index)

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
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eval", help="evaluate every variant on STS (Spearman) or BEIR retrieval (nDCG@10)")
    p.add_argument("task", choices=["sts", "retrieval"])
    p.add_argument("data", help="STS: sts-*.csv or a pairs file (jsonl/tsv/parquet); retrieval: a BEIR directory")
    p.add_argument("--output", required=True, help="receives eval/results.json (and, with the ray engine, the "
                                                   "embeddings it made)")
    p.add_argument("--split", default="test", help="retrieval qrels split (default: %(default)s)")
    p.add_argument("--max-queries", type=int, default=None, help="retrieval subset (scores not comparable)")
    p.add_argument("--max-docs", type=int, default=None, help="retrieval subset (scores not comparable)")
    p.add_argument("--engine", choices=["auto", "local", "ray"], default="auto",
                   help="local: in-process, no cache; ray: the Ray pipeline, embeddings cached in --output; "
                        "auto: local up to 10,000 unique texts (default: %(default)s)")
    g = p.add_argument_group("derived variants (scored beside the raw grid)")
    g.add_argument("--transforms", default="none",
                   help="post-processing fitted on unlabelled texts: none, center, abtt{k}, whiten{k}, comma-separated "
                        "(default: %(default)s)")
    g.add_argument("--fit-on", default=None,
                   help="texts to fit transforms on (Parquet with a 'text' column, or one text per line); default: "
                        "the evaluated texts (retrieval: the corpus documents), never their labels")
    g.add_argument("--mixes", default=None,
                   help="layer mixes: 'a:b' or 'all' (uniform), 'learned:a:b' (fitted on --mix-labels)")
    g.add_argument("--mix-labels", default=None,
                   help="training labels for learned mixes: STS pairs, or a BEIR folder (its --mix-labels-split qrels)")
    g.add_argument("--mix-labels-split", default="train", help="BEIR qrels split for learned mixes (default: train)")
    g.add_argument("--query-template", default=None, help="retrieval: the queries' template (name or string)")
    g.add_argument("--doc-template", default=None, help="retrieval: the documents' template (name or string)")
    g = p.add_argument_group("quantised scoring (--dtype int8|binary: as the output's index would answer)")
    g.add_argument("--index", choices=["flat", "hnsw", "ivfpq", "auto"], default=None,
                   help="retrieval: search through this kind of index (built in memory as `strata index --kind` "
                        "would) instead of exactly; rows are grouped as 'index:KIND' (default: exact search)")
    g.add_argument("--index-engine", choices=["local", "ray"], default="local",
                   help="retrieval --index ivfpq|auto: ray indexes the documents the ray engine cached with the "
                        "distributed IVF-PQ build (`strata index --engine ray`) and searches the merged on-disk "
                        "index; rows are grouped as 'index:ivfpq@ray' (default: %(default)s, in memory)")
    g.add_argument("--nlist", type=int, default=None,
                   help="retrieval IVF kinds: inverted lists (default: 4*sqrt(documents), at most documents/39)")
    g.add_argument("--nprobe", type=int, default=None,
                   help="retrieval IVF kinds: lists searched (default: max(8, nlist/16), at most nlist)")
    g.add_argument("--rescore", type=int, default=0, metavar="M",
                   help="retrieval: re-score M x k candidates with the float query (default: off)")
    g.add_argument("--calibration-rows", type=int, default=1000,
                   help="int8 ranges from the first N documents (STS: sentences) (default: %(default)s)")
    add_model_options(p)
    add_ray_options(p)
    p.add_argument("--recipe", default=None, help="evaluate exactly the variant(s) of a probe.json (strata probe), "
                                                  "its fitted pieces included; replaces the model options")
    p.add_argument("--top", type=int, default=1, help="with --recipe: the first K variants of the recipe")
    p.add_argument("--force", action="store_true", help="replace cached embeddings made with other settings")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_eval)

    from . import probe as pr

    p = sub.add_parser("probe", help="choose the best embedding on a labelled sample, with intervals; write a recipe "
                                     "and a corpus job for it",
                       description=pr.__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="alias, HF directory or .gguf file (default: the bundled model)")
    p.add_argument("--labels", required=True, help="STS pairs (csv/tsv/jsonl/parquet) or a BEIR folder")
    p.add_argument("--split", default="test", help="BEIR qrels split to probe on (default: %(default)s)")
    p.add_argument("--corpus", default=None, help="unlabelled sample of your corpus (Parquet with a 'text' column, "
                                                  "or one text per line): transforms are fitted and label-free "
                                                  "signals computed on it")
    p.add_argument("--text-column", default="text", help="the --corpus Parquet file's text column (default: "
                                                         "%(default)s); also written into job.yaml")
    p.add_argument("--budget", default=None, help=f"labelled items to sample (default {pr.DEFAULT_ITEMS}) or a time "
                                                  "for the forward passes (5m, 90s)")
    p.add_argument("--output", required=True)
    p.add_argument("--templates", default=",".join(pr.TEMPLATES), help="default: %(default)s")
    p.add_argument("--poolings", default=pr.POOLINGS, help="default: %(default)s")
    p.add_argument("--transforms", default=",".join(pr.TRANSFORMS), help="default: %(default)s ('none' for none)")
    p.add_argument("--mixes", default=pr.MIXES, help="default: %(default)s ('none' for none)")
    p.add_argument("--max-length", type=int, default=128, help="default: %(default)s")
    p.add_argument("--max-docs", type=int, default=pr.DEFAULT_DOCS,
                   help="retrieval: corpus documents in the sample (judged ones first; default: %(default)s)")
    p.add_argument("--folds", type=int, default=pr.FOLDS, help="cross-fitting folds (default: %(default)s)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--top", type=int, default=3, help="variants in the recipe (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_probe)

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

    p = sub.add_parser("report", help="results table, best variant and layer x pooling heatmaps of an output")
    p.add_argument("dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the default model on STS-B test and a SciFact subset: report + heatmaps")
    p.add_argument("--output", default="demo-output")
    p.add_argument("--quick", action="store_true", help="fewer texts, for a smoke test")
    p.add_argument("--model", default="smollm2-135m", help="the model (default: %(default)s; gemma3-270m is the "
                                                           "second bundled decoder)")
    p.add_argument("--data", default=None,
                   help="evaluation data folder with stsb/sts-test.csv and scifact/ (default: the demo data "
                        "vendored in the package, pipeline/demo_data)")
    p.set_defaults(func=cmd_demo)

    from .bench import add_arguments as add_bench_arguments, run as cmd_bench

    p = sub.add_parser("bench", help="throughput: naive per-variant passes vs one HF pass vs Strata vs Strata on Ray",
                       description="Measures every mode in one run on the same data; writes JSON and a Markdown table "
                                   "(BENCHMARKS.md for the default run).")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    from .jobs import add_run_arguments, cmd_run

    p = sub.add_parser("run", help="run a job spec (jobs/*.yaml): embed -> index -> evaluate -> report, versioned",
                       description="Run a job spec; --dry-run prints the plan and writes nothing. Relative paths in "
                                   "the spec resolve against the current directory.")
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import errors

    level = logging.INFO if args.verbose else logging.WARNING
    log = errors.LogFile(args.command)
    if not args.verbose:  # Ray's native notices (core_worker.cc ...) go to the log file; -v shows them
        errors.route_native_stderr(log)
    errors.CliLogHandler(log, level).install(level)
    errors.install_sigterm()
    from .runner import EmbedError
    from .storage import OutputInUse

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"strata {args.command}: interrupted", file=sys.stderr)
        return 130
    except errors.Terminated:
        print(f"strata {args.command}: terminated", file=sys.stderr)
        return 143
    except Exception as e:  # noqa: BLE001 - every error is one line; the traceback goes to the log file
        cause = errors.unwrap(e)
        expected = isinstance(cause, (*EXPECTED_ERRORS, EmbedError, OutputInUse))
        full = errors.redact_text(errors.describe(cause, expected=expected))
        line = errors.bound(full)
        path = log.exception(e)
        if path is not None:
            log.write(f"error: {full}")
        if (not expected or line != " ".join(full.split())) and path is not None:
            line += f" (details: {path})"
        if args.verbose:
            import traceback

            print(errors.redact_text("".join(traceback.format_exception(type(e), e, e.__traceback__))),
                  end="", file=sys.stderr)
        print(f"strata {args.command}: error: {line}", file=sys.stderr)
        return 2

"""``strata eval TASK DATA``: every variant scored on a registered task type (``pipeline.tasks``: STS,
retrieval, classification, clustering, pairs, reranking), or exactly the variant(s) of a probe recipe
(``--recipe``)."""

from __future__ import annotations

import sys

from ..errors import redact_text
from .options import add_mix_label_options, add_model_options, add_ray_options, mix_labels, request_from_args


def register(sub) -> None:
    from ..tasks import REGISTRY

    p = sub.add_parser("eval", help="evaluate every variant on a task: STS, retrieval, classification, clustering, "
                                    "pairs, reranking")
    p.add_argument("task", choices=list(REGISTRY), help="; ".join(f"{t.name}: {t.metric}" for t in REGISTRY.values()))
    p.add_argument("data", help="; ".join(f"{t.name}: {t.data_help}" for t in REGISTRY.values()))
    p.add_argument("--output", required=True, help="receives eval/results.json (and, with the ray engine, the "
                                                   "embeddings it made)")
    p.add_argument("--split", default="test", help="retrieval: the qrels split; classification: the evaluated file "
                                                   "beside train (default: %(default)s)")
    p.add_argument("--max-queries", type=int, default=None, help="retrieval subset (scores not comparable)")
    p.add_argument("--max-docs", type=int, default=None, help="retrieval subset (scores not comparable)")
    p.add_argument("--engine", choices=["auto", "local", "ray"], default="auto",
                   help="local: in-process, no cache; ray: the Ray pipeline, embeddings cached in --output; "
                        "auto: local up to 10,000 unique texts (default: %(default)s)")
    g = p.add_argument_group("task protocols (MTEB's defaults)")
    g.add_argument("--samples-per-label", type=int, default=None, metavar="N",
                   help="classification: training texts per label in each experiment (default: 8)")
    g.add_argument("--experiments", type=int, default=None, metavar="N",
                   help="classification: seeded experiments averaged (default: 10)")
    g.add_argument("--protocol", choices=["original", "fast"], default=None,
                   help="clustering: k-means per set (original, the default) or over 10 bootstrapped subsets (fast)")
    g = p.add_argument_group("derived variants (scored beside the raw grid)")
    g.add_argument("--transforms", default="none",
                   help="post-processing fitted on unlabelled texts: none, center, abtt{k}, whiten{k}, comma-separated "
                        "(default: %(default)s)")
    g.add_argument("--fit-on", default=None,
                   help="texts to fit transforms on (Parquet with a 'text' column, or one text per line); default: "
                        "the evaluated texts (retrieval: the corpus documents), never their labels")
    g.add_argument("--mixes", default=None,
                   help="layer mixes: 'a:b' or 'all' (uniform), 'learned:a:b' (fitted on --mix-labels)")
    add_mix_label_options(g)
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
                   help="retrieval IVF kinds: lists searched (default: max(64, nlist/16), at most nlist)")
    g.add_argument("--rerank", type=int, default=None,
                   help="retrieval --index ivfpq: re-rank rerank x k candidates exactly (default: 8)")
    g.add_argument("--target-recall", type=float, default=None, metavar="R",
                   help="retrieval --index ivfpq: tune nprobe and rerank on the documents' own vectors to reach "
                        "recall@10 >= R first, as `strata index --target-recall` does, and print the measured recall")
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


def cmd_eval(args) -> int:
    import time

    from ..evaldata import load_sts
    from ..evaluate import choose_engine, eval_retrieval, eval_sts, load_retrieval, make_encoder, texts_of
    from ..report import best_variants
    from ..tasks import check, get

    task = get(args.task)
    check(args.task, args.data)
    check_task_options(args)
    if not task.own_evaluator:
        return eval_task(args, task)
    if args.index_engine == "ray":
        _ray_index_engine(args, None)  # the argument checks, before any data is read
    if args.task == "sts":
        data = load_sts(args.data)
    else:
        data = load_retrieval(args.data, split=args.split, max_queries=args.max_queries, max_docs=args.max_docs)
    n_texts = len(texts_of(data))
    engine = choose_engine(args.engine, n_texts)
    if args.index and (args.task != "retrieval" or args.recipe):
        raise ValueError("--index scores retrieval through an index: use it with `eval retrieval`, without --recipe")
    if args.index_engine == "ray":
        engine = _ray_index_engine(args, engine)
    if args.recipe:
        return eval_recipe(args, data, engine)
    pair = None
    if args.task == "retrieval" and (args.query_template or args.doc_template):
        from ..templates import parse_template

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


# options that belong to some task types only (their defaults mean "not given")
TASK_OPTIONS = {
    "max_queries": ("retrieval",), "max_docs": ("retrieval",), "query_template": ("retrieval",),
    "doc_template": ("retrieval",), "index": ("retrieval",), "nlist": ("retrieval",), "nprobe": ("retrieval",),
    "rerank": ("retrieval",), "target_recall": ("retrieval",), "samples_per_label": ("classification",),
    "experiments": ("classification",), "protocol": ("clustering",),
}


def check_task_options(args) -> None:
    """A task option given to another task type: one line naming the option and its task."""
    for name, tasks in TASK_OPTIONS.items():
        if getattr(args, name, None) not in (None, False) and args.task not in tasks:
            raise ValueError(f"--{name.replace('_', '-')} applies to {' and '.join(tasks)}, not {args.task}")
    if args.index_engine != "local" and args.task != "retrieval":
        raise ValueError(f"--index-engine applies to retrieval, not {args.task}")
    if args.rescore and args.task != "retrieval":
        raise ValueError(f"--rescore applies to retrieval, not {args.task}")
    if args.split != "test":
        from ..tasks import refuse_split

        refuse_split(args.task)


def eval_task(args, task) -> int:
    """``strata eval`` for a task type scored by its ``Prepared`` data (classification, clustering, pairs,
    reranking): the data loaded and checked, the engine chosen, every variant scored, the rows merged."""
    import time

    from ..evaluate import choose_engine, evaluate_prepared, make_encoder
    from ..report import best_variants, merge_results

    from ..tasks import prepare

    options = {k: v for k, v in (("samples_per_label", args.samples_per_label), ("experiments", args.experiments),
                                 ("protocol", args.protocol)) if v is not None}
    prepared = prepare(task.name, args.data, args.split, **options)
    data = prepared.data
    engine = choose_engine(args.engine, len(prepared.texts))
    if args.recipe:
        return eval_recipe(args, data, engine, task=task, prepared=prepared)
    request = request_from_args(args, digest=engine == "ray")
    _note_normalize(request, task)
    fit_rows = prepared.fit_rows
    derivations = derivations_from_args(args, data, request.model.n_layers, request.variants, request.model.dim,
                                        n_fit=len(prepared.texts) if fit_rows is None else len(fit_rows))
    encoder = make_encoder(request, engine, args.output, force=args.force, progress=not args.quiet)
    t0 = time.perf_counter()
    rows = evaluate_prepared(task.name, encoder, prepared, derivations, save_dir=args.output,
                             quantized=_quantized(args))
    merge_results(args.output, rows)
    n_scored = len({(r["layer"], r["pooling"], r["template"], r["mix"], r["transform"]) for r in rows})
    print(f"{data.name}/{data.split}: {prepared.describe()}; {len(prepared.texts):,} unique texts, "
          f"{len(request.variants)} embedded variants, {n_scored} scored, engine {engine}, "
          f"{time.perf_counter() - t0:.1f}s; {request.max_length_line()}")
    if data.left_out:
        print(f"{data.name}: {data.left_out}")
    for label, best in best_variants(rows, request.model.n_layers).items():
        fitted = f" ({best['fitted_on']})" if best.get("fitted_on") else ""
        print(f"{label}: best {best['variant']} {best['metric']} = {best['score']:.2f}{fitted}")
    print(f"results: {redact_text(str(args.output))}/eval/results.json")
    return 0


def _note_normalize(request, task) -> None:
    """Scores that are not cosines (a classifier, k-means, distances) change with the vectors' norms: say
    so when the model's own pipeline normalises and the request does not."""
    from ..models import pipeline_normalizes

    if not request.settings.normalize and pipeline_normalizes(request.model.path):
        print(f"strata eval: note: {request.model.name}'s sentence-transformers pipeline normalises its vectors "
              f"(modules.json), and published {task.name} scores use them so; add --normalize to compare",
              file=sys.stderr)


def derivations_from_args(args, data, n_layers: int, raw_variants, dim: int, *, n_fit: int | None = None):
    """Mixes and transforms of ``strata eval``, checked before any forward pass."""
    from ..derive import Derivations, check_fit, check_held_out
    from ..evaldata import read_texts
    from ..transforms import parse_transforms
    from ..variants import mix_variants, parse_mixes

    mixes = parse_mixes(args.mixes, n_layers)
    mix_variants(raw_variants, mixes)  # a mix over layers that were not embedded: refused here
    labels = mix_labels(args)
    fit_texts = tuple(read_texts(args.fit_on)) if args.fit_on else None
    d = Derivations(mixes=mixes, transforms=parse_transforms(args.transforms), mix_labels=labels,
                    fit_texts=fit_texts, fit_source=args.fit_on or "")
    check_held_out(d, data)
    if fit_texts is not None:
        n_fit = len(set(fit_texts))
    elif n_fit is not None:
        pass
    elif hasattr(data, "doc_texts"):
        n_fit = len(set(data.doc_texts))
    else:
        n_fit = len(set(data.sentence1) | set(data.sentence2))
    check_fit(d, n_fit, dim)
    return d


def _ray_index_engine(args, engine: str | None) -> str | None:
    """``eval retrieval --index-engine ray``: the checks that need no model (one-line errors; what the
    ray build can index is ``evaluate.check_ray_index``'s), and the eval engine, switched from an
    automatic local choice to ray (whose cache is what is indexed)."""
    from ..evaluate import check_ray_index

    if args.task != "retrieval" or args.recipe:
        raise ValueError("--index-engine ray scores retrieval through an index: use it with `eval retrieval`, "
                         "without --recipe")
    check_ray_index(args.index, args.engine, args.dtype, bool(args.mixes) or args.transforms.strip() != "none")
    if engine in ("ray", None):
        return engine
    print("--index-engine ray: evaluating with --engine ray (the index is built from the embeddings it caches in "
          "--output)", file=sys.stderr)
    return "ray"


def _eval_index_options(args) -> dict:
    opts = {k: getattr(args, k) for k in ("nlist", "nprobe", "rerank", "target_recall")
            if getattr(args, k, None) is not None}
    if args.index_engine == "ray" and args.ray_address:
        opts["ray_address"] = args.ray_address
    return opts


def _quantized(args):
    """``strata eval --dtype int8|binary``: score as a quantised output's index would (else None)."""
    from ..quantize import Quantized, is_quantized

    if not is_quantized(args.dtype):
        if args.rescore:
            raise ValueError("--rescore re-scores a quantised index's candidates: use it with --dtype int8 or binary")
        return None
    return Quantized(args.dtype, rescore=args.rescore, calibration_rows=args.calibration_rows)


def eval_recipe(args, data, engine: str, *, task=None, prepared=None) -> int:
    """``strata eval ... --recipe probe.json [--top K]``: exactly the probe's variant(s), pieces included."""
    from ..evaldata import StsData
    from ..evaluate import evaluate_retrieval, evaluate_sts, make_encoder
    from ..recipe import Recipe, RecipeEncoder
    from ..report import merge_results
    from ..variants import Variant

    recipe, dropped, chosen_here = Recipe.load(args.recipe, top=args.top).held_out_from(data)
    for line in dropped + ([f"note: the recipe's variants were {chosen_here}"] if chosen_here else []):
        print(f"strata eval: {line}", file=sys.stderr)
    request = recipe.request(digest=True)
    encoder = RecipeEncoder(recipe, make_encoder(request, engine, args.output, force=args.force,
                                                 progress=not args.quiet))
    quantized = _quantized(args)
    if prepared is not None:
        from ..evaluate import evaluate_prepared

        rows = evaluate_prepared(task.name, encoder, prepared, quantized=quantized)
    elif isinstance(data, StsData):
        rows = evaluate_sts(encoder, data, quantized=quantized)
    else:
        rows = evaluate_retrieval(encoder, data, quantized=quantized)
    fitted = {e["variant"]: recipe.fitted_on(e) for e in recipe.entries}
    for r in rows:
        note = fitted.get(Variant.from_row(r).name)
        if note:
            r["fitted_on"] = note + f" (recipe {recipe.path})"
        if chosen_here:
            r["selected_on"] = chosen_here
    merge_results(args.output, rows)
    from ..tasks import MAIN_METRIC

    metric = MAIN_METRIC[task.name if task is not None else "sts" if isinstance(data, StsData) else "retrieval"]
    for r in rows:
        if r["metric"] == metric:
            print(f"{data.name}/{data.split}: {Variant.from_row(r).name} {metric} = {r['score']:.2f}"
                  + (" (chosen on this data: optimistic)" if chosen_here else ""))
    print(f"results: {redact_text(str(args.output))}/eval/results.json")
    return 0

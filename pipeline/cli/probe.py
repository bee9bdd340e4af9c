"""``strata probe``: the best embedding chosen on a labelled sample, with intervals; a recipe and a corpus job."""

from __future__ import annotations

from ..errors import redact_text
from .options import say


def register(sub) -> None:
    from .. import probe as pr

    p = sub.add_parser("probe", help="choose the best embedding on a labelled sample, with intervals; write a recipe "
                                     "and a corpus job for it",
                       description=pr.__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="alias, HF directory or .gguf file (default: the bundled model)")
    p.add_argument("--labels", required=True, help="STS pairs (csv/tsv/jsonl/parquet), a BEIR folder, a classification "
                                                   "folder, a clustering or pairs file")
    from ..tasks import REGISTRY

    p.add_argument("--task", default=None, choices=list(REGISTRY),
                   help="the task of --labels (default: told from its fields where that is unambiguous)")
    p.add_argument("--split", default=None, help="retrieval: the qrels split (default: test); classification: the "
                                                 "file of the folder probed on (default: train)")
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


def load_labels(path: str, task: str | None, split: str | None):
    """The probe's labels: the task named, or told from the data (``tasks.infer``), checked against it."""
    from ..tasks import check, get, infer, probe_tasks, refuse_split

    if task is None:
        task = infer(path)
    else:
        check(task, path)
    if task not in probe_tasks():
        raise ValueError(f"{path}: {task} data; the probe chooses for {', '.join(probe_tasks())} (evaluate {task} "
                         f"with `strata eval {task}`)")
    if split is not None:
        refuse_split(task)
    return get(task).impl.load_labels(path, split)


def cmd_probe(args) -> int:
    from ..probe import Budget, run_probe, summary_lines
    from ..transforms import parse_transforms

    labels = load_labels(args.labels, args.task, args.split)
    result = run_probe(args.model, labels, args.output, budget=Budget.parse(args.budget), corpus=args.corpus,
                       text_column=args.text_column,
                       templates=[t.strip() for t in args.templates.split(",")] if "{text}" not in args.templates
                       else [args.templates], poolings=args.poolings,
                       transforms=[t for t in parse_transforms(args.transforms) if t != "none"],
                       mixes=None if args.mixes == "none" else args.mixes, max_length=args.max_length,
                       max_docs=args.max_docs, folds=args.folds, resamples=args.resamples, top=args.top,
                       seed=args.seed, say=say(args.quiet), progress=not args.quiet)
    for line in summary_lines(result):
        print(line)
    out = redact_text(str(args.output))
    print(f"probe: {out}/probe.json, {out}/report.md; corpus job: {out}/job.yaml")
    return 0

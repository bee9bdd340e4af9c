"""``strata embed``: Parquet shards through Ray Data into an output directory."""

from __future__ import annotations

import sys

from .options import (add_mix_label_options, add_model_options, add_ray_options, add_storage_options, mix_labels,
                      request_from_args)


def register(sub) -> None:
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
    add_mix_label_options(p)
    add_storage_options(p, "input", "output")
    p.add_argument("--break-lock", action="store_true",
                   help="take over OUTPUT's lock now (its holder is known to be dead, e.g. a crashed pod); without it "
                        "a lock not renewed for 5 min is taken over by the next run")
    p.add_argument("--force", action="store_true", help="replace an output made with other settings")
    p.add_argument("--replace-input", action="store_true",
                   help="embed a different INPUT into an output that holds another input's shards (they are dropped)")
    p.add_argument("--yes", action="store_true", help="go on when the projected output is above the limit "
                                                      "(docs/scale.md)")
    p.add_argument("--max-output-size", default=None, metavar="SIZE",
                   help="the projected output size that goes on without --yes, e.g. 5TB (default: 100GB)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_embed)


def cmd_embed(args) -> int:
    from ..derive import add_to_output, check_float_output
    from ..runner import embed
    from ..sizing import check_size, input_rows, plan_lines
    from ..transforms import parse_transforms
    from ..variants import mix_variants, parse_mixes

    request = request_from_args(args)
    transforms = parse_transforms(args.transforms)  # bad names refused before any work
    derived_asked = bool(args.mixes) or set(transforms) != {"none"}
    if derived_asked:
        check_float_output(args.dtype)  # int8/binary: refused before any work, not after embedding
    mixes = parse_mixes(args.mixes, request.model.n_layers)
    mix_variants(request.variants, mixes)
    labels = mix_labels(args)
    if any(kind == "learned" for kind, _, _ in mixes) and labels is None:
        raise ValueError("a learned mix needs training labels (--mix-labels: STS pairs or a BEIR folder)")
    rows = input_rows(args.input)  # the size, planned before any work (docs/scale.md)
    for line in plan_lines(request, rows) if not args.quiet else ():
        print(line, file=sys.stderr)
    check_size(request, rows, args.yes, args.max_output_size)
    summary = embed(request, args.input, args.output, text_column=args.text_column, id_column=args.id_column,
                    force=args.force, progress=not args.quiet, calibration_rows=args.calibration_rows,
                    int8_ranges=args.int8_ranges, break_lock=args.break_lock,
                    replace_input=args.replace_input)
    print(summary.line())
    print(f"{request.model.name}: {request.max_length_line()}")
    if derived_asked:
        derived = add_to_output(args.output, args.mixes, transforms, request=request, mix_labels=labels)
        print(f"derived variants ({len(derived)}): {', '.join(list(derived)[:8])}"
              + (" …" if len(derived) > 8 else "") + "; transforms fitted on this output's rows")
    return 0

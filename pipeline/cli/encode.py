"""``strata encode``: a few texts embedded in-process, shapes and stats printed."""

from __future__ import annotations

import json
import sys

from .options import add_model_options, request_from_args


def register(sub) -> None:
    p = sub.add_parser("encode", help="embed a few texts in-process and print shapes and stats")
    p.add_argument("text", nargs="*", help="texts (default: one per line on stdin)")
    p.add_argument("--transforms", default="none", help="fitted on the given texts themselves (none, center, ...)")
    p.add_argument("--mixes", default=None, help="uniform layer mixes ('a:b', 'all')")
    add_model_options(p)
    p.set_defaults(func=cmd_encode)


def cmd_encode(args) -> int:
    from ..derive import Derivations, check_fit, derive
    from ..encoder import Encoder
    from ..transforms import parse_transforms
    from ..variants import mix_variants, parse_mixes

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

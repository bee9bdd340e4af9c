"""Options shared by several verbs: the model and variant flags, the Ray resource flags, the one
resolution of them into a ``Request``, learned-mix training labels, the progress printer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Model and variant options shared by every command that embeds."""
    from ..models import DEFAULT_MODEL

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
                   help="output dtype; int8 (per-dimension ranges) and binary (sign bits) are quantised: "
                        "docs/indexes.md, 'Quantised outputs' (default: %(default)s)")
    g.add_argument("--normalize", action="store_true", help="L2-normalise every embedding")
    g.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens per forward pass (default: 4096 on CPU, 16384 on GPU)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run (off by default)")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickle weight files (.bin/.pt); off by default")


def add_ray_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources")
    g.add_argument("--actors", type=int, default=None, help="embedding actors (default: one per GPU, else CPUs-1)")
    g.add_argument("--gpus-per-actor", type=float, default=None)
    add_ray_address(g)


def add_ray_address(p) -> None:
    """``--ray-address`` (a parser or an argument group)."""
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS or a local one)")


def add_mix_label_options(p) -> None:
    """``--mix-labels`` and ``--mix-labels-split``: training labels of learned mixes (``mix_labels``)."""
    p.add_argument("--mix-labels", default=None,
                   help="training labels for learned mixes: STS pairs, or a BEIR folder (its --mix-labels-split qrels)")
    p.add_argument("--mix-labels-split", default="train", help="BEIR qrels split for learned mixes (default: train)")


def request_from_args(args, *, digest: bool = True):
    """The one resolution of the command line's model, variant, settings and resource options."""
    from ..request import Resources, resolve

    resources = Resources(actors=getattr(args, "actors", None), gpus_per_actor=getattr(args, "gpus_per_actor", None),
                          ray_address=getattr(args, "ray_address", None))
    request = resolve(args.model, layers=args.layers, poolings=args.poolings, max_length=args.max_length,
                      dtype=args.dtype, normalize=args.normalize, batch_tokens=args.batch_tokens,
                      output_format=getattr(args, "format", "parquet"), resources=resources,
                      trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, digest=digest,
                      templates=args.templates, append_eos=args.append_eos)
    return request


def mix_labels(args):
    """The training labels of learned mixes (--mix-labels), or None."""
    from ..evaldata import load_beir, load_sts

    if not getattr(args, "mix_labels", None):
        return None
    p = Path(args.mix_labels)
    return load_beir(p, split=args.mix_labels_split) if p.is_dir() else load_sts(p)


def say(quiet: bool):
    """A progress printer on stderr; ``quiet`` drops the lines that rewrite themselves (``end="\\r"``)."""
    def say(text: str = "", end: str = "\n") -> None:
        if quiet and end == "\r":
            return
        print(text, end=end, file=sys.stderr, flush=True)
    return say


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at character {e.pos}); give a JSON object, e.g. "
                                         "'{\"endpoint_url\": \"http://host:9000\"}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object of fsspec storage options is needed, got {type(value).__name__}")
    return value


def add_storage_options(p, *locations: str) -> None:
    """``--{location}-options JSON`` for each positional URL argument named ``location``: fsspec storage
    options for that URL (``endpoint_url``, ``key``/``secret``, ``anon``, ``requester_pays``, ``profile``,
    ``client_kwargs`` ...). Registered by ``use_storage_options`` before the command runs."""
    for loc in locations:
        p.add_argument(f"--{loc}-options", type=_json_object, default=None, metavar="JSON",
                       help=f"fsspec storage options for {loc.upper()}, a JSON object (e.g. endpoint_url, profile, "
                            "anon, requester_pays); secret values are never echoed")


def use_storage_options(args) -> None:
    """Register every ``--{location}-options`` given for its URL (see ``add_storage_options``)."""
    from ..stores import set_storage_options

    for name, value in vars(args).items():
        if name.endswith("_options") and isinstance(value, dict):
            url = getattr(args, name[: -len("_options")], None)
            if url:
                set_storage_options(str(url), value)

"""URLs to filesystems: fsspec storage options per URL prefix, the one opener, and the two
questions asked of any store (does this path exist; is it a local disk).

``--input-options``/``--output-options`` and a job's ``storage`` register options per URL prefix;
``filesystem(url)`` opens every URL with the options of its longest registered prefix, so two
stores in one run (input on one endpoint, output on another) each get their own. Ray tasks receive
``storage_options()`` as an argument and register them again (``use_storage_options``).
"""

from __future__ import annotations

import fsspec

from .errors import add_secrets
from .errors import redact_text as redact

_STORAGE_OPTIONS: dict[str, dict] = {}


def set_storage_options(url: str, options: dict | None) -> None:
    """Use ``options`` (fsspec keyword arguments: ``endpoint_url``, ``key``, ``secret``, ``anon``,
    ``requester_pays``, ``profile``, ``client_kwargs`` ...) for every URL under ``url``. Their secret
    values are hidden from every message and log line from now on."""
    if not options:
        return
    if not isinstance(options, dict):
        raise ValueError(f"storage options for {redact(url)} must be a mapping of fsspec options, "
                         f"got {type(options).__name__}")
    add_secrets(options)
    _STORAGE_OPTIONS[url.rstrip("/")] = dict(options)


def storage_options() -> dict[str, dict]:
    """Every registered prefix and its options: what a Ray task needs to reach the same stores."""
    return dict(_STORAGE_OPTIONS)


def use_storage_options(registered: dict[str, dict]) -> None:
    """In a Ray worker: the driver's ``storage_options()``."""
    for url, options in registered.items():
        set_storage_options(url, options)


def options_for(url: str) -> dict:
    """The storage options of the longest registered prefix of ``url`` (none: {})."""
    url = str(url)
    best = max((p for p in _STORAGE_OPTIONS if url == p or url.startswith(p + "/")), key=len, default=None)
    return dict(_STORAGE_OPTIONS[best]) if best is not None else {}


def filesystem(url: str):
    """``(fs, path)`` for any fsspec URL, with the storage options registered for it. The one place
    Strata opens a filesystem from a URL."""
    try:
        return fsspec.core.url_to_fs(str(url), **options_for(url))
    except ImportError as e:  # "Install s3fs to access S3": the URL it was for, not a guess from the frames
        from .errors import redact_text

        raise ImportError(str(e), path=redact_text(str(url))) from None


def exists(fs, path: str) -> bool:
    """Whether ``path`` exists, where only "not found" means no. fsspec's own ``exists`` answers
    False on any exception, Ctrl-C and a denied or failed request included (a commit then took a
    stop for staged parts gone missing)."""
    try:
        fs.info(path)
    except FileNotFoundError:
        return False
    return True


def open_ranged(fs, path: str):
    """Open a file for Parquet's footer and column reads: on an object store every read is one ranged
    request for exactly its bytes. (fsspec's default read-ahead block is tens of MB, so reading a
    footer or one column fetched whole files: checking an unchanged input re-read all of it.)"""
    if is_local(fs):
        return fs.open(path, "rb")
    return fs.open(path, "rb", cache_type="none")


def is_local(fs) -> bool:
    """A local disk (rename is atomic, folders exist), as against an object store (a PUT of one
    object is atomic; there are no folders and no rename, only copy and delete)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def is_glob(fs, path: str) -> bool:
    """Whether an input path is a pattern: it has ``*``, ``?`` or ``[`` and does not exist as given
    (a folder named ``br[v2]`` is a folder). The one rule for listing shards and for the overlap check."""
    return any(c in path for c in "*?[") and not exists(fs, path)


class MissingBucket(FileNotFoundError):
    """An object-store location whose bucket does not exist (``check_bucket``)."""


def check_bucket(fs, path: str, url: str) -> None:
    """Refuse an object-store location whose bucket does not exist: Strata never creates buckets
    (fsspec's ``makedirs`` on a missing bucket creates it, so a typo made a new bucket)."""
    if is_local(fs):
        return
    from .errors import redact_text

    bucket = path.strip("/").split("/", 1)[0]
    try:
        found = not bucket or exists(fs, bucket)
    except Exception as e:  # noqa: BLE001 - an endpoint that refuses, a denied request: named, as an OSError
        raise OSError(f"cannot reach bucket {bucket!r} of {redact_text(url)}: {type(e).__name__}: {e}") from e
    if not found:
        raise MissingBucket(f"bucket {bucket!r} of {redact_text(url)} does not exist: Strata never creates "
                                f"buckets; create it, or correct the name")

"""What reaches the user when a command fails: one bounded, redacted line; the rest in a log file.

- ``redact_text``: credentials out of any free text (``scheme://user:secret@``, ``user:secret@host``
  without a scheme, a secret holding "/" or "@", secret-looking query parameters).
- ``bound``: one line of at most ``MAX_MESSAGE`` characters, saying how long the full text was.
- ``describe``: the cause of an exception as one line: Ray's wrapped task errors unwrapped to their
  cause, storage libraries' errors (missing credentials, missing s3fs) turned into the fix.
- ``LogFile``: ``$STRATA_LOG_DIR`` (default ``~/.cache/strata/logs``)/strata-<time>-<pid>.log, made
  on first use; every line written to it is redacted.
"""

from __future__ import annotations

from contextlib import contextmanager

import os
import re
import time
import traceback
from pathlib import Path

MAX_MESSAGE = 500
MAX_LOG_ENTRY = 1 << 20

# ``scheme://user@`` (a user name alone, or any userinfo left): up to the authority's last "@", never past
# its end ("/", "?", "#")
_SCHEME_USERINFO = re.compile(r"((?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#'\"<>]+@")
# ``user:secret@`` with or without a scheme is found by ``_hide_userinfo`` in one pass over each run of
# text without spaces or quotes: a regex for it backtracked (seconds on a 60,000-character line).
_RUN = re.compile(r"[^\s'\"<>]+")
_USER_STOP = frozenset("/@:()[]{};=,|")
_AWS_KEY = re.compile(r"A[KS]IA[A-Z0-9]{12,}")
_PORT = re.compile(r"\d{1,5}(?:[/?#]|$)")
_CLOCK = re.compile(r"\d\d(?![0-9A-Za-z])")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]{2,64}(?:%[\w.~-]{1,32})?\]")
_SECRET_SPAN = 2048
_AUTH_END = re.compile(r"[/?#,;|]")
# a secret-looking query parameter's value (names bounded, the keyword found by a lookahead: the
# regex used before backtracked on a line of "?" or of many keywords without "=")
_SECRET_QUERY = re.compile(
    r"([?&](?=[^=&?\s'\"#]{0,256}?(?:token|secret|key|signature|sig|password|credential|auth))[^=&?\s'\"#]{0,256}=)"
    r"[^&\s'\"#]+", re.I)


def _hide_userinfo(run: str) -> str:
    """``run`` (text without spaces or quotes) with each ``user:secret@`` replaced by ``***@``.

    From the ":" after a user name (or right after "://") up to the last "@" before the authority
    ends (at "/", "?", "#" or a list's ",", ";" or "|" after the secret's first "@"): a secret may hold
    "@", "?" or "#", and "/" (AWS secret keys often do) though a "/" seems to end the authority. Where
    a "/" comes before the first "@", the ":" must not be a scheme's "://", a port, ":/" (a drive
    letter or a ``name:/path``) or a clock time (``12:30``), unless it follows an access key (or, for
    ":/" and clock times, a scheme's "://"). A ":" inside an IPv6 literal ``[...]`` is never a user's.
    Linear in the length of ``run``."""
    out, base = [], 0  # run[:base] is done (in ``out``)
    start = scanned = i = 0  # start: where the user name before the ":" at i would begin
    ipv6 = False  # the ":" is inside "[...]" that holds an IPv6 literal
    while (i := run.find(":", i)) >= 0:
        for k in range(scanned, i):
            ch = run[k]
            if ch in _USER_STOP:
                start = k + 1
                if ch == "[":
                    ipv6 = bool(_IPV6.match(run, k))
                elif ch == "]":
                    ipv6 = False
        scanned = i + 1
        user, after_scheme = run[start:i], run[max(base, start - 3):start] == "://"
        window = min(len(run), i + _SECRET_SPAN)
        first_at = run.find("@", i, window)
        at = -1
        if first_at > i and (user or after_scheme) and not ipv6:
            slash = run.find("/", i, first_at)
            nxt = run[i + 1:i + 3]
            if _AWS_KEY.fullmatch(user):
                ok = True
            elif slash < 0:  # no "/" in the secret
                ok = not (len(user) == 1 and user.isalpha() and nxt[:1] == "\\")
            else:
                ok = not (nxt == "//" or _PORT.match(run, i + 1) or (
                    not after_scheme and (nxt[:1] == "/" or (len(user) <= 2 and user.isdigit()
                                                             and _CLOCK.match(run, i + 1)))))
            if ok:
                m = _AUTH_END.search(run, first_at, window)
                at = run.rfind("@", first_at, m.start() if m else window)
        if at < 0:
            i = start = i + 1
            continue
        out += [run[base:start], "***@"]
        base = start = scanned = i = at + 1
    return "".join(out) + run[base:]


def _hide_userinfo_in(run: re.Match) -> str:
    text = run.group(0)
    return _hide_userinfo(text) if "@" in text and ":" in text else text


# Secret values the user gave as storage options (``--output-options``, a job's ``storage_options``):
# hidden wherever they appear, whatever the text around them.
_SECRETS: set[str] = set()
_SECRET_NAME = re.compile(r"secret|key|token|password|passwd|credential|session|signature|auth", re.I)


def add_secrets(options) -> None:
    """Remember every secret-looking value of a storage-options mapping (a key named like a secret,
    at any depth: ``secret``, ``client_kwargs.aws_secret_access_key``, ``token`` ...) so that
    ``redact_text`` hides it."""
    if isinstance(options, dict):
        for k, v in options.items():
            if isinstance(v, (dict, list)):
                add_secrets(v)
            elif isinstance(v, str) and len(v) >= 4 and _SECRET_NAME.search(str(k)):
                _SECRETS.add(v)
    elif isinstance(options, list):
        for v in options:
            add_secrets(v)


def hide_secrets(options):
    """A copy of a storage-options mapping with its secret-looking values replaced by ``***`` (for
    files Strata writes, e.g. a job's ``job.json``)."""
    if isinstance(options, dict):
        return {k: ("***" if isinstance(v, str) and _SECRET_NAME.search(str(k)) else hide_secrets(v))
                for k, v in options.items()}
    if isinstance(options, list):
        return [hide_secrets(v) for v in options]
    return options


def redact_text(text: str) -> str:
    """``text`` with every URL credential, and every secret given in storage options, replaced by ``***``."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    if "@" in text:
        text = _RUN.sub(_hide_userinfo_in, text)
        text = _SCHEME_USERINFO.sub(r"\1***@", text)
    return _SECRET_QUERY.sub(r"\1***", text)


def bound(text: str, limit: int = MAX_MESSAGE) -> str:
    """One line of at most ``limit`` characters (plus the note of how long the whole was)."""
    one = " ".join(text.split())
    if len(one) <= limit:
        return one
    return f"{one[:limit]}… ({len(one)} chars)"


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


def _sigterm(signum, frame):
    raise Terminated()


_sigterm_installed = False


def install_sigterm() -> None:
    """SIGTERM stops the command like Ctrl-C does (the CLI prints "terminated", exits 143)."""
    global _sigterm_installed
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)
        _sigterm_installed = True


def reinstall_sigterm() -> None:
    """After ``ray.init`` (which sets its own SIGTERM handler): the CLI's again, if it had one."""
    if _sigterm_installed:
        install_sigterm()


class RemoteError(Exception):
    """A failure inside a Ray task whose exception object did not travel back (Ray Data's
    ``UserCodeException`` keeps only the text of its cause): rebuilt from that text."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))(?:: (.*))?$")


def _root_in_text(text: str) -> RemoteError | None:
    """The last exception named in a remote traceback's text that is not Ray's own wrapper: the one
    that left the task (a cause chain names its root first)."""
    found = None
    for line in _ANSI.sub("", text).splitlines():
        m = _EXC_LINE.match(line.strip())
        if m and not m.group(1).startswith("ray.") and "UserCodeException" not in m.group(1):
            found = RemoteError(m.group(1).rsplit(".", 1)[-1], m.group(2) or "")
    return found


def unwrap(e: BaseException) -> BaseException:
    """The real cause of a Ray task/actor error (``RayTaskError(ValueError)`` -> the ValueError)."""
    seen, text = set(), None
    while id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        if name.startswith("RayTaskError") or name in ("RayActorError", "UserCodeException"):
            text = f"{getattr(e, 'traceback_str', None) or ''}\n{e}" if name.startswith("RayTaskError") else text
            cause = getattr(e, "cause", None) or e.__cause__
            if isinstance(cause, BaseException):
                e = cause
                continue
            root = _root_in_text(text) if text else None
            if root is not None:
                return root
        break
    return e


def _object(e: BaseException) -> str | None:
    for attr in ("filename", "url", "path"):
        v = getattr(e, attr, None)
        if isinstance(v, (str, os.PathLike)) and str(v):
            return str(v)
    return None


_PACKAGE = str(Path(__file__).resolve().parent)


@contextmanager
def about(url: str):
    """Name ``url`` as the object of any error raised inside (one that names no file or URL of its own):
    the code that knows what it is reading says so, and the one-line error repeats it."""
    try:
        yield
    except Exception as e:
        if _object(e) is None:
            try:
                e.url = url
            except AttributeError:  # an exception type without a __dict__
                pass
        raise


def owner_of(e: BaseException) -> str | None:
    """The URL of the storage object whose method failed: the innermost frame of this package that
    is a method of an object with a ``url`` (an ``Output``, a store). Never a guess from the names of
    local variables (an input, a model path): where no such object was at work, no object is named."""
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        if frame.f_code.co_filename.startswith(_PACKAGE):
            owner = frame.f_locals.get("self")
            if isinstance(getattr(owner, "url", None), str):
                return owner.url
    return None


def describe(e: BaseException, url: str | None = None, *, expected: bool = False) -> str:
    """One line naming the cause (and the object, where known) of ``e``; an ``expected`` error (the
    CLI's own kinds: its message is written for the user) keeps its message as it is."""
    e = unwrap(e)
    url = url or _object(e) or owner_of(e)
    name = getattr(e, "kind", None) or type(e).__name__
    text = str(e)
    chain = [e]
    c = e.__cause__ or e.__context__
    while c is not None and len(chain) < 8:
        chain.append(c)
        c = c.__cause__ or c.__context__
    names = {type(x).__name__ for x in chain}
    where = f" ({url})" if url else ""
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return (f"no cloud credentials found{where}: configure them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE or ~/.aws/credentials) and run again")
    if isinstance(e, ImportError) and re.search(r"install (s3fs|gcsfs|adlfs)", text, re.I):
        pkg = re.search(r"(s3fs|gcsfs|adlfs)", text, re.I).group(1).lower()
        extra = {"s3fs": "s3", "gcsfs": "gcs", "adlfs": "azure"}[pkg]
        return f"{pkg} is not installed{where}: pip install 'strata[{extra}]' (or pip install {pkg})"
    if not expected and ("UnpicklingError" in names or "Weights only load failed" in text):
        return (f"torch refused to unpickle the weights{where} (weights_only): the file needs code that is not "
                "allowed to run; convert it to safetensors, or load it only if you trust it and its source")
    if expected and text:
        return text
    obj = _object(e) or url
    if obj and obj not in text:
        text = f"{obj}: {text}"
    return f"{name}: {text}" if text else name


class LogFile:
    """The per-invocation log file: made on first write, path printed by the CLI."""

    def __init__(self, command: str):
        root = Path(os.environ.get("STRATA_LOG_DIR") or Path.home() / ".cache" / "strata" / "logs")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path = root / f"strata-{stamp}-{os.getpid()}.log"
        self.command = command

    def write(self, text: str) -> Path | None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8", errors="replace") as f:
                if len(text) > MAX_LOG_ENTRY:
                    text = f"{text[:MAX_LOG_ENTRY]}… ({len(text)} chars)\n"
                f.write(redact_text(text))
                if not text.endswith("\n"):
                    f.write("\n")
            return self.path
        except OSError:
            return None

    def exception(self, e: BaseException) -> Path | None:
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        return self.write(f"strata {self.command}: {time.strftime('%Y-%m-%dT%H:%M:%S')}\n{tb}")


class CliLogHandler:
    """Logging handlers for the CLI: stderr gets each record redacted and bounded to one line (the log
    file gets the full text of any record that was cut); Ray's loggers ("ray", "ray.data") write to the
    log file, and reach stderr (one line each) only with -v or when critical."""

    def __init__(self, log: LogFile, level: int):
        import logging

        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        log_file = log

        class _Stderr(logging.StreamHandler):
            brief = False  # message only: Ray's own stack traces stay in the log file

            def format(self, record):
                if self.brief:
                    full = redact_text(f"{record.levelname} {record.name}: {record.getMessage()}")
                else:
                    full = redact_text(fmt.format(record))
                short = bound(full)
                if short != " ".join(full.split()):
                    path = log_file.write(full)
                    short += f" (full text: {path})" if path else ""
                return short

        class _File(logging.Handler):
            def emit(self, record):
                try:
                    log_file.write(fmt.format(record))
                except Exception:  # noqa: BLE001 - logging must never raise
                    pass

        self.stderr = _Stderr()
        self.stderr.setLevel(level)
        self.ray_stderr = _Stderr()
        self.ray_stderr.brief = True
        # Ray's records (its errors too: a failing command ends in its own one line) go to the log
        # file; with -v they reach stderr as well
        self.ray_stderr.setLevel(logging.CRITICAL if level > logging.INFO else level)
        self.file = _File()
        self.file.setLevel(min(level, logging.WARNING))
        for h in (self.stderr, self.ray_stderr, self.file):
            h._strata = True

    def install(self, level: int) -> None:
        import logging

        root = logging.getLogger()
        for h in list(root.handlers):
            if getattr(h, "_strata", False):  # an earlier main() in this process
                root.removeHandler(h)
        root.addHandler(self.stderr)
        root.setLevel(level)
        ours = [self.ray_stderr, self.file]
        for name in ("ray", "ray.data"):
            logger = logging.getLogger(name)

            def add(h, logger=logger):
                # `import ray` and Ray Data's logging setup add console handlers later: ours stand in
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                        and not getattr(h, "_strata", False):
                    h = None
                for x in [h] if h is not None else ours:
                    if x not in logger.handlers:
                        logging.Logger.addHandler(logger, x)

            logger.addHandler = add
            for h in list(logger.handlers):
                logger.removeHandler(h)
                if not getattr(h, "_strata", False):
                    add(h)
            for h in ours:
                add(h)
            logger.propagate = False
        logging.getLogger("ray").setLevel(min(level, logging.WARNING))


def route_native_stderr(log: LogFile) -> bool:
    """Send what is written to file descriptor 2 by native code (Ray's core worker: ``core_worker.cc ...``
    notices) to the log file, while Python's ``sys.stderr`` keeps the terminal. Only when sys.stderr is fd 2.
    The log file is removed at exit if nothing was written to it."""
    import atexit
    import sys

    try:
        if sys.stderr is None or sys.stderr.fileno() != 2:
            return False
        log.path.parent.mkdir(parents=True, exist_ok=True)
        target = os.open(log.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except (OSError, ValueError, AttributeError):
        return False
    sys.stderr.flush()
    terminal = os.dup(2)
    os.set_inheritable(terminal, False)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    os.dup2(target, 2)
    os.close(target)

    def _tidy():
        try:
            if log.path.stat().st_size == 0:
                log.path.unlink()
        except OSError:
            pass

    atexit.register(_tidy)
    return True

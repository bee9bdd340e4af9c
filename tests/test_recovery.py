"""Faults during and between runs, then the same command again (issue #17): a stop by SIGINT or
SIGTERM, a committed part deleted, the manifest deleted, the disk full while staging, a shard
rewritten with the same size. Each is detected and named, nothing half-written is committed, and
the re-run ends with every input row exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.runner import read_embeddings
from pipeline.storage import DamagedOutput

ROOT = Path(__file__).resolve().parents[1]
SECRET = "RECOVERYSECRET55"
WORDS = "river stone cloud light tree house bird fish cat dog wind rain sun moon hill road".split()


@pytest.fixture(autouse=True)
def log_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_LOG_DIR", str(tmp_path / "logs"))


def corpus(directory: Path, shards: int, rows: int, words: int = 12, seed: int = 0) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    ids = []
    for s in range(shards):
        part = [f"s{s}-r{r}" for r in range(rows)]
        texts = [" ".join(WORDS[(seed + s * 7 + r * 3 + k) % len(WORDS)] for k in range(words)) + f" {r}"
                 for r in range(rows)]
        pq.write_table(pa.table({"id": part, "text": texts}), directory / f"part-{s:02d}.parquet")
        ids += part
    return ids


def argv(inp: Path, out: Path, model: str) -> list[str]:
    return ["embed", str(inp), str(out), "--model", model, "--layers", "1,-1", "--poolings", "mean", "--id-column",
            "id", "-q"]


def exactly_once(out: Path, ids: list[str]) -> None:
    got = read_embeddings(str(out), ["id"]).column("id").to_pylist()
    assert len(got) == len(ids) and sorted(got) == sorted(ids)


def committed(out: Path) -> list[dict]:
    try:
        return json.loads((out / "manifest.json").read_text())["shards"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


# ---------------------------------------------------------------- SIGINT / SIGTERM mid-run, then resume
@pytest.mark.alone
@pytest.mark.parametrize("sig, rc, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_stopped_mid_run_then_resumed_is_exactly_once(model_dir, tmp_path, sig, rc, word):
    ids = corpus(tmp_path / "in", shards=10, rows=400, words=30)
    cmd = [sys.executable, "-m", "pipeline", *argv(tmp_path / "in", tmp_path / "out", model_dir), "--actors", "1"]
    env = {**os.environ, "STRATA_LOG_DIR": str(tmp_path / "logs"), "RAY_ADDRESS": "local"}
    with open(tmp_path / "stderr", "w") as err_file:
        # SIGINT at its default disposition, as for a command in the foreground: a suite started in the
        # background of a non-interactive shell (`... &`) inherits SIGINT ignored, and so would the command
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and not committed(tmp_path / "out"):
            time.sleep(0.2)
        assert p.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        p.send_signal(sig)
        p.communicate(timeout=120)
    err = (tmp_path / "stderr").read_text()
    assert p.returncode == rc, err[-3000:]
    assert err.rstrip().endswith(f"strata embed: {word}") and "Traceback" not in err
    done = len(committed(tmp_path / "out"))
    assert 1 <= done < 10, done  # stopped part-way
    got = read_embeddings(str(tmp_path / "out"), ["id"]).column("id").to_pylist()  # what is committed is whole
    assert len(got) == len(set(got)) == 400 * done
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{10 - done} shards embedded, {done} skipped" in again.stdout
    exactly_once(tmp_path / "out", ids)
    assert not (tmp_path / "out" / "_staging").exists() and not (tmp_path / "out" / "_lock.json").exists()


# ---------------------------------------------------------------- a committed part deleted behind Strata's back
def test_a_deleted_part_is_named_then_re_embedded(ray_local, model_dir, tmp_path, capsys):
    ids = corpus(tmp_path / "in", shards=3, rows=20)
    assert main(argv(tmp_path / "in", tmp_path / "out", model_dir)) == 0
    victim = committed(tmp_path / "out")[1]
    part = tmp_path / "out" / victim["output"] / victim["files"][0]
    part.unlink()
    with pytest.raises(DamagedOutput) as e:
        read_embeddings(str(tmp_path / "out"), ["id"])
    assert victim["files"][0] in str(e.value) and "\n" not in str(e.value)
    capsys.readouterr()
    assert main(["index", str(tmp_path / "out"), "--kind", "flat"]) == 2  # never served
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("strata index:")]
    assert victim["files"][0] in line
    assert main(argv(tmp_path / "in", tmp_path / "out", model_dir)) == 0
    assert "1 shards embedded, 2 skipped" in capsys.readouterr().out
    exactly_once(tmp_path / "out", ids)


# ---------------------------------------------------------------- the manifest deleted
def test_a_deleted_manifest_embeds_everything_again_once(ray_local, model_dir, tmp_path, capsys, caplog):
    ids = corpus(tmp_path / "in", shards=3, rows=20)
    assert main(argv(tmp_path / "in", tmp_path / "out", model_dir)) == 0
    old = sorted(p.name for p in (tmp_path / "out" / "embeddings").iterdir())
    (tmp_path / "out" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError):
        read_embeddings(str(tmp_path / "out"), ["id"])
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        assert main(argv(tmp_path / "in", tmp_path / "out", model_dir)) == 0
    assert "3 shards embedded, 0 skipped" in capsys.readouterr().out
    (warning,) = [r.getMessage() for r in caplog.records if "has no manifest.json" in r.getMessage()]
    assert "3 folder(s) under embeddings/" in warning and old[0] in warning
    exactly_once(tmp_path / "out", ids)  # the new manifest names only this run's folders
    assert set(old) < {p.name for p in (tmp_path / "out" / "embeddings").iterdir()}  # not ours to remove


# ---------------------------------------------------------------- a shard rewritten with the same size
@pytest.mark.parametrize("keep_mtime", [False, True])
def test_a_shard_rewritten_with_the_same_size_is_re_embedded(ray_local, model_dir, tmp_path, capsys, keep_mtime):
    corpus(tmp_path / "in", shards=2, rows=20)
    shard = tmp_path / "in" / "part-01.parquet"
    plain = dict(compression="none", use_dictionary=False)  # so that same-length text gives the same size
    pq.write_table(pq.read_table(shard), shard, **plain)
    assert main(argv(tmp_path / "in", tmp_path / "out", model_dir)) == 0
    before = read_embeddings(str(tmp_path / "out")).to_pylist()
    stat = shard.stat()
    # the same ids and text lengths, other words: the same size, other content
    t = pq.read_table(shard)
    swapped = [x.replace("river", "stone") if "river" in x else x.replace("stone", "river") for x in
               t.column("text").to_pylist()]
    pq.write_table(t.set_column(1, "text", pa.array(swapped)), shard, **plain)
    assert shard.stat().st_size == stat.st_size
    if keep_mtime:  # the modification time put back too (cp -p, rsync -t of an edited copy)
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    assert main(argv(tmp_path / "in", tmp_path / "out", model_dir)) == 0
    assert "1 shards embedded, 1 skipped" in capsys.readouterr().out
    after = {r["id"]: r for r in read_embeddings(str(tmp_path / "out")).to_pylist()}
    old = {r["id"]: r for r in before}
    assert sorted(after) == sorted(old)
    changed = [i for i in after if after[i]["emb_4_mean"] != old[i]["emb_4_mean"]]
    assert changed and all(i.startswith("s1-") for i in changed)


# ---------------------------------------------------------------- the disk full while staging
@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs: a real full disk (ENOSPC). Needs mount rights (root in a container)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk fault is not exercised")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_while_staging_then_resumed_after_space_returns(ray_local, model_dir, tmp_path, small_disk,
                                                                  capsys):
    ids = corpus(tmp_path / "in", shards=8, rows=500)  # ~1 MB of parts
    out = small_disk / f"KEY:{SECRET}@host" / "out"  # a secret in the path: never printed or recorded
    capsys.readouterr()
    assert main(argv(tmp_path / "in", out, model_dir)) == 2
    stdout, err = capsys.readouterr()
    for text in (stdout, err, *(p.read_text() for p in (tmp_path / "logs").glob("*.log")),
                 *(p.read_text() for p in out.rglob("*.json"))):
        assert SECRET not in text
    (line,) = [x for x in err.splitlines() if x.startswith("strata embed:")]
    assert "No space left on device" in line and str(out).replace(f"KEY:{SECRET}", "***") in line, line
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # Ray's own error records went to the log file
    done = committed(out)
    assert len(done) < 8
    if done:  # whatever was committed is whole: every part there, row counts as recorded
        got = read_embeddings(str(out), ["id"]).column("id").to_pylist()
        assert len(got) == len(set(got)) == sum(s["rows_written"] for s in done)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space returns
    assert main(argv(tmp_path / "in", out, model_dir)) == 0
    assert f"{8 - len(done)} shards embedded, {len(done)} skipped" in capsys.readouterr().out
    exactly_once(out, ids)
    assert not (out / "_staging").exists(), sorted(str(p.relative_to(out)) for p in (out / "_staging").rglob("*"))

"""One run per output: the lock refuses a live second run and takes over a dead run's lock."""

import json
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli, storage, stores
from pipeline.storage import LOCK, Output, OutputInUse


def plant_lock(root, **fields):
    root.mkdir(parents=True, exist_ok=True)
    holder = {"token": "other", "host": socket.gethostname(), "pid": 1, "started": "then", "heartbeat": time.time()}
    (root / LOCK).write_text(json.dumps(holder | fields))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_run_refused_while_first_holds_the_output(tmp_path):
    out = Output(str(tmp_path / "out"))
    with out.lock():
        with pytest.raises(OutputInUse, match=rf"in use by another run \(host {socket.gethostname()}, pid \d+"):
            with Output(str(tmp_path / "out")).lock():
                pass
        assert (tmp_path / "out" / LOCK).exists()
    assert not (tmp_path / "out" / LOCK).exists()  # released
    with out.lock():  # and free again
        pass


def test_lock_released_when_the_run_fails(tmp_path):
    out = Output(str(tmp_path / "out"))
    with pytest.raises(KeyError):
        with out.lock():
            raise KeyError("boom")
    assert not (tmp_path / "out" / LOCK).exists()


def test_dead_runs_lock_is_taken_over(tmp_path):
    plant_lock(tmp_path / "a", pid=dead_pid())  # this host, process gone
    with Output(str(tmp_path / "a")).lock():
        assert json.loads((tmp_path / "a" / LOCK).read_text())["token"] != "other"
    plant_lock(tmp_path / "b", host="elsewhere", heartbeat=time.time() - storage.LOCK_STALE_S - 1)  # silent too long
    with Output(str(tmp_path / "b")).lock():
        pass


def test_live_lock_of_another_host_is_respected(tmp_path):
    plant_lock(tmp_path / "out", host="elsewhere", pid=4242)
    with pytest.raises(OutputInUse, match="host elsewhere, pid 4242"):
        with Output(str(tmp_path / "out")).lock():
            pass


def test_holder_keeps_its_lock_alive(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "LOCK_HEARTBEAT_S", 0.05)
    out = Output(str(tmp_path / "out"))
    with out.lock():
        first = json.loads((tmp_path / "out" / LOCK).read_text())["heartbeat"]
        time.sleep(0.4)
        assert json.loads((tmp_path / "out" / LOCK).read_text())["heartbeat"] > first
    assert not any(t.name == "strata-output-lock" for t in threading.enumerate())  # heartbeat stopped


def test_embed_refuses_a_locked_output_before_any_work(tmp_path, capsys, model_dir):
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "in.parquet")
    plant_lock(tmp_path / "out", host="elsewhere", pid=4242)
    rc = cli.main(["embed", str(tmp_path / "in.parquet"), str(tmp_path / "out"), "--model", model_dir])
    assert rc == 2
    err = capsys.readouterr().err
    assert "in use by another run" in err and "host elsewhere" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("value_type", [pa.float32(), pa.float16(), pa.int8(), pa.uint8()])
def test_parts_are_written_for_vectors_and_read_back_exactly(tmp_path, value_type):
    """Vector columns: no dictionary, no statistics, zstd; float32 byte-stream-split (pipeline.parts.parquet_options)."""
    import fsspec
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.parts import write_part

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(64 * 16) * 50).astype(value_type.to_pandas_dtype())
    t = pa.table({"id": [f"r{i}" for i in range(64)],
                  "emb_3_mean": pa.FixedSizeListArray.from_arrays(pa.array(x, value_type), 16)})
    write_part(fsspec.filesystem("file"), str(tmp_path / "p.parquet"), t)
    assert pq.read_table(tmp_path / "p.parquet").equals(t)
    col = pq.ParquetFile(tmp_path / "p.parquet").metadata.row_group(0).column(1)
    assert col.compression == "ZSTD" and col.statistics is None
    assert "PLAIN_DICTIONARY" not in col.encodings and "RLE_DICTIONARY" not in col.encodings
    assert ("BYTE_STREAM_SPLIT" in col.encodings) == (value_type == pa.float32())


def test_commit_dir_moves_nested_staged_files_exactly(tmp_path):
    """The commit of a staged folder relies on no directory semantics beyond one local rename: every
    staged file, nested or not, arrives under embeddings/ byte for byte and staging is left empty
    (fsspec 2026.6 changed recursive moves; this fails if what Strata relies on changes again)."""
    out = Output(str(tmp_path / "out"))
    staged = out.path("_staging", "run1", "shard-a")
    files = {"part-0.parquet": b"a" * 10, "rejects-part-0.parquet": b"r", "sub/part-1.arrow": b"b" * 3}
    for name, data in files.items():
        out.fs.makedirs(f"{staged}/{name}".rsplit("/", 1)[0], exist_ok=True)
        with out.fs.open(f"{staged}/{name}", "wb") as f:
            f.write(data)
    rel = out.commit_dir(staged, "shard-a", "run1")
    assert rel == "embeddings/shard-a-run1"
    got = {p[len(out.path(rel)) + 1:]: out.fs.cat_file(p) for p in out.fs.find(out.path(rel))}
    assert got == files
    assert not out.fs.exists(staged)


@pytest.mark.parametrize("error", [KeyboardInterrupt, PermissionError])
def test_exists_answers_no_only_for_not_found(tmp_path, monkeypatch, error):
    # fsspec's own exists() returns False on any exception: a Ctrl-C during a commit's check was
    # swallowed and the shard's staged parts reported missing (the run then exited 2, not 130)
    fs, _ = stores.filesystem(str(tmp_path))
    (tmp_path / "here").write_text("x")
    assert stores.exists(fs, str(tmp_path / "here")) and not stores.exists(fs, str(tmp_path / "gone"))

    def info(path, **kw):
        raise error("stop")

    monkeypatch.setattr(fs, "info", info)
    assert fs.exists(str(tmp_path / "here")) is False  # fsspec's answer, which stores.exists replaces
    with pytest.raises(error):
        stores.exists(fs, str(tmp_path / "here"))


@pytest.mark.parametrize("text, says", [
    ('{"shards": [', "is not valid JSON (Expecting value"),
    ('[1, 2]', "is not a Strata manifest (a JSON list"),
    ('{"format": 99, "shards": []}', "has format 99; this version of Strata reads and writes format 1 only"),
])
def test_a_manifest_from_elsewhere_is_refused_naming_the_file(tmp_path, capsys, text, says):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(text)
    with pytest.raises(storage.DamagedOutput) as e:
        Output(str(out)).read_manifest()
    assert f"{out}/manifest.json" in str(e.value) and says in str(e.value), e.value
    assert cli.main(["index", str(out), "--kind", "flat"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("strata index:")]
    assert "manifest.json" in line and says in line and (out / "manifest.json").read_text() == text


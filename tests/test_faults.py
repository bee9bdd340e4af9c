"""Injected faults: a killed embedding actor, a multi-node cluster losing a worker node.

Each ends with exactly one output row per input row. The crash/resume, driver-kill and
corrupt-shard scenarios live in test_runner.py.
"""

import json
import threading
import time


import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.runner import read_embeddings
from reference import embed
from conftest import data_file  # noqa: E402

OPTS = dict(layers="1,-1", poolings="mean,last", id_column="id", progress=False)




@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rows = [json.loads(line) for line in (data_file("scifact", "corpus.jsonl")).read_text().splitlines()[:1200]]
    d = tmp_path_factory.mktemp("in")
    for i in range(6):
        part = rows[i * 200:(i + 1) * 200]
        pq.write_table(pa.table({"id": [r["_id"] for r in part], "text": [r["title"] + " " + r["text"] for r in part]}),
                       d / f"part-{i}.parquet", row_group_size=50)
    return d, [r["_id"] for r in rows]


def _own_raylets(session_dir: str) -> set[int]:
    """The raylet processes of this test's Ray session (never another Ray on the machine)."""
    pids = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "raylet" in cmd and session_dir in cmd:
            pids.add(p.pid)
    return pids


def _kill_first_actor(session_dir: str, stop: threading.Event, killed: list):
    raylets = _own_raylets(session_dir)
    while not stop.is_set() and not killed:
        for p in psutil.process_iter(["cmdline", "ppid"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "EmbedActor" in cmd and p.info["ppid"] in raylets:
                time.sleep(1.0)  # let it take work first
                try:
                    p.kill()
                    killed.append(p.pid)
                except psutil.NoSuchProcess:
                    continue
                return
        time.sleep(0.1)


def _exactly_once(out, ids):
    got = read_embeddings(str(out), ["id"]).column("id").to_pylist()
    assert len(got) == len(ids) and sorted(got) == sorted(ids)


@pytest.mark.slow
def test_embedding_actor_killed_mid_run(own_ray, model_dir, shards, tmp_path):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, logging_level="ERROR")
    try:
        stop, killed = threading.Event(), []
        session_dir = ray._private.worker._global_node.get_session_dir_path()
        killer = threading.Thread(target=_kill_first_actor, args=(session_dir, stop, killed))
        killer.start()
        try:
            summary = embed(str(shards[0]), str(tmp_path / "out"), model=model_dir, unit_rows=50, **OPTS)
        finally:
            stop.set()
            killer.join()
        assert killed, "no embedding actor was found to kill"
        assert summary.rows == len(shards[1]) and not summary.shards_failed
        _exactly_once(tmp_path / "out", shards[1])
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_multi_node_cluster_with_gpu_node_and_node_loss(own_ray, model_dir, shards, tmp_path):
    """Three Ray nodes on this machine; one advertises a GPU, so placement takes the GPU path
    (a CPU-only torch cannot use it: the actor is pinned there by resources, runs on CPU).
    A worker node is removed mid-run; the job still ends exactly once."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline import runner

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        n, cpus, gpus, _ = runner._resources(ray, None, None)
        assert (n, gpus) == (1, 1.0)  # one actor per GPU
        removed = []

        def remove_worker():  # once the first shard is committed, while the rest are in flight
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    committed = len(json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"])
                except (OSError, ValueError, KeyError):
                    committed = 0
                if committed:
                    cluster.remove_node(worker, allow_graceful=False)
                    removed.append(committed)
                    return
                time.sleep(0.05)

        t = threading.Thread(target=remove_worker)
        t.start()
        summary = embed(str(shards[0]), str(tmp_path / "out"), model=model_dir, unit_rows=50,
                        actors=None, gpus_per_actor=1, **OPTS)
        t.join()
        assert removed and removed[0] < 6, "the node was not removed mid-run"
        assert summary.rows == len(shards[1]) and not summary.shards_failed
        _exactly_once(tmp_path / "out", shards[1])
    finally:
        ray.shutdown()
        cluster.shutdown()

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Under pytest-xdist each worker gets its share of the cores for torch, FAISS and BLAS, in this process,
# its subprocesses and (through the runner's thread cap) its Ray actors: two workers each running
# 2-thread torch on 2 cores spin their OpenMP threads against each other (with this, the 2-worker
# phase of `make test` went from 1,634 s to 1,401 s, the hostile sweep's second set-up of every case
# removed too; `--durations=0` runs at d6f6e05 and 173d9e6). Set before torch is imported; a value the
# caller set is kept.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _share = str(max(1, len(os.sched_getaffinity(0)) // _workers))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, _share)

from pipeline.raystart import patient_health_checks  # noqa: E402

# Every Ray the tests start (the shared one, multi-node ``Cluster``s, CLI subprocesses) keeps a
# raylet starved by two busy test workers alive, as the CLI does for the Ray it starts.
patient_health_checks()

from pathlib import Path  # noqa: E402

# The evaluation data beside the checkout (../shared/data); STRATA_DATA points elsewhere. The one
# definition for every test module; tests that need it carry @needs_data and skip without it.
DATA = Path(os.environ.get("STRATA_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def data_file(*parts: str) -> Path:
    """A path under DATA; the calling test or fixture skips, saying why, when it is not there."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"evaluation data not found: {path} (set STRATA_DATA to a folder with stsb/ and scifact/)")
    return path


@pytest.fixture(scope="session")
def stsb_sentences():
    lines = data_file("stsb", "sts-test.csv").read_text(encoding="utf-8").splitlines()
    out = []
    for line in lines[:25]:
        f = line.split("\t")
        out += [f[5], f[6]]
    return out


@pytest.fixture(scope="session")
def smollm2_encoder():
    from pipeline import Encoder

    return Encoder.load("smollm2-135m", layers="0,1,10,15,29,30",
                        poolings="last,first,mean,wmean,max,mean_nosink,wmean_nosink", batch_tokens=512)


@pytest.fixture(scope="session")
def _ray_session():
    """Stops, at the end of the session, whatever Ray the tests left running in this process."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """ONE private local Ray (2 CPUs) shared by every module that asks for it: a Ray start costs about
    7.5 s on 2 cores, once per session instead of once per module. Started by the first module that
    asks; left running between modules; started again after a module with a Ray of its own
    (``own_ray``) stopped it; stopped at the end of the session. A Ray the runner itself started
    (``runner.embed`` starts one only if none is up) is used as it is."""
    import ray

    if not ray.is_initialized():
        # address="local": a private instance even while another Ray (another test run) is up on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
                 logging_level="ERROR")
    return ray


@pytest.fixture(scope="module")
def own_ray(_ray_session):
    """For a module whose tests start a Ray of their own (a multi-node ``Cluster``, an actor or node
    killed on purpose): the shared one is stopped first, so theirs is the only Ray this process is
    connected to and ``ray.init`` starts it rather than joining the shared one. Whatever is left is
    stopped after the module; the next module that asks for ``ray_local`` starts the shared one again."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random 4-layer LLaMA saved with SmolLM2's tokenizer: a real model directory, fast."""
    from reference import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def faiss_one_thread():
    """FAISS on one thread: deterministic k-means, and fair use of a shared 2-core machine."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server (server mode, not the in-process mock) on 127.0.0.1 at a free port, for the
    whole session: Strata talks HTTP to it through s3fs as it would to AWS. Stopped at the end."""
    from s3server import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, request):
    """A fresh bucket on the session's S3 server; ``s3.options`` are its fsspec storage options."""
    return s3_server.bucket(request.node.name)

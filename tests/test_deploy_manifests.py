"""The cluster deployment files (deploy/Dockerfile, deploy/kuberay/*.yaml, deploy/cluster-launcher/*.yaml)
agree with the pipeline's cluster config, the installed versions and each other, and keep secrets out.

Pure logic: YAML and text parsing, no Ray cluster, no Kubernetes, no network. The GPU sizes come from
pipelines/configs/cluster.yaml through ``load_config``, so changing that config without the manifests
fails here.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
LAUNCHER = DEPLOY / "cluster-launcher" / "aws-gpu.yaml"
CLUSTER_CONFIG = "pipelines/configs/cluster.yaml"
TOKEN_SECRET = ("vaegan-ray-token", "token")
STORAGE_KEYS = {"AWS_ACCESS_KEY_ID": "access_key_id", "AWS_SECRET_ACCESS_KEY": "secret_access_key",
                "AWS_ENDPOINT_URL": "endpoint_url"}
SECRET_WORDS = ("TOKEN", "PASSWORD", "SECRET")


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def one(kind: str) -> dict[str, Any]:
    docs = [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_docs(path) if doc.get("kind") == kind]
    assert len(docs) == 1, f"expected one {kind} under deploy/kuberay, found {len(docs)}"
    return docs[0]


def cluster_specs() -> dict[str, dict[str, Any]]:
    """The RayCluster spec of each manifest that makes a cluster."""
    return {"RayJob": one("RayJob")["spec"]["rayClusterSpec"], "RayCluster": one("RayCluster")["spec"]}


def ray_containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, container) for the Ray container of the head and of every worker group."""
    yield "head", spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]["containers"][0]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


@pytest.fixture(scope="module")
def cluster_cfg():
    return load_config(ROOT / "pipelines" / "configs" / "cluster.yaml")


def test_every_deploy_yaml_parses():
    paths = sorted(DEPLOY.rglob("*.yaml"))
    assert {p.relative_to(DEPLOY).as_posix() for p in paths} >= {
        "kuberay/rayjob.yaml", "kuberay/raycluster.yaml", "kuberay/secrets.example.yaml",
        "cluster-launcher/aws-gpu.yaml"}
    for path in paths:
        assert load_docs(path), f"{path} holds no YAML document"


def test_rayjob_runs_the_cluster_config_and_cleans_up():
    spec = one("RayJob")["spec"]
    command = spec["entrypoint"].split()
    assert command[:4] == ["vaegan", "run", "--config", CLUSTER_CONFIG] and (ROOT / CLUSTER_CONFIG).is_file()
    assert command[4] == "--run-dir" and command[5].startswith("s3://"), "the run folder lives in a bucket"
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 24 * 3600
    assert 0 <= spec["backoffLimit"] <= 3


def test_rayjob_and_raycluster_make_the_same_cluster():
    specs = cluster_specs()
    assert specs["RayJob"] == specs["RayCluster"]


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_gpu_workers_cover_the_train_scaling_config(kind, cluster_cfg):
    spec = cluster_specs()[kind]
    assert spec["rayVersion"] == metadata.version("ray")
    head = spec["headGroupSpec"]
    assert str(head["rayStartParams"].get("num-gpus")) == "0", "the head holds no GPU"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    gpus = cpus = 0
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        per_pod = int(limits.get("nvidia.com/gpu", 0))
        if "num-gpus" in group.get("rayStartParams", {}):
            assert int(group["rayStartParams"]["num-gpus"]) == per_pod, f"{group['groupName']}: num-gpus != GPU limit"
        # A fixed-size group: the replicas present are the replicas there will be.
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
        gpus += group["replicas"] * per_pod
        cpus += group["replicas"] * float(limits["cpu"]) if per_pod else 0
    train = cluster_cfg.train
    if train.use_gpu:
        assert gpus >= train.num_workers, f"{kind}: {gpus} GPUs for {train.num_workers} GPU workers"
        assert cpus >= train.num_workers + 1, f"{kind}: GPU pods need a CPU per Train worker plus Ray Data's"
    images = {container["image"] for _, container in ray_containers(spec)}
    assert len(images) == 1, f"{kind}: head and workers must run one image, got {images}"


def secret_ref(item: dict[str, Any]) -> tuple[str, str] | None:
    ref = item.get("valueFrom", {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_every_ray_container_has_token_auth_object_storage_and_mlflow(kind):
    spec = cluster_specs()[kind]
    for where, container in ray_containers(spec):
        env = env_of(container)
        assert env["RAY_AUTH_MODE"].get("value") == "token", f"{kind} {where}"
        assert secret_ref(env["RAY_AUTH_TOKEN"]) == TOKEN_SECRET, f"{kind} {where}"
        assert "value" not in env["MLFLOW_TRACKING_URI"] and "valueFrom" in env["MLFLOW_TRACKING_URI"], (
            f"{kind} {where}: MLFLOW_TRACKING_URI must come from a ConfigMap or Secret")
        for variable, key in STORAGE_KEYS.items():
            assert secret_ref(env[variable]) == ("vaegan-storage", key), f"{kind} {where}: {variable}"
        assert container.get("workingDir", "/app") == "/app"
    pod_specs = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pod_specs:  # the run folder is in a bucket: no pod needs a shared volume
        assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v or "nfs" in v], pod["volumes"]


def test_rayjob_submitter_authenticates():
    spec = one("RayJob")["spec"]
    containers = spec["submitterPodTemplate"]["spec"]["containers"]
    assert len(containers) == 1
    env = env_of(containers[0])
    assert env["RAY_AUTH_MODE"].get("value") == "token"
    assert secret_ref(env["RAY_AUTH_TOKEN"]) == TOKEN_SECRET
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert containers[0]["image"] == head["image"]


def test_no_literal_secrets_in_any_env():
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in load_docs(path):
            for node in walk(doc):
                name = node.get("name")
                if isinstance(name, str) and "value" in node and any(w in name.upper() for w in SECRET_WORDS):
                    pytest.fail(f"{path.relative_to(ROOT)}: env {name} has a literal value; use valueFrom.secretKeyRef")


def test_secret_template_holds_only_placeholders_and_matches_the_manifests():
    secrets = {doc["metadata"]["name"]: doc for doc in load_docs(KUBERAY / "secrets.example.yaml")}
    for name, doc in secrets.items():
        assert doc["kind"] == "Secret"
        for key, value in doc.get("stringData", {}).items():
            assert "REPLACE_ME" in str(value), f"secrets.example.yaml {name}.{key} must be a placeholder"
        assert "data" not in doc, "no base64 data in the template"
    referenced = {(ref["name"], ref["key"]) for kind in ("RayJob", "RayCluster")
                  for ref in (n.get("secretKeyRef") for n in walk(one(kind))) if ref}
    for name, key in referenced:
        assert key in secrets[name]["stringData"], f"template lacks {name}.{key}"
        assert name in (ROOT / "docs" / "deploy.md").read_text(), f"docs/deploy.md never says how to create {name}"


def test_dockerfile_builds_on_the_matching_ray_image_from_the_lock():
    text = (DEPLOY / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert len(froms) == 1
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert froms[0] == f"rayproject/ray:{metadata.version('ray')}-{py}-gpu", (
        f"the base image must carry the installed Ray and this Python ({py}) that made the lock")
    assert re.search(r"pip install --no-cache-dir -r deploy/requirements\.lock", text)
    assert re.search(r"pip install .*--no-deps \.", text)
    assert re.search(r"^WORKDIR /app$", text, re.MULTILINE)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", "data", ".git"} <= set(ignored)


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-"), f"requirements.lock: no options or editable installs ({line})"
        name, sep, version = line.partition("==")
        assert sep and version, f"requirements.lock: {line!r} is not an exact pin"
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


REGENERATE = "regenerate it: python deploy/lock_requirements.py > deploy/requirements.lock"


def test_lock_pins_the_installed_core_versions():
    """The image must run the Ray, torch and MLflow the tests ran (and the driver's Ray must equal the
    cluster's). Other pins may drift from a fresh install without harm."""
    pins = lock_pins()
    for name in ("ray", "torch", "torchvision", "mlflow"):
        assert pins.get(name) == metadata.version(name), (
            f"requirements.lock has {name}=={pins.get(name)}, installed is {metadata.version(name)}; {REGENERATE}")
    for name in ("vaegan", "pytest", "ruff"):
        assert name not in pins, f"requirements.lock must not pin {name}"


def test_lock_covers_every_runtime_dependency():
    """The image installs vaegan with --no-deps, so a dependency missing from the lock is missing there."""
    from deploy.lock_requirements import closure

    missing = {re.sub(r"[-_.]+", "-", key).lower() for key in closure()} - set(lock_pins())
    assert not missing, f"requirements.lock lacks {sorted(missing)}; {REGENERATE}"


def launcher() -> dict[str, Any]:
    return load_docs(LAUNCHER)[0]


def test_launcher_config_is_valid_for_the_installed_ray():
    # The launcher's own config code (schema and defaults): no cluster, no cloud calls.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher()))


def test_launcher_has_enough_gpu_workers_and_a_cpu_head(cluster_cfg):
    cfg = launcher()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0
    assert any("--num-gpus=0" in cmd for cmd in cfg["head_start_ray_commands"])
    gpu_types = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    train = cluster_cfg.train
    if train.use_gpu:
        most = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_types.values())
        assert most >= train.num_workers
        assert cfg["max_workers"] * max(t["resources"]["GPU"] for t in gpu_types.values()) >= train.num_workers
    assert cfg["docker"]["image"] == one("RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["image"]


def test_launcher_turns_on_token_auth_everywhere():
    cfg = launcher()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [cmd for cmd in cfg[key] if "ray start" in cmd]
        assert starts and all("RAY_AUTH_MODE=token" in cmd for cmd in starts), key
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    text = LAUNCHER.read_text()
    assert not re.search(r"RAY_AUTH_TOKEN\s*=", text), "the token comes from the mounted file, never the YAML"



def test_launcher_keeps_the_run_folder_in_a_bucket_not_on_a_shared_mount():
    cfg = launcher()
    assert not [option for option in cfg["docker"]["run_options"] if option.startswith("--volume")]
    assert not [cmd for cmd in cfg.get("initialization_commands", []) if "mount" in cmd]
    assert "--run-dir s3://" in LAUNCHER.read_text(), "the submit command the file shows names a bucket"

"""Deploy, end to end on real parts: a two-node Ray cluster from ``deploy/local_cluster.sh`` (token
auth on), the smoke pipeline sent with the real ``ray job submit`` CLI into a bucket (a local S3 server)
and to a real ``mlflow server``, registry pulls (CLI verbs and Python, from fresh processes and in this one),
and ``mlflow models serve`` answering real HTTP requests. These are the commands docs/deploy.md gives; a
job with a shared run folder is the one that ``ray job stop`` stops.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
import torchvision
from PIL import Image
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conftest import BIN, BUCKET, REPO, bucket_fs, free_port, objects, vaegan_in_process
from test_faults import registered_checkpoints

from deploy.local_server import stop_group, wait_for_http

SMOKE = "pipelines/configs/smoke.yaml"
MODEL = "vaegan-deploy-test"


@pytest.fixture(scope="module")
def cluster():
    """deploy/local_cluster.sh up ... down, on free ports, with its own token."""
    state = Path(tempfile.mkdtemp(prefix="vc-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    gcs_port, dashboard_port = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "VAEGAN_CLUSTER_DIR": str(state),
           "GCS_PORT": str(gcs_port), "DASHBOARD_PORT": str(dashboard_port)}
    env.pop("RAY_ADDRESS", None)
    script = str(REPO / "deploy" / "local_cluster.sh")
    client_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state / "auth_token")}
    try:
        up = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"address": f"http://127.0.0.1:{dashboard_port}", "gcs": f"127.0.0.1:{gcs_port}", "env": client_env,
               "up_output": up.stdout}
    finally:
        sessions = [path.read_text().split()[0] for path in state.glob("*.sid")]  # each node's own session
        down = subprocess.run([script, "down"], env=env, capture_output=True, text=True, timeout=120)
        left = [line for sid in sessions for line in subprocess.run(
            ["ps", "-s", sid, "-o", "pid=,stat=,args="], capture_output=True, text=True).stdout.splitlines()
            if line.split()[1][0] != "Z"]
        shutil.rmtree(state, ignore_errors=True)
        assert down.returncode == 0 and len(sessions) == 2 and not left, (down.stdout + down.stderr, sessions, left)


def ray_cli(cluster, *args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env or cluster["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def submit(cluster, tracking_uri: str, run_dir: Path | str, *pipeline_args: str, wait: bool = True,
           submission_id: str | None = None, env: dict | None = None,
           job_env: dict | None = None) -> subprocess.CompletedProcess:
    """The README's `ray job submit ... -- vaegan run`, with the tracking URI (and ``job_env``) in the job's
    runtime env."""
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, **(job_env or {})}}
    return ray_cli(cluster, "job", "submit", "--address", cluster["address"], "--working-dir", ".",
                   "--runtime-env-json", json.dumps(runtime_env),
                   *(["--submission-id", submission_id] if submission_id else []), *([] if wait else ["--no-wait"]),
                   "--", "vaegan", "run", "--config", SMOKE, "--run-dir", str(run_dir), *pipeline_args, env=env)


def job_status(cluster, submission_id: str) -> str:
    out = ray_cli(cluster, "job", "status", "--address", cluster["address"], submission_id, timeout=60)
    text = (out.stdout + out.stderr).lower()  # "Job 'x' succeeded", "... is currently RUNNING", ...
    return next((status.upper() for status in ("succeeded", "failed", "stopped", "running", "pending")
                 if status in text), text)


@pytest.fixture(scope="module")
def smoke_job(cluster, s3, s3_mlflow, tmp_path_factory):
    """The smoke pipeline submitted to the two-node cluster, 2 Train workers (one per node's CPU), into
    ``s3://BUCKET/job``: no shared folder, so the nodes (started without any AWS_* variable) reach the bucket
    with what the job's runtime env carries, and the tracking server keeps the model's files there too. Its
    sweep is off: a trial is a Train run like any other, and the suite's sweeps run in test_pipeline,
    test_sweeps and test_object_storage. The test split is copied out of the bucket for the pull verbs."""
    assert not set(s3) & set(os.environ), "the cluster must not inherit the S3 settings"
    proc = submit(cluster, s3_mlflow, f"s3://{BUCKET}/job", "--set", "tune.enabled=false", "--set",
                  "train.num_workers=2", "--set", f"register.model_name={MODEL}", "--set",
                  "register.experiment=deploy-test", submission_id="vaegan-smoke-job", job_env=s3)
    job = {"proc": proc, "tracking_uri": s3_mlflow, "fs": bucket_fs(s3)}
    if proc.returncode == 0:
        with job["fs"].open_input_stream(f"{BUCKET}/job/summary.json") as f:
            job["summary"] = json.loads(f.read())
        job["test_split"] = tmp_path_factory.mktemp("job-test-split") / "split=test"
        job["test_split"].mkdir()
        pafs.copy_files(f"{BUCKET}/job/preprocess-{job['summary']['steps']['preprocess']['key']}/split=test",
                        str(job["test_split"]), source_filesystem=job["fs"],
                        destination_filesystem=pafs.LocalFileSystem())
    return job


def test_local_cluster_has_two_nodes_with_token_auth(cluster):
    nodes = ray_cli(cluster, "list", "nodes", "--address", cluster["gcs"], "--format", "json", timeout=60)
    assert nodes.returncode == 0, nodes.stderr
    alive = [n for n in json.loads(nodes.stdout) if n["state"] == "ALIVE"]
    assert len(alive) == 2 and sum(n["is_head_node"] for n in alive) == 1
    assert "RAY_AUTH_MODE=token" in cluster["up_output"]
    token = Path(cluster["env"]["RAY_AUTH_TOKEN_PATH"])
    assert token.stat().st_mode & 0o077 == 0, "the token file must be private"
    assert token.read_text().strip() not in cluster["up_output"]


def test_submitted_job_succeeds_across_both_nodes_and_registers(cluster, smoke_job):
    proc = smoke_job["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert job_status(cluster, "vaegan-smoke-job") == "SUCCEEDED"
    summary = smoke_job["summary"]
    assert summary["tracking_uri"] == smoke_job["tracking_uri"]
    assert summary["model_uri"] == f"models:/{MODEL}@champion"

    client = MlflowClient(smoke_job["tracking_uri"])
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert int(version.version) == summary["model_version"]
    train_run = client.get_run(version.run_id)
    worker_nodes = set(train_run.data.tags["train.node_ids"].split(","))
    nodes = ray_cli(cluster, "list", "nodes", "--address", cluster["gcs"], "--format", "json", timeout=60)
    cluster_nodes = {n["node_id"] for n in json.loads(nodes.stdout)}
    assert len(worker_nodes) == 2 and worker_nodes == cluster_nodes, "the 2 Train workers must run on both nodes"


def test_a_job_with_an_s3_run_dir_needs_only_the_endpoint_and_keys_in_its_runtime_env(smoke_job):
    """Every step and both Train workers wrote to the bucket from either node; nothing lives elsewhere."""
    assert smoke_job["proc"].returncode == 0
    summary, stored = smoke_job["summary"], objects(smoke_job["fs"], "job")
    assert summary["run_dir"] == f"s3://{BUCKET}/job"
    for name, step in summary["steps"].items():
        assert f"{name}-{step['key']}/outputs.json" in stored, sorted(stored)
    train = f"train-{summary['steps']['train']['key']}"
    assert f"{train}/checkpoint.pt" in stored
    assert any(k.startswith("ray/train-") and "/checkpoint_" in k for k in stored), "Ray Train's checkpoints"
    assert any(k.endswith("checkpoint.pt") for k in objects(smoke_job["fs"], "mlartifacts")), "the registered model"


def fresh_env(tmp_path: Path, tracking_uri: str) -> dict[str, str]:
    """What a user's shell has: PATH and MLFLOW_TRACKING_URI, nothing of the pipeline or the cluster."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "MLFLOW_TRACKING_URI": tracking_uri}


def vaegan(tmp_path: Path, tracking_uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vaegan"), *args], cwd=tmp_path, env=fresh_env(tmp_path, tracking_uri),
                          capture_output=True, text=True, timeout=300)


def test_pull_verbs_from_a_fresh_process(smoke_job, tmp_path, monkeypatch):
    assert smoke_job["proc"].returncode == 0
    uri, tracking_uri, test_split = f"models:/{MODEL}@champion", smoke_job["tracking_uri"], smoke_job["test_split"]
    python = ("import numpy as np; from deploy.pull import load_model; m = load_model('%s'); "
              "x = m.predict(np.zeros((1, 1, 28, 28), np.float32), params={'mode': 'sample', 'num_samples': 16}); "
              "print(x.shape, float(x.min()) >= 0, float(x.max()) <= 1)" % uri)
    python_env = {**fresh_env(tmp_path, tracking_uri), "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    # Two fresh processes as a user's shell starts them, a CLI verb and the Python API, side by side with the
    # other verbs, which run the CLI's main in this process (each process is mostly seconds of imports).
    with ThreadPoolExecutor(2) as pool:
        fresh_cli = pool.submit(vaegan, tmp_path, tracking_uri, "sample", "--model", uri, "--num", "16", "--seed",
                                "0", "--out", "grid0.png", "--npy", "samples0.npy")
        fresh_python = pool.submit(subprocess.run, [str(BIN / "python"), "-c", python], cwd=tmp_path,
                                   env=python_env, capture_output=True, text=True, timeout=300)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        for args in (("sample", "--model", uri, "--num", "16", "--seed", "0", "--out", "grid0again.png", "--npy",
                      "samples0again.npy"),
                     ("sample", "--model", uri, "--num", "16", "--seed", "1", "--out", "grid1.png", "--npy",
                      "samples1.npy"),
                     ("encode", "--model", uri, "--input", str(test_split), "--limit", "40", "--out", "latents.npy")):
            out = vaegan_in_process(list(args))
            assert out.returncode == 0, out.stderr
        again = np.load(tmp_path / "samples0again.npy")
        torchvision.utils.save_image(torch.from_numpy(again[0]), tmp_path / "a.png")
        torchvision.utils.save_image(torch.from_numpy(again[1]), tmp_path / "b.png")
        for args in (("reconstruct", "--model", uri, "--input", "samples0again.npy", "--out", "recon.png", "--npy",
                      "recon.npy"),
                     ("interpolate", "--model", uri, "--input", "a.png", "--input", "b.png", "--steps", "6", "--out",
                      "strip.png")):
            out = vaegan_in_process(list(args))
            assert out.returncode == 0, out.stderr
        fresh, python_out = fresh_cli.result(), fresh_python.result()
    assert fresh.returncode == 0, fresh.stderr
    first, other = np.load(tmp_path / "samples0.npy"), np.load(tmp_path / "samples1.npy")
    assert first.shape == (16, 1, 28, 28) and first.dtype == np.float32 and 0 <= first.min() <= first.max() <= 1
    assert np.array_equal(first, again) and not np.array_equal(first, other), "the seed fixes the samples"
    with Image.open(tmp_path / "grid0.png") as grid:
        assert grid.size == (2 + 8 * 30, 2 + 2 * 30), "8 columns x 2 rows of 28 px with 2 px padding"
    assert np.load(tmp_path / "latents.npy").shape == (40, 16)
    recon = np.load(tmp_path / "recon.npy")
    assert recon.shape == first.shape and np.abs(recon - first).mean() < 0.25
    with Image.open(tmp_path / "strip.png") as strip:
        assert strip.size == (2 + 6 * 30, 32)
    assert python_out.returncode == 0, python_out.stderr
    assert python_out.stdout.strip() == "(16, 1, 28, 28) True True"


def test_pull_errors_name_what_is_wrong(smoke_job, tmp_path, monkeypatch):
    cases = [
        (("sample", "--model", "models:/no-such-model@champion", "--out", "x.png"), "no-such-model"),
        (("sample", "--model", f"models:/{MODEL}@no-such-alias", "--out", "x.png"), "no-such-alias"),
        (("encode", "--model", f"models:/{MODEL}@champion", "--input", "missing.png", "--out", "z.npy"),
         "missing.png"),
    ]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", smoke_job["tracking_uri"])
    for args, named in cases:
        out = vaegan_in_process(list(args))
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("error: ") and named in out.stderr and "Traceback" not in out.stderr


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def served_model(smoke_job, tmp_path_factory):
    """`mlflow models serve` of the champion, started from a fresh environment; yields its /invocations URL.

    One uvicorn worker (MLflow's default) on purpose: the server runs each request in a thread pool, which
    the load test shows holds 32 at once on 2 cores; every further worker would load its own model copy.
    """
    assert smoke_job["proc"].returncode == 0
    folder = tmp_path_factory.mktemp("serve")
    port = free_port()
    log = open(folder / "serve.log", "w")
    # Through the tracking server, like the vaegan verbs (docs/deploy.md): the local S3 server mishandles the
    # presigned downloads MLflow's client otherwise takes straight from the bucket.
    serve_env = {**fresh_env(folder, smoke_job["tracking_uri"]), "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              env=serve_env, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", 180, server)
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        stop_group(server)
        log.close()


def test_mlflow_models_serve_answers_every_mode(served_model):
    url = served_model
    dummy = np.zeros((1, 1, 28, 28), np.float32).tolist()
    status, body = post(url, {"inputs": dummy, "params": {"mode": "sample", "num_samples": 8, "seed": 3}})
    assert status == 200, body
    samples = np.asarray(body["predictions"], np.float32)
    assert samples.shape == (8, 1, 28, 28) and 0 <= samples.min() and samples.max() <= 1

    status, body = post(url, {"inputs": samples.tolist(), "params": {"mode": "encode"}})
    assert status == 200 and np.asarray(body["predictions"]).shape == (8, 16)
    status, body = post(url, {"inputs": samples.tolist(), "params": {"mode": "reconstruct"}})
    recon = np.asarray(body["predictions"])
    assert status == 200 and recon.shape == (8, 1, 28, 28) and 0 <= recon.min() and recon.max() <= 1
    status, body = post(url, {"inputs": samples[:2].tolist(), "params": {"mode": "interpolate", "steps": 5}})
    assert status == 200 and np.asarray(body["predictions"]).shape == (5, 1, 28, 28)

    fitted = {"mode": "sample", "num_samples": 8, "seed": 3, "prior": "fitted"}
    status, body = post(url, {"inputs": dummy, "params": fitted})
    assert status == 200 and not np.array_equal(np.asarray(body["predictions"], np.float32), samples)
    status, body = post(url, {"inputs": dummy, "params": {"mode": "sample", "num_samples": 5000}})
    assert status == 400 and "num_samples=5000" in body["message"]
    status, body = post(url, {"inputs": dummy, "params": {"mode": "sample", "prior": "gmm"}})
    assert status == 400 and "params.prior: prior 'gmm' is not one of ['standard', 'fitted']" in body["message"]
    status, body = post(url, {"inputs": np.zeros((2, 3, 28, 28)).tolist(), "params": {"mode": "encode"}})
    assert 400 <= status < 500, body


def test_serving_answers_32_parallel_requests_and_refuses_the_oversize_ones_among_them(served_model):
    """Every answer is checked: shape, range, and equal to the answer to the same request sent alongside
    it (no cross-talk between requests served at once); the two oversize requests get a 400 naming the cap."""
    dummy = np.zeros((1, 1, 28, 28), np.float32).tolist()
    images = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32).tolist()
    bodies = {"sample": {"inputs": dummy, "params": {"mode": "sample", "num_samples": 8, "seed": 3}},
              "encode": {"inputs": images, "params": {"mode": "encode"}},
              "reconstruct": {"inputs": images, "params": {"mode": "reconstruct"}},
              "num_samples=5000": {"inputs": dummy, "params": {"mode": "sample", "num_samples": 5000}},
              "input holds 1025 images": {"inputs": np.zeros((1025, 1, 28, 28), np.float32).tolist(),
                                          "params": {"mode": "encode"}}}
    shapes = {"sample": (8, 1, 28, 28), "encode": (8, 16), "reconstruct": (8, 1, 28, 28)}
    kinds = [("sample", "encode", "reconstruct")[i % 3] for i in range(30)]
    kinds[10:10], kinds[21:21] = ["num_samples=5000"], ["input holds 1025 images"]
    with ThreadPoolExecutor(max_workers=len(kinds)) as pool:
        answers = list(pool.map(lambda kind: post(served_model, bodies[kind]), kinds))
    first: dict[str, np.ndarray] = {}
    for kind, (status, body) in zip(kinds, answers):
        if kind not in shapes:
            assert status == 400 and kind in body["message"], (kind, status, body)
            continue
        assert status == 200, (kind, status, body)
        out = np.asarray(body["predictions"], np.float32)
        assert out.shape == shapes[kind] and np.isfinite(out).all(), kind
        assert kind == "encode" or 0 <= out.min() <= out.max() <= 1, kind
        assert np.allclose(out, first.setdefault(kind, out), atol=1e-6), f"{kind}: same request, other answer"
    assert len(kinds) == 32 and len(answers) == 32


def test_job_stop_leaves_no_partial_outputs_or_registry_entry(cluster, smoke_job, mlflow_server, tmp_path):
    """Stop a running job mid-training: visible step folders are complete, nothing is registered,
    and the next run sweeps the half-written temporary folders away."""
    model, run_dir, job = "vaegan-stopped-test", tmp_path / "run", "vaegan-stop-job"
    args = ("--set", "tune.enabled=false", "--set", "train.epochs=20", "--set", f"register.model_name={model}",
            "--set", "register.experiment=deploy-test")
    out = submit(cluster, mlflow_server, run_dir, *args, wait=False, submission_id=job)
    assert out.returncode == 0, out.stderr
    # Well into training: a checkpoint written and recorded by Ray Train's controller. The job's status (a `ray` CLI process, seconds of CPU each) is
    # asked only every 20 s, to fail early should the job end before that.
    deadline, asked = time.time() + 300, time.time()
    while not registered_checkpoints(run_dir):
        assert time.time() < deadline, "no checkpoint was recorded within 300 s"
        if time.time() - asked > 20:
            assert job_status(cluster, job) in ("PENDING", "RUNNING"), "the job ended before its first checkpoint"
            asked = time.time()
        time.sleep(0.5)
    stop = ray_cli(cluster, "job", "stop", "--address", cluster["address"], job, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert job_status(cluster, job) == "STOPPED"

    visible = [p for p in run_dir.iterdir() if not p.name.startswith(".")]
    step_dirs = [p for p in visible if p.is_dir() and p.name != "ray"]
    assert sorted(p.name.split("-")[0] for p in step_dirs) == ["preprocess", "tune"]  # tune: done, disabled
    assert all((p / "outputs.json").is_file() for p in step_dirs)
    for checkpoint in (run_dir / "ray").rglob("checkpoint.pt"):
        assert torch.load(checkpoint, weights_only=True)["epoch"] >= 1
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST|not found"):
        MlflowClient(mlflow_server).get_registered_model(model)

    again = submit(cluster, mlflow_server, run_dir, *args, "--steps", "preprocess")
    assert again.returncode == 0, again.stdout[-2000:]
    assert "left half-written by an interrupted run" in again.stdout
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]


def test_submission_without_the_token_is_refused(cluster, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    no_token = {k: v for k, v in cluster["env"].items() if not k.startswith("RAY_AUTH")} | {"HOME": str(home)}
    wrong_token = {**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    for env in (no_token, wrong_token):
        out = ray_cli(cluster, "job", "submit", "--address", cluster["address"], "--submission-id", "intruder",
                      "--", "echo", "pwned", env=env, timeout=120)
        assert out.returncode != 0
        assert "401" in out.stdout + out.stderr or "uthenticat" in out.stdout + out.stderr
    listed = ray_cli(cluster, "job", "list", "--address", cluster["address"], timeout=60)
    assert listed.returncode == 0 and "intruder" not in listed.stdout

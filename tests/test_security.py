"""Credentials, end to end: the pipeline against a real ``mlflow server --app-name basic-auth`` on 127.0.0.1,
as a non-admin user whose password comes from the environment (MLflow's MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD) or from the tracking URI itself. A refused password stops the run before any
compute with one clear line; an accepted one is written nowhere: not in the CLI's output, the run folder,
Ray's session logs, nor any param, tag or artifact the run left in MLflow.
"""
from __future__ import annotations

import base64
import configparser
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, REPO, free_port, stop_group, wait_for_http

EXPERIMENT, MODEL, USER = "security", "vaegan-security", "pipeline-bot"
# The shortest run that still registers a model (a Tune trial would add 25 s and only another Ray Train run to
# grep): Ray Data, Ray Train with its storage and checkpoints, every MLflow call the pipeline makes.
RUN_ARGS = ("run", "--config", "pipelines/configs/smoke.yaml", "--set", f"register.experiment={EXPERIMENT}",
            "--set", f"register.model_name={MODEL}", "--set", "tune.enabled=false", "--set", "eval.baseline_vae=false")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A basic-auth MLflow server (own sqlite stores, admin from the environment) and one non-admin user."""
    root = tmp_path_factory.mktemp("auth-server")
    config = configparser.ConfigParser()
    # The credential cache as a production server would set it: without it every request pays a PBKDF2 hash
    # (0.2 s here), and a run of hundreds of logging calls and artifact uploads takes minutes longer.
    config["mlflow"] = {"default_permission": "READ", "database_uri": f"sqlite:///{root / 'users.db'}",
                        "admin_username": "admin", "auth_cache_ttl_seconds": "300",
                        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth"}
    with open(root / "auth.ini", "w") as f:
        config.write(f)
    admin_password, user_password = secrets.token_hex(16), secrets.token_hex(16)
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", 120, proc)
        assert api(uri, "users/create", {"username": USER, "password": user_password}, ("admin", admin_password)) == 200
        yield {"uri": uri, "user": USER, "password": user_password}
    finally:
        stop_group(proc)
        log.close()


def api(uri: str, endpoint: str, body: dict | None, auth: tuple[str, str] | None) -> int:
    """The HTTP status of one MLflow REST call (POST with ``body``, else GET), as ``auth`` or anonymous."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{endpoint}", headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def vaegan_run(run_dir: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    """``vaegan run`` with only the MLflow settings given here (none inherited from this process)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([str(BIN / "vaegan"), *RUN_ARGS, "--run-dir", str(run_dir), *extra], cwd=REPO,
                          capture_output=True, text=True, env={**base, **env}, timeout=600, check=False)


@pytest.fixture(scope="module")
def secured_runs(auth_server, tmp_path_factory):
    """The pipeline as the user, password from the environment; then again into the same run folder
    (every step but register cached) with the password inside ``register.tracking_uri``. Ray's session
    files go to a folder of our own (short: Ray's socket paths must fit 107 bytes) to be grepped."""
    run_dir = tmp_path_factory.mktemp("secured-run")
    ray_tmp = Path(tempfile.mkdtemp(prefix="vs-", dir="/tmp"))
    uri, user, password = auth_server["uri"], auth_server["user"], auth_server["password"]
    try:
        from_env = vaegan_run(run_dir, {"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": user,
                                        "MLFLOW_TRACKING_PASSWORD": password, "RAY_TMPDIR": str(ray_tmp)})
        assert from_env.returncode == 0, from_env.stdout[-3000:] + from_env.stderr[-3000:]
        summary_from_env = json.loads((run_dir / "summary.json").read_text())
        embedded = uri.replace("http://", f"http://{user}:{password}@")
        from_uri = vaegan_run(run_dir, {"RAY_TMPDIR": str(ray_tmp)}, "--set", f"register.tracking_uri={embedded}")
        assert from_uri.returncode == 0, from_uri.stdout[-3000:] + from_uri.stderr[-3000:]
        yield {"run_dir": run_dir, "ray_tmp": ray_tmp, "procs": [from_env, from_uri],
               "summaries": [summary_from_env, json.loads((run_dir / "summary.json").read_text())]}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@contextlib.contextmanager
def as_user(server: dict):
    """MLflow clients in this process use the server, as the pipeline's user, inside the block."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", server["uri"])
        patch.setenv("MLFLOW_TRACKING_USERNAME", server["user"])
        patch.setenv("MLFLOW_TRACKING_PASSWORD", server["password"])
        yield MlflowClient(server["uri"])


def test_pipeline_registers_with_credentials_from_the_environment(auth_server, secured_runs):
    uri = auth_server["uri"]
    assert api(uri, "experiments/search?max_results=1", None, None) == 401, "the server must refuse anonymous calls"
    summary = secured_runs["summaries"][0]
    assert summary["tracking_uri"] == uri and summary["model_uri"] == f"models:/{MODEL}@champion"
    assert all(step["status"] == "ran" for step in summary["steps"].values())
    with as_user(auth_server) as client:
        version = client.get_model_version_by_alias(MODEL, "champion")
        assert int(version.version) == summary["model_version"]


def test_credentials_inside_the_tracking_uri_work_and_are_stripped_from_it(auth_server, secured_runs):
    summary = secured_runs["summaries"][1]
    assert [step["status"] for step in summary["steps"].values()] == ["cached"] * 4 + ["ran"]
    assert summary["tracking_uri"] == auth_server["uri"], "summary.json keeps only the host"
    with as_user(auth_server) as client:
        version = client.get_model_version(MODEL, str(summary["model_version"]))
        pipelines = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                       filter_string="attributes.run_name = 'pipeline-smoke'",
                                       order_by=["attributes.start_time ASC"])
    assert summary["model_version"] == 2 and version.status == "READY"
    assert [run.data.params["register.tracking_uri"] for run in pipelines] == ["", auth_server["uri"]], \
        "the config key is logged with the host only"


def test_wrong_or_missing_credentials_stop_the_run_before_any_compute(auth_server, tmp_path):
    uri = auth_server["uri"]
    cases = [({"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(16)},
              f"the credentials of user '{USER}' were refused"),
             ({}, "it needs credentials and none were given")]
    run_dirs = [tmp_path / f"run-{i}" for i in range(len(cases))]
    with ThreadPoolExecutor() as pool:  # side by side: each is mostly the CLI's imports
        outs = list(pool.map(lambda case, run_dir: vaegan_run(run_dir, {"MLFLOW_TRACKING_URI": uri, **case[0]}),
                             cases, run_dirs))
    for (_, reason), run_dir, out in zip(cases, run_dirs, outs):
        assert out.returncode == 2, out.stderr[-3000:]
        assert out.stderr.splitlines() == [(f"error: MLflow tracking server {uri}: {reason} (HTTP 401 Unauthorized); "
                                            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of "
                                            "that server")]
        assert not list(run_dir.glob("*preprocess-*")), "nothing may be computed before the store answers"


def secret_forms(server: dict) -> list[bytes]:
    """The password as it could leak: bare, as ``user:password`` (a URL's userinfo), and as the basic-auth
    header's base64 of that."""
    pair = f"{server['user']}:{server['password']}".encode()
    return [server["password"].encode(), pair, base64.b64encode(pair)]


def leaked_files(folder: Path, forms: list[bytes]) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
            and any(form in p.read_bytes() for form in forms)]


def mlflow_records(client: MlflowClient, uri: str, dst: Path) -> bytes:
    """Every param and tag of every run and logged model of the experiment, and of the model versions,
    as text; every artifact (runs', logged models', versions') downloaded under ``dst``."""
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    texts = []
    for run in client.search_runs([experiment]):
        texts += [run.data.params, run.data.tags, run.info.artifact_uri]
        client.download_artifacts(run.info.run_id, "", str(dst / run.info.run_id))
    for model in client.search_logged_models([experiment]):
        texts += [model.params, model.tags, model.artifact_location]
        mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(dst / model.model_id),
                                            tracking_uri=uri)
    for version in client.search_model_versions(f"name = '{MODEL}'"):
        texts += [version.tags, version.source]
        mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri(MODEL, version.version),
                                            dst_path=str(dst / f"v{version.version}"), tracking_uri=uri)
    return json.dumps(texts, default=str).encode()


def test_no_credential_is_written_anywhere(auth_server, secured_runs, tmp_path):
    forms = secret_forms(auth_server)
    for proc in secured_runs["procs"]:
        assert not [form for form in forms if form in (proc.stdout + proc.stderr).encode()], "CLI output"
    assert leaked_files(secured_runs["run_dir"], forms) == [], "run folder: summary, logs, checkpoints, Ray storage"
    sessions = list((secured_runs["ray_tmp"] / "ray").glob("session_2*"))
    assert len(sessions) == 2 and all(list(s.glob("logs/*")) for s in sessions), "one local Ray per run, with logs"
    assert leaked_files(secured_runs["ray_tmp"], forms) == [], "Ray's session folders"
    with as_user(auth_server) as client:
        records = mlflow_records(client, auth_server["uri"], tmp_path / "artifacts")
    assert any(p.name == "checkpoint.pt" for p in (tmp_path / "artifacts").rglob("*")), \
        "the model's own files were downloaded and searched"
    assert not [form for form in forms if form in records], "MLflow params, tags or artifact locations"
    assert leaked_files(tmp_path / "artifacts", forms) == [], "MLflow artifacts"

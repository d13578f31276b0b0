"""Credentials, end to end: the pipeline against a real ``mlflow server --app-name basic-auth`` on 127.0.0.1,
as a non-admin user whose password comes from the environment (MLflow's MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD) or from the tracking URI itself. A refused password stops the run before any
compute with one clear line; an accepted one is written nowhere: not in the CLI's output, the run folder,
Ray's session logs, nor any param, tag or artifact the run left in MLflow.

The pipeline examined is the suite's full smoke run (conftest's ``smoke_run``, which test_pipeline checks
too): Ray Data, Tune trials, Ray Train with its storage and checkpoints, the VAE baseline, every MLflow call.
"""
from __future__ import annotations

import base64
import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import api, as_user, full_smoke

EXPERIMENT, MODEL = "vaegan", "vaegan-smoke"


@pytest.fixture(scope="module")
def secured_runs(auth_server, smoke_run):
    """The smoke run (password from the environment), then the same command into its run folder (every step
    but register cached) with the password inside ``register.tracking_uri`` instead."""
    uri, user, password = auth_server["uri"], auth_server["user"], auth_server["password"]
    embedded = uri.replace("http://", f"http://{user}:{password}@")
    from_uri = full_smoke(smoke_run["run_dir"], {"RAY_TMPDIR": str(smoke_run["ray_tmp"])},
                          "--set", f"register.tracking_uri={embedded}")
    assert from_uri.returncode == 0, from_uri.stdout[-3000:] + from_uri.stderr[-3000:]
    return {"run_dir": smoke_run["run_dir"], "ray_tmp": smoke_run["ray_tmp"], "procs": [smoke_run["first"], from_uri],
            "summaries": [smoke_run["summary"], json.loads((smoke_run["run_dir"] / "summary.json").read_text())]}


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
    assert summary["model_version"] > secured_runs["summaries"][0]["model_version"] and version.status == "READY"
    logged = [run.data.params["register.tracking_uri"] for run in pipelines]  # the smoke run's, its reruns', ours
    assert logged[0] == "" and logged[-1] == auth_server["uri"] and set(logged) == {"", auth_server["uri"]}, \
        "the config key is logged with the host only"


def test_wrong_or_missing_credentials_stop_the_run_before_any_compute(auth_server, tmp_path):
    uri = auth_server["uri"]
    user = auth_server["user"]
    cases = [({"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(16)},
              f"the credentials of user '{user}' were refused"),
             ({}, "it needs credentials and none were given")]
    run_dirs = [tmp_path / f"run-{i}" for i in range(len(cases))]
    with ThreadPoolExecutor() as pool:  # side by side: each is mostly the CLI's imports
        outs = list(pool.map(lambda case, run_dir: full_smoke(run_dir, {"MLFLOW_TRACKING_URI": uri, **case[0]}),
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
    # One local Ray per run into that folder (the smoke run, ours, and test_pipeline's reruns), each with logs.
    assert len(sessions) >= 2 and all(list(s.glob("logs/*")) for s in sessions), sessions
    assert leaked_files(secured_runs["ray_tmp"], forms) == [], "Ray's session folders"
    with as_user(auth_server) as client:
        records = mlflow_records(client, auth_server["uri"], tmp_path / "artifacts")
    assert any(p.name == "checkpoint.pt" for p in (tmp_path / "artifacts").rglob("*")), \
        "the model's own files were downloaded and searched"
    assert not [form for form in forms if form in records], "MLflow params, tags or artifact locations"
    assert leaked_files(tmp_path / "artifacts", forms) == [], "MLflow artifacts"

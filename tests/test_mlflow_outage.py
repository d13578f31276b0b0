"""The MLflow tracking server is down at the start, or goes down during training, on a real local Ray and a
real `mlflow server` that the test stops and starts again on the same port and backend store."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, REPO, free_port, run_cli
from mlflow.tracking import MlflowClient

from deploy.local_server import stop_group, wait_for_http

SMOKE = "pipelines/configs/smoke.yaml"


class RestartableServer:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_for_http(f"{self.uri}/health", 120, self.proc)

    def stop(self) -> None:
        stop_group(self.proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = RestartableServer(tmp_path_factory.mktemp("mlflow-outage"))
    server.start()
    yield server
    server.stop()


def start_run(run_dir: Path, uri: str, epochs: int, model_name: str, ray: dict[str, str]) -> subprocess.Popen:
    command = [str(BIN / "vaegan"), "run", "--config", SMOKE, "--run-dir", str(run_dir),
               "--set", "tune.enabled=false", "--set", "eval.baseline_vae=false", "--set", f"train.epochs={epochs}",
               "--set", "register.experiment=outage", "--set", f"register.model_name={model_name}"]
    # errors="replace": read while being written, it may end in a cut character
    log = open(run_dir.parent / f"{run_dir.name}-{time.time_ns()}.log", "w+", errors="replace")
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, **ray, "MLFLOW_TRACKING_URI": uri}, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while text not in output(proc):
        assert proc.poll() is None and time.time() < deadline, f"no {text!r}:\n{output(proc)[-3000:]}"
        time.sleep(0.2)


def train_runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("outage")
    return [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name.startswith("train-")]


def test_a_server_down_at_the_start_fails_before_any_compute(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    done = run_cli("run", "--config", SMOKE, "--run-dir", str(tmp_path), env={"MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"error: MLflow tracking store {uri} is not reachable" in done.stderr
    assert not [p for p in tmp_path.iterdir() if p.name != "mlflow.db"], "nothing may run before the check"


def test_a_server_that_comes_back_gets_the_buffered_figures(server, shared_ray, tmp_path):
    run = start_run(tmp_path / "run", server.uri, epochs=6, model_name="vaegan-outage-back", ray=shared_ray)
    wait_for_line(run, "[train] epoch 1")
    server.stop()
    wait_for_line(run, "is not answering")
    server.start()
    assert run.wait(timeout=600) == 0, output(run)[-4000:]
    assert "buffered figures sent" in output(run)
    client = MlflowClient(server.uri)
    folder = str((tmp_path / "run").resolve())  # the module's other test logs train runs to this server too
    (train,) = [r for r in train_runs(server.uri) if r.data.tags.get("vaegan.run_dir") == folder]
    assert sorted(m.step for m in client.get_metric_history(train.info.run_id, "val/fid")) == [1, 2, 3, 4, 5, 6]
    assert client.get_model_version_by_alias("vaegan-outage-back", "champion") is not None


def test_a_server_down_until_training_ends_fails_clearly_and_the_rerun_resumes(server, shared_ray, tmp_path):
    run_dir = tmp_path / "run"
    client = MlflowClient(server.uri)
    run = start_run(run_dir, server.uri, epochs=2, model_name="vaegan-outage-rerun", ray=shared_ray)
    wait_for_line(run, "[train] epoch 1")
    server.stop()
    assert run.wait(timeout=600) == 2, output(run)[-4000:]
    errors = [line for line in output(run).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"MLflow tracking server {server.uri} stopped answering" in errors[0], errors
    assert "Traceback" not in output(run)
    assert not list(run_dir.glob("train-*")), "the train step is not published without its MLflow record"

    server.start()
    assert not client.search_model_versions("name='vaegan-outage-rerun'"), "nothing was registered"
    rerun = start_run(run_dir, server.uri, epochs=2, model_name="vaegan-outage-rerun", ray=shared_ray)
    assert rerun.wait(timeout=600) == 0, output(rerun)[-4000:]
    assert "[train] resumed from epoch 2" in output(rerun), "the rerun trains nothing again"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"]["preprocess"]["status"] == "cached"
    folder = str(run_dir.resolve())
    oldest, newest = sorted((r for r in train_runs(server.uri) if r.data.tags.get("vaegan.run_dir") == folder),
                            key=lambda r: r.info.start_time)
    assert [m.step for m in client.get_metric_history(newest.info.run_id, "val/fid")] == [1, 2]
    # What the outage held back was spooled beside the checkpoints and reached the first attempt's own run,
    # which the rerun, like that attempt's pipeline run, found RUNNING and ended as KILLED.
    assert sorted(m.step for m in client.get_metric_history(oldest.info.run_id, "val/fid")) == [1, 2]
    assert client.get_run(oldest.info.run_id).info.status == "KILLED"
    assert "[mlflow] marked KILLED 2 runs" in output(rerun)
    assert not list((run_dir / "ray").glob("*.mlflow-unsent"))
    version = client.get_model_version_by_alias("vaegan-outage-rerun", "champion")
    assert int(version.version) == summary["model_version"]

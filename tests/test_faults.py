"""Faults the pipeline survives, on a real local Ray and a real `mlflow server`.

One run folder goes through three attempts of the same command: the driver is SIGKILLed during preprocess,
then again during training, and the third attempt has one of its Train workers SIGKILLed mid-epoch. It must
finish from the latest checkpoint each time, skip the steps that finished, and record what was redone.
Injected NaN losses (tests/hooks/nonfinite.py), armed on the test process's shared Ray head, must be skipped
and rolled back, or end the run with one clear error.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, REPO, session_pids, sigkill_session

from vaegan.checkpoint import CHECKPOINT_NAME, load_checkpoint

TRAIN_WORKER = "RayTrainWorker"  # the process title Ray gives a Train worker actor


def start(run_dir: Path, env: dict) -> subprocess.Popen:
    command = [str(BIN / "vaegan"), "run", "--config", "pipelines/configs/smoke.yaml", "--run-dir", str(run_dir),
               "--steps", "preprocess,tune,train", "--set", "tune.enabled=false", "--set", "train.epochs=2",
               "--set", "train.num_workers=2", "--set", "register.experiment=faults"]
    # errors="replace": read while being written, it may end in a cut character
    log = open(run_dir.parent / f"{run_dir.name}-attempt-{time.time_ns()}.log", "w+", errors="replace")
    # Its own session, so the kill below takes the driver together with the local Ray it started.
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the fault:\n{output(proc)[-3000:]}"
        time.sleep(0.1)
    raise TimeoutError(f"no fault point within {timeout}s:\n{output(proc)[-3000:]}")


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process of its session, the local Ray it started included."""
    sigkill_session(proc.pid)
    proc.wait()


def progress(run_dir: Path) -> dict:
    files = list((run_dir / "ray").glob("train-*.progress.json"))
    return json.loads(files[0].read_text()) if files else {}


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "ray").glob("train-*/checkpoint_*") if p.is_dir())


def registered_checkpoints(run_dir: Path) -> list[str]:
    """The checkpoints Ray Train's controller has recorded (its snapshot in the run's storage), which a rerun
    resumes from; a checkpoint folder appears before that record, and a kill between the two loses it."""
    snapshots = list((run_dir / "ray").glob("train-*/checkpoint_manager_snapshot.json"))
    with contextlib.suppress(IndexError, OSError, ValueError):  # not there yet, or being rewritten
        return [r["checkpoint_dir_name"] for r in json.loads(snapshots[0].read_text())["checkpoint_results"]]
    return []


@pytest.fixture(scope="module")
def attempts(tmp_path_factory, mlflow_server):
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    run_dir.mkdir()
    env = {"MLFLOW_TRACKING_URI": mlflow_server}

    first = start(run_dir, env)
    wait_for(lambda: list(run_dir.glob(".preprocess-*.tmp-*/split=*")), first)
    kill_session(first)
    after_first = sorted(p.name for p in run_dir.iterdir())

    second = start(run_dir, env)
    wait_for(lambda: registered_checkpoints(run_dir), second)
    # The step count at that moment comes from the ledger: the worker has trained on since it reported.
    at_checkpoint = progress(run_dir)["step"]
    wait_for(lambda: progress(run_dir)["step"] >= at_checkpoint + 3, second)
    killed_at_step = progress(run_dir)["step"]
    kill_session(second)
    preprocess_dir = next(run_dir.glob("preprocess-*"))
    preprocess_before = {p: p.stat().st_mtime_ns for p in preprocess_dir.rglob("*")}

    third = start(run_dir, env)
    resumed_at = wait_for(lambda: progress(run_dir).get("restarts") == 1 and progress(run_dir)["step"], third)
    wait_for(lambda: progress(run_dir)["step"] >= resumed_at + 3, third)
    workers = session_pids(third.pid, TRAIN_WORKER)  # this run's workers, not another Ray's on the host
    assert workers, "no Train worker process found"
    worker_killed_at = time.time()
    os.kill(workers[0], signal.SIGKILL)
    assert third.wait(timeout=600) == 0, output(third)[-4000:]
    return {"run_dir": run_dir, "after_first": after_first, "killed_at_step": killed_at_step,
            "preprocess_before": preprocess_before, "preprocess_dir": preprocess_dir, "third": output(third),
            "worker_killed_at": worker_killed_at, "summary": json.loads((run_dir / "summary.json").read_text())}


def test_a_driver_killed_in_preprocess_leaves_no_visible_step(attempts):
    visible = [name for name in attempts["after_first"] if not name.startswith(".")]
    assert not [name for name in visible if name.startswith("preprocess-")], visible


def test_the_rerun_skips_finished_steps(attempts):
    steps = attempts["summary"]["steps"]
    assert steps["preprocess"]["status"] == "cached" and steps["train"]["status"] == "ran"
    assert {p: p.stat().st_mtime_ns for p in attempts["preprocess_dir"].rglob("*")} == attempts["preprocess_before"]


def test_training_resumes_from_the_latest_checkpoint_not_from_scratch(attempts):
    assert "[train] resumed from epoch" in attempts["third"]
    line = next(x for x in attempts["third"].splitlines() if "[train] restart 1:" in x)
    assert "from step 0" not in line, line


def test_the_runs_a_killed_driver_left_running_are_ended_by_the_rerun(attempts, mlflow_server):
    from mlflow.tracking import MlflowClient
    mlflow_client = MlflowClient(mlflow_server)
    experiment = mlflow_client.get_experiment_by_name("faults").experiment_id
    folder = str(attempts["run_dir"].resolve())
    runs = [r for r in mlflow_client.search_runs([experiment], max_results=1000)
            if r.data.tags.get("vaegan.run_dir") == folder]
    # Attempt 1 died in preprocess (its pipeline run), attempt 2 in training (its pipeline and train runs).
    assert sorted((r.info.run_name.split("-")[0], r.info.status) for r in runs) == [
        ("pipeline", "FINISHED"), ("pipeline", "KILLED"), ("pipeline", "KILLED"), ("train", "FINISHED"),
        ("train", "KILLED")]
    assert "[mlflow] marked KILLED 2 runs an interrupted driver left RUNNING" in attempts["third"]
    assert not list((attempts["run_dir"] / "ray").glob("*.mlflow-unsent"))  # no outage, so nothing spooled


def test_a_killed_worker_is_replaced_and_the_run_records_what_was_redone(attempts):
    faults = attempts["summary"]["train_faults"]
    assert faults["restarts"] == 2  # the rerun of the killed driver, then the killed worker
    assert faults["steps_redone"] >= 3 + 3  # at least the steps past each checkpoint before each kill
    assert 0 < faults["recovery_seconds"] < 300
    assert "[train] restart 2:" in attempts["third"]


def test_both_ranks_end_every_epoch_with_the_same_weights(attempts):
    """Each rank digests every tensor it would checkpoint; rank 0 reports how many digests differ from its own,
    over the epochs before the kills and after each restart alike."""
    history = json.loads(next(attempts["run_dir"].glob("train-*/history.json")).read_text())
    assert [epoch["epoch"] for epoch in history] == [1, 2]  # every epoch trained, whichever was the best
    assert [epoch["ddp/ranks_out_of_sync"] for epoch in history] == [0.0] * len(history)


def test_no_checkpoint_is_lost_or_half_written(attempts):
    run_dir = attempts["run_dir"]
    kept = checkpoints(run_dir)
    assert kept, "Ray's storage holds the run's checkpoints"
    for folder in kept:
        state = load_checkpoint(folder / CHECKPOINT_NAME)  # weights_only: a half-written file fails here
        assert state["step"] > 0
    assert not [p for p in run_dir.rglob("*.tmp") if p.is_file()]
    assert not list(run_dir.glob(".*.tmp-*"))
    final = load_checkpoint(next(run_dir.glob("train-*")) / CHECKPOINT_NAME)
    assert len(json.loads(final["history"])) >= 1


@pytest.fixture(scope="module")
def nan_run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("nan-run")


def run_injected(run_dir: Path, mlflow_server: str, ray: dict[str, str], poisoned: tuple[int, int], *overrides: str):
    """The train step on the shared Ray head, with the losses of train steps [start, start + steps) made NaN
    (tests/hooks/nonfinite.py)."""
    from conftest import POISON_FILE, run_cli
    from hooks.nonfinite import armed
    args = ["run", "--config", "pipelines/configs/smoke.yaml", "--run-dir", str(run_dir), "--steps",
            "preprocess,tune,train", "--set", "tune.enabled=false", "--set", "register.experiment=faults",
            "--set", "train.max_bad_steps=3", "--set", "train.max_failures=0"]
    for override in overrides:
        args += ["--set", override]
    with armed(POISON_FILE, *poisoned):
        return run_cli(*args, env={"MLFLOW_TRACKING_URI": mlflow_server, **ray})


def test_injected_non_finite_losses_are_skipped_counted_and_rolled_back(nan_run_dir, mlflow_server, shared_ray):
    done = run_injected(nan_run_dir, mlflow_server, shared_ray, (5, 4))
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads(next(nan_run_dir.glob("train-*/history.json")).read_text())
    assert history[-1]["guard/nonfinite_skipped"] == 4  # 3 in a row trigger the rollback, the 4th is skipped after it
    assert history[-1]["guard/rollbacks"] == 1
    assert all(math.isfinite(history[-1][k]) for k in ("loss/enc/kl", "loss/dec/pixel", "val/fid"))


def test_a_persistent_divergence_fails_clearly_after_the_allowed_rollbacks(nan_run_dir, mlflow_server, shared_ray):
    published = {p: p.stat().st_mtime_ns for p in nan_run_dir.glob("*-*/**/*")}
    done = run_injected(nan_run_dir, mlflow_server, shared_ray, (0, 100000), "train.max_rollbacks=2")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.max_rollbacks=2" in errors[0] and "train.max_bad_steps=3" in errors[0], errors
    assert {p: p.stat().st_mtime_ns for p in published} == published, "earlier steps' files are untouched"
    assert len(list(nan_run_dir.glob("train-*"))) == len([p for p in published if p.parent.name.startswith("train-")
                                                          and p.name == "outputs.json"]), "no diverged train step"

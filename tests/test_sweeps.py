"""Population-based training and synchronous successive halving through the real CLI on the smoke config, joined
to the test process's Ray head and logging to a real `mlflow server`: `vaegan run --steps preprocess,tune,train
--set tune.scheduler=pbt` and `vaegan sweep --set tune.scheduler=sha` (the two-objective Optuna search is the
suite's full smoke run's, checked in test_pipeline.py).

PBT runs a population of 2 for 2 epochs with a decision after epoch 1: PBT is synchronous, so the worse trial
always takes over the better one's checkpoint. The train step then continues the winner's model for one more
epoch. SHA runs 3 trials to its rung at epoch 1, and the best 2 on to epoch 2.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import run_cli

from tune.trial import DONOR, PARAM
from vaegan.checkpoint import CHECKPOINT_NAME, load_checkpoint

SMOKE = "pipelines/configs/smoke.yaml"


def sweep_args(run_dir: Path, *overrides: str) -> list[str]:
    sets = [part for override in ("register.experiment=sweeps", *overrides) for part in ("--set", override)]
    return ["--config", SMOKE, "--run-dir", str(run_dir), *sets]


def trial_reports(tune_dir: Path) -> dict[str, list[dict]]:
    """Every report each trial made to Tune, by trial id (the sweep report's history.csv)."""
    reports: dict[str, list[dict]] = {}
    with open(tune_dir / "history.csv") as f:
        for row in csv.DictReader(f):
            values = {k: v if k in ("trial", DONOR) else float(v) for k, v in row.items() if v != ""}
            reports.setdefault(row["trial"], []).append(values)
    return reports


@pytest.fixture(scope="module")
def pbt(tmp_path_factory, mlflow_server, shared_ray):
    run_dir = tmp_path_factory.mktemp("pbt") / "run"
    env = {"MLFLOW_TRACKING_URI": mlflow_server, **shared_ray}
    args = sweep_args(run_dir, "tune.scheduler=pbt", "tune.num_samples=2", "tune.max_epochs=2", "train.epochs=3")
    trained = run_cli("run", *args, "--steps", "preprocess,tune,train", env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    return {"run_dir": run_dir, "trained": trained,
            "reports": trial_reports(next(run_dir.glob("tune-*")))}


def test_a_pbt_trial_that_exploits_another_continues_from_the_donors_checkpoint(pbt):
    reports = pbt["reports"]
    exploits = [(trial, r) for trial, rows in reports.items() for r in rows if r.get(DONOR)]
    assert exploits, f"no exploit in {[(t, [r['epoch'] for r in rows]) for t, rows in reports.items()]}"
    for trial, report in exploits:
        donor_at_checkpoint = next(r for r in reports[report[DONOR]] if r["epoch"] == report["epoch"] - 1)
        # Its first step after the exploit is the step of the donor's checkpoint, not 0: it continued.
        assert report["step/first"] == donor_at_checkpoint["step/last"] > 0
        # Its Train run started from the donor's model: its history opens with the donor's epochs (the two trials'
        # first epochs differ, as their learning rates do).
        donor_fid = next(r for r in reports[report[DONOR]] if r["epoch"] == 1)["val/fid"]
        own_fid = next(r for r in reports[trial] if r["epoch"] == 1)["val/fid"]
        segments = (pbt["run_dir"] / "ray").glob(f"trial-*-{trial}-*/checkpoint_*/{CHECKPOINT_NAME}")
        opening = [json.loads(load_checkpoint(path)["history"])[0]["val/fid"] for path in segments]
        assert donor_fid != own_fid and donor_fid in opening, (donor_fid, own_fid, opening)
        # ...and explores: its loss weights and learning rates are the donor's, perturbed.
        params = [k for k in report if k.startswith(PARAM)]
        assert params and any(report[k] != donor_at_checkpoint[k] for k in params)


def test_the_pbt_report_plots_the_population_and_the_train_step_continues_the_winner(pbt):
    tune_dir = next(pbt["run_dir"].glob("tune-*"))
    assert (tune_dir / "pbt.png").read_bytes()[:4] == b"\x89PNG"
    outputs = json.loads((tune_dir / "outputs.json").read_text())
    winner = load_checkpoint(tune_dir / outputs["checkpoint"] / CHECKPOINT_NAME)
    assert winner["epoch"] == 2
    history = json.loads(next(pbt["run_dir"].glob("train-*/history.json")).read_text())
    assert len(history) == 3  # the winner's 2 epochs, then 1 of the train step's own
    assert history[2]["step/first"] == winner["step"] > 0
    assert history[:2] == json.loads(winner["history"])
    assert "[train] started from" in pbt["trained"].stdout + pbt["trained"].stderr


@pytest.fixture(scope="module")
def sha(tmp_path_factory, mlflow_server, shared_ray):
    run_dir = tmp_path_factory.mktemp("sha") / "run"
    env = {"MLFLOW_TRACKING_URI": mlflow_server, **shared_ray}
    swept = run_cli("sweep", *sweep_args(run_dir, "tune.scheduler=sha", "tune.num_samples=3", "tune.max_epochs=2"),
                    env=env)
    assert swept.returncode == 0, swept.stderr[-3000:]
    return trial_reports(next(run_dir.glob("tune-*")))


def test_successive_halving_stops_the_worst_trial_at_its_rung_and_the_rest_resume_their_own_checkpoints(sha):
    epochs = {trial: [r["epoch"] for r in rows] for trial, rows in sha.items()}
    assert sorted(epochs.values()) == [[1.0], [1.0, 2.0], [1.0, 2.0]], epochs  # 3 + 2 trial-epochs
    at_rung = {trial: rows[0]["val/fid"] for trial, rows in sha.items()}
    stopped = next(trial for trial, done in epochs.items() if done == [1.0])
    assert at_rung[stopped] == max(at_rung.values())
    for rows in sha.values():
        if len(rows) == 2:  # paused after epoch 1, then a new Train run from that epoch's checkpoint
            assert rows[1]["step/first"] == rows[0]["step/last"] > 0

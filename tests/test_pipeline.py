"""The smoke DAG end to end against a real local Ray and a real `mlflow server` (basic auth) on 127.0.0.1."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import FULL_SMOKE, as_user, run_cli

from tune.objectives import pareto_front

SUMMARY_KEYS = {"tracking_uri", "model_uri", "model_name", "model_version", "alias_moved", "image_shape",
                "metrics", "feature_net", "data_fingerprint", "steps"}
METRIC_KEYS = {"fid", "kid", "precision", "recall", "recon_mse", "elbo", "iwae_nll", "active_units"}
STEPS = ["preprocess", "tune", "train", "evaluate", "register"]
# The run itself is conftest's smoke_run (FULL_SMOKE: 2 trials, the VAE baseline, loss.gamma given), made against
# the basic-auth server as its non-admin user, which test_security shares.


def test_summary_contract(smoke_run, auth_server):
    run_dir, summary, first = smoke_run["run_dir"], smoke_run["summary"], smoke_run["first"]
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["tracking_uri"] == auth_server["uri"]
    assert summary["model_uri"] == "models:/vaegan-smoke@champion" and summary["alias_moved"] is True
    assert summary["model_name"] == "vaegan-smoke" and summary["model_version"] == 1
    assert summary["image_shape"] == [1, 28, 28]
    assert METRIC_KEYS <= summary["metrics"].keys() and "elbo_gap" in summary["metrics"]
    assert all(isinstance(v, float) for v in summary["metrics"].values())
    assert summary["feature_net"] == f"domain-cnn@{summary['data_fingerprint']}"
    assert list(summary["steps"]) == STEPS
    assert all(s["status"] == "ran" and s["seconds"] > 0 for s in summary["steps"].values())
    # Progress is visible: one line per epoch with throughput, and the tune table.
    assert "[train] epoch 1" in first.stdout + first.stderr and "images/s=" in first.stdout + first.stderr
    train_dir = run_dir / f"train-{summary['steps']['train']['key']}"
    for png in ("samples.png", "reconstructions.png", "interpolation.png", "loss_curves.png"):
        assert (train_dir / png).read_bytes()[:4] == b"\x89PNG"
    tune_dir = run_dir / f"tune-{summary['steps']['tune']['key']}"
    assert len((tune_dir / "trials.csv").read_text().splitlines()) == 1 + 2  # header + FULL_SMOKE's 2 trials
    # The sweep chose the open keys and left the given one: the model trained with the user's loss.gamma.
    assert summary["sweep"]["left_as_given"] == ["loss.gamma"]
    assert "loss.gamma" not in summary["sweep"]["chose"] and "opt_dec.lr" in summary["sweep"]["chose"]
    train_outputs = json.loads((train_dir / "outputs.json").read_text())
    assert train_outputs["config"]["loss"]["gamma"] == 2.0
    assert train_outputs["config"]["opt_dec"]["lr"] == summary["sweep"]["chose"]["opt_dec.lr"]
    assert "[tune] leaving loss.gamma=2.0 as given" in first.stdout + first.stderr
    assert not list(run_dir.glob(".*.tmp-*")), "no half-written step folder may remain"


def test_mlflow_holds_parent_and_child_runs(smoke_run, auth_server):
    with as_user(auth_server) as client:
        runs = client.search_runs([client.get_experiment_by_name("vaegan").experiment_id])
        # The first pipeline run of the experiment is the fixture's (the tests' reruns come after it).
        parent = min((r for r in runs if r.info.run_name == "pipeline-smoke"), key=lambda r: r.info.start_time)
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        names = sorted(r.info.run_name.split("-")[0] for r in children)
        assert names == ["baseline", "train", "trial", "trial"]  # FULL_SMOKE asks for the VAE baseline too
        train_run = next(r for r in children if r.info.run_name.startswith("train-"))
        assert "val/fid" in train_run.data.metrics and "loss/enc/kl" in train_run.data.metrics
        assert train_run.data.params["model.kind"] == "vaegan"
        artifacts = {a.path for a in client.list_artifacts(train_run.info.run_id)}
        assert {"samples.png", "reconstructions.png", "epoch_001"} <= artifacts
        assert "test/fid" in parent.data.metrics
        assert all(r.info.status == "FINISHED" for r in children), "trials Tune tore down are closed too"
        tune_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/trials.csv", "tune/trials.md", "tune/trials.png"} <= tune_artifacts


LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import mlflow, numpy as np
    model = mlflow.pyfunc.load_model(sys.argv[1])
    empty = np.zeros((0, 1, 28, 28), np.float32)
    a = model.predict(empty, params={"mode": "sample", "num_samples": 16, "seed": 0})
    b = model.predict(empty, params={"mode": "sample", "num_samples": 16, "seed": 0})
    c = model.predict(empty, params={"mode": "sample", "num_samples": 16, "seed": 1})
    f = model.predict(empty, params={"mode": "sample", "num_samples": 16, "seed": 0, "prior": "fitted"})
    z = model.predict(a, params={"mode": "encode"})
    r = model.predict(a, params={"mode": "reconstruct"})
    print(json.dumps({"sample": [list(a.shape), str(a.dtype), float(a.min()), float(a.max())],
                      "same_seed_equal": bool(np.array_equal(a, b)), "other_seed_differs": bool(not np.array_equal(a, c)),
                      "fitted_prior": [list(f.shape), bool(not np.array_equal(a, f))],
                      "encode": [list(z.shape), str(z.dtype)],
                      "reconstruct": [list(r.shape), str(r.dtype), float(r.min()), float(r.max())]}))
""")


def test_registered_model_serves_all_modes_in_a_fresh_process(smoke_run, auth_server, tmp_path):
    summary = smoke_run["summary"]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": auth_server["uri"],
           "MLFLOW_TRACKING_USERNAME": auth_server["user"], "MLFLOW_TRACKING_PASSWORD": auth_server["password"],
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, summary["model_uri"]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["sample"][:2] == [[16, 1, 28, 28], "float32"] and 0 <= out["sample"][2] and out["sample"][3] <= 1
    assert out["same_seed_equal"] and out["other_seed_differs"]
    assert out["fitted_prior"] == [[16, 1, 28, 28], True]  # the train step fitted it; it travels in the checkpoint
    assert out["encode"] == [[16, 16], "float32"]  # smoke.yaml's latent_dim
    assert out["reconstruct"][:2] == [[16, 1, 28, 28], "float32"]
    assert 0 <= out["reconstruct"][2] and out["reconstruct"][3] <= 1


def test_sweep_verb_writes_the_report(smoke_run):
    run_dir, env, summary = smoke_run["run_dir"], smoke_run["env"], smoke_run["summary"]
    done = run_cli("sweep", "--config", "pipelines/configs/smoke.yaml", "--run-dir", str(run_dir), *FULL_SMOKE,
                   env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    tune_dir = run_dir / f"tune-{summary['steps']['tune']['key']}"
    assert f"sweep report: {tune_dir / 'trials.md'}" in done.stdout  # same config: the sweep is reused
    lines = (tune_dir / "trials.md").read_text().splitlines()
    header, rows = lines[0], lines[2:]  # lines[1] is the markdown rule
    assert "val/fid" in header and "epochs" in header and "opt_dec.lr" in header and len(rows) == 2
    assert "loss.gamma" not in header  # given with --set, so not searched
    assert (tune_dir / "trials.png").read_bytes()[:4] == b"\x89PNG"


def test_a_two_objective_optuna_sweep_reports_its_pareto_front(smoke_run):
    """FULL_SMOKE's sweep: Optuna's sampler on val/fid and val/recon_mse."""
    tune_dir = smoke_run["run_dir"] / f"tune-{smoke_run['summary']['steps']['tune']['key']}"
    objectives = ["val/fid", "val/recon_mse"]
    trials, front = read_rows(tune_dir / "trials.csv", objectives), read_rows(tune_dir / "pareto.csv", objectives)
    assert len(trials) == 2 and front
    assert [int(t["epochs"]) for t in trials] == [1, 1]  # smoke.yaml's tune.max_epochs, counted per trial
    for point in front:  # no trial is at least as good on both and better on one
        assert not [t for t in trials if all(t[m] <= point[m] for m in objectives)
                    and any(t[m] < point[m] for m in objectives)], point
    assert {r["trial"] for r in front} == {r["trial"] for r in pareto_front(trials, objectives)}
    assert (tune_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # The winner (whose values the train step used) is on the front.
    chose = smoke_run["summary"]["sweep"]["chose"]
    assert any(all(float(t[k]) == pytest.approx(v) for k, v in chose.items()) for t in front), chose


def read_rows(path: Path, objectives: list[str]) -> list[dict]:
    with open(path) as f:
        return [{**row, **{m: float(row[m]) for m in objectives}} for row in csv.DictReader(f)]


def test_evaluate_verb_scores_the_registered_model_like_the_pipeline(smoke_run, auth_server, tmp_path):
    run_dir, env, summary = smoke_run["run_dir"], smoke_run["env"], smoke_run["summary"]
    out = tmp_path / "evaluation"
    done = run_cli("evaluate", "--model", "models:/vaegan-smoke@champion", "--data", str(run_dir), "--n", "128",
                   "--out", str(out), "--log", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= report["metrics"].keys() and report["num_images"] == 128
    assert report["feature_net"] == summary["feature_net"] and report["seeds"] == {"samples": 0, "iwae": 0}
    # Same checkpoint, images, feature net and sampling seed as the pipeline's evaluate step.
    for key in ("fid", "kid", "precision", "recall", "recon_mse", "active_units"):
        assert report["metrics"][key] == pytest.approx(summary["metrics"][key], rel=1e-5, abs=1e-6), key
    for png in ("samples.png", "reconstructions.png", "interpolation.png", "loss_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and png in report["pngs"]
    with as_user(auth_server) as client:
        logged = {a.path for a in client.list_artifacts(report["logged_to_run"], "evaluate-test")}
        assert "evaluate-test/fid" in client.get_run(report["logged_to_run"]).data.metrics
    assert {"evaluate-test/metrics.json", "evaluate-test/loss_curves.png"} <= logged


def test_rerun_is_cached_and_force_reruns_downstream(smoke_run, auth_server):
    run_dir, args, env, summary = smoke_run["run_dir"], smoke_run["args"], smoke_run["env"], smoke_run["summary"]
    again = run_cli(*args, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    cached = json.loads((run_dir / "summary.json").read_text())
    assert all(cached["steps"][s]["status"] == "cached" for s in STEPS)
    assert cached["model_version"] == summary["model_version"]
    # Nothing to run, so the driver read the step folders itself and started no Ray.
    assert "nothing to run, so no Ray is started" in again.stdout
    assert "Started a local Ray instance" not in again.stdout + again.stderr

    with as_user(auth_server) as client:
        latest = max(int(v.version) for v in client.search_model_versions("name = 'vaegan-smoke'"))
    forced = run_cli(*args, "--force", "evaluate", env=env)
    assert forced.returncode == 0, forced.stderr[-3000:]
    result = json.loads((run_dir / "summary.json").read_text())
    statuses = {s: result["steps"][s]["status"] for s in STEPS}
    assert statuses == {"preprocess": "cached", "tune": "cached", "train": "cached",
                        "evaluate": "ran", "register": "ran"}
    # The same checkpoint scored again does not beat itself: a new version, the alias stays.
    assert result["model_version"] == latest + 1
    assert result["alias_moved"] is False
    assert result["model_uri"] == f"models:/vaegan-smoke/{result['model_version']}"

"""Training's MLflow logger and the driver's run bookkeeping against a real `mlflow server`: a call the server
rejects is dropped, not mistaken for an outage that holds back every later figure; what an outage holds back
outlives rank 0; a rerun ends the runs a killed driver left RUNNING."""
from __future__ import annotations

import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient

from pipelines import tracking


def test_a_rejected_call_is_dropped_and_the_rest_are_sent(mlflow_server, tmp_path, capsys):
    experiment = tracking.ensure_experiment(mlflow_server, "logger-test", tmp_path)
    run_id = tracking.start_run(mlflow_server, experiment, "train", params={"train.num_nodes": 1})
    logger = tracking.BufferedRunLogger(mlflow_server, run_id, enabled=True)
    # A resumed run on two nodes re-logs train.num_nodes with another value: MLflow answers 400
    # INVALID_PARAMETER_VALUE (a param never changes), a rejection and no outage.
    logger.log_nodes(["node-a", "node-b"])
    logger.log_epoch({"loss/enc/kl": 1.5}, 1, [])
    logger.log_epoch({"loss/enc/kl": 1.25}, 2, [])
    assert logger.unsent() == 0
    history = MlflowClient(mlflow_server).get_metric_history(run_id, "loss/enc/kl")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 1.25)]
    assert MlflowClient(mlflow_server).get_run(run_id).data.tags["train.node_ids"] == "node-a,node-b"
    lines = [line for line in capsys.readouterr().out.splitlines() if "MLflow" in line]
    assert len(lines) == 1 and "rejected" in lines[0] and "INVALID_PARAMETER_VALUE" in lines[0], lines
    assert "not answering" not in lines[0]


def test_a_rerun_ends_the_runs_a_killed_driver_left_running_and_no_others(mlflow_server, tmp_path):
    experiment = tracking.ensure_experiment(mlflow_server, "orphans-test", tmp_path)
    folder, other = str(tmp_path / "run"), str(tmp_path / "another-run")
    parent = tracking.start_run(mlflow_server, experiment, "pipeline-smoke", run_dir=folder)
    child = tracking.start_run(mlflow_server, experiment, "train-abc", parent, run_dir=folder)
    done = tracking.start_run(mlflow_server, experiment, "register-abc", parent, run_dir=folder)
    tracking.end_run(mlflow_server, done)
    elsewhere = tracking.start_run(mlflow_server, experiment, "pipeline-smoke", run_dir=other)
    assert sorted(tracking.close_left_running(mlflow_server, experiment, folder)) == ["pipeline-smoke", "train-abc"]
    status = {run_id: MlflowClient(mlflow_server).get_run(run_id).info.status
              for run_id in (parent, child, done, elsewhere)}
    assert status == {parent: "KILLED", child: "KILLED", done: "FINISHED", elsewhere: "RUNNING"}


def test_a_second_driver_cannot_take_a_run_folder_in_use(tmp_path):
    from pipelines.pipeline import holding_run_dir
    from vaegan.config import ConfigError
    with holding_run_dir(tmp_path):
        with pytest.raises(ConfigError, match="in use by another `vaegan` run"):
            with holding_run_dir(tmp_path):
                pass
    with holding_run_dir(tmp_path):  # released when the holder ends
        pass
    assert list(tmp_path.iterdir()) == []  # no lock file left in the run folder


def test_figures_held_back_by_an_outage_outlive_rank_0(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the dead server below fails at once
    experiment = tracking.ensure_experiment(mlflow_server, "spool-test", tmp_path)
    run_id = tracking.start_run(mlflow_server, experiment, "train")
    spool, png = tmp_path / "ray" / "train-abc.mlflow-unsent", tmp_path / "grids" / "samples.png"
    png.parent.mkdir()
    png.write_bytes(b"not really a png")
    dead = tracking.BufferedRunLogger(f"http://127.0.0.1:{free_port()}", run_id, enabled=True, spool=spool)
    dead.log_epoch({"loss/enc/kl": 1.5}, 1, [png])
    assert dead.unsent() == 2 and (spool / "pending.json").is_file() and not png.exists()  # the grid moved in
    del dead  # rank 0 dies during the outage; the restarted one finds the spool
    restarted = tracking.BufferedRunLogger(mlflow_server, run_id, enabled=True, spool=spool)
    assert restarted.unsent() == 2
    restarted.log_epoch({"loss/enc/kl": 1.25}, 2, [])
    assert restarted.unsent() == 0 and not spool.exists()
    mlflow_client = MlflowClient(mlflow_server)
    history = mlflow_client.get_metric_history(run_id, "loss/enc/kl")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 1.25)]
    assert [a.path for a in mlflow_client.list_artifacts(run_id, "epoch_001")] == ["epoch_001/samples.png"]

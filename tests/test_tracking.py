"""Training's MLflow logger against a real `mlflow server`: a call the server rejects is dropped, not
mistaken for an outage that holds back every later figure."""
from __future__ import annotations

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

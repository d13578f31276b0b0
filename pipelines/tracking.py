"""MLflow plumbing shared by the steps: the tracking URI, the experiment, the runs, and artifacts.

Default store: an sqlite database inside the run folder, created once by the driver before any
step starts (so trials never race to create its schema). Any tracking URI works instead,
e.g. a real ``mlflow server``; it is checked before any compute is spent.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from .config import PipelineConfig

PARENT_TAG = "mlflow.parentRunId"


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be used; says which URI and why."""


def resolve_tracking_uri(cfg: PipelineConfig, run_dir: Path) -> str:
    return (cfg.register.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")


def ensure_experiment(uri: str, name: str, run_dir: Path) -> str:
    """The experiment's id, creating it (with artifacts under the run folder for local stores)."""
    client = MlflowClient(uri)
    try:
        experiment = client.get_experiment_by_name(name)
    except Exception as err:  # the client raises many kinds; all mean "cannot talk to the store"
        raise TrackingError(f"MLflow tracking store {uri} is not reachable: {err}") from err
    if experiment is not None:
        return experiment.experiment_id
    location = (run_dir / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=location)


def start_run(uri: str, experiment_id: str, name: str, parent_run_id: str = "",
              params: dict[str, Any] | None = None) -> str:
    """Create a (child) run and return its id; the run stays open until ``end_run``."""
    client = MlflowClient(uri)
    tags = {PARENT_TAG: parent_run_id} if parent_run_id else {}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    client = MlflowClient(uri)
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[start:start + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    client = MlflowClient(uri)
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value), step=step)


def log_artifacts(uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    client = MlflowClient(uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(uri).set_terminated(run_id, status=status)


def close_children(uri: str, experiment_id: str, parent_run_id: str, name_prefix: str,
                   finished: set[str]) -> None:
    """Mark the child runs named ``name_prefix*`` FINISHED if their name is in ``finished``, else FAILED."""
    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`{PARENT_TAG}` = '{parent_run_id}' AND attributes.run_name LIKE '{name_prefix}%'"))
    for run in runs:
        client.set_terminated(run.info.run_id, status="FINISHED" if run.info.run_name in finished else "FAILED")

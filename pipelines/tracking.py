"""MLflow plumbing shared by the steps: the tracking URI, the experiment, the runs, and artifacts.

Default store: an sqlite database inside the run folder, created once by the driver before any
step starts (so trials never race to create its schema). Any tracking URI works instead,
e.g. a real ``mlflow server``; it is checked before any compute is spent.
"""
from __future__ import annotations

import contextlib
import functools
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vaegan.errors import UserError

from .config import PipelineConfig

T = TypeVar("T")
PARENT_TAG = "mlflow.parentRunId"


class TrackingError(UserError, RuntimeError):
    """The MLflow tracking server cannot be used; says which URI and why."""


def names_an_unreachable_server(call: Callable[..., T]) -> Callable[..., T]:
    """Turn "the server is gone" inside ``call(uri, ...)`` into one TrackingError that names the server
    and says what to do, instead of a client traceback several layers deep."""
    @functools.wraps(call)
    def wrapper(uri: str, *args: Any, **kwargs: Any) -> T:
        try:
            return call(uri, *args, **kwargs)
        except (MlflowException, requests.exceptions.ConnectionError) as err:
            if isinstance(err, MlflowException) and "API request to" not in str(err):
                raise  # the server answered: a real MLflow error, not an outage
            raise TrackingError(f"MLflow tracking server {uri} stopped answering during the run "
                                f"({type(err).__name__}); the finished steps and checkpoints are kept: rerun the "
                                "same command once it is back") from err
    return wrapper


def resolve_tracking_uri(cfg: PipelineConfig, run_dir: Path) -> str:
    """The tracking URI, without credentials in it.

    A ``user:password@`` in an http(s) URI moves to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD,
    MLflow's own way to authenticate, which every client of this process and of the local Ray it starts
    reads. The URI travels on into summary.json, Ray task arguments, Train's config and MLflow's "View run"
    lines, and ``cfg.register.tracking_uri`` into the run's params, so both keep only the host.
    """
    uri = (cfg.register.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
           or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    if os.environ.get("RAY_ADDRESS"):
        raise TrackingError(f"the tracking URI {bare} has credentials in it, which the workers of the Ray cluster "
                            "at RAY_ADDRESS never see; give them as MLFLOW_TRACKING_USERNAME and "
                            "MLFLOW_TRACKING_PASSWORD in the job's environment instead")
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password or "")
    if cfg.register.tracking_uri:
        cfg.register.tracking_uri = bare
    else:
        os.environ["MLFLOW_TRACKING_URI"] = bare
    return bare


def ensure_experiment(uri: str, name: str, run_dir: Path) -> str:
    """The experiment's id, creating it (with artifacts under the run folder for local stores)."""
    client = MlflowClient(uri)
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = (run_dir / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
        return client.create_experiment(name, artifact_location=location)
    except Exception as err:  # the client raises many kinds; all mean "cannot use the store"
        raise TrackingError(_refusal(uri, name, err)) from err


def _refusal(uri: str, experiment: str, err: Exception) -> str:
    """Why the store at ``uri`` could not be used, naming the credentials when the server refused them."""
    status = err.get_http_status_code() if isinstance(err, MlflowException) else None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401:
        given = f"the credentials of user {user!r} were refused" if user else "it needs credentials and none were given"
        return (f"MLflow tracking server {uri}: {given} (HTTP 401 Unauthorized); set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD to a user of that server")
    if status == 403:
        return (f"MLflow tracking server {uri}: user {user!r} may not use experiment {experiment!r} "
                "(HTTP 403 Forbidden); ask its admin for a permission on it, or pick another register.experiment")
    return f"MLflow tracking store {uri} is not reachable: {err}"


@names_an_unreachable_server
def start_run(uri: str, experiment_id: str, name: str, parent_run_id: str = "",
              params: dict[str, Any] | None = None) -> str:
    """Create a (child) run and return its id; the run stays open until ``end_run``."""
    client = MlflowClient(uri)
    tags = {PARENT_TAG: parent_run_id} if parent_run_id else {}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


@names_an_unreachable_server
def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    client = MlflowClient(uri)
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[start:start + 100])


@names_an_unreachable_server
def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    client = MlflowClient(uri)
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value), step=step)


@names_an_unreachable_server
def log_artifacts(uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    client = MlflowClient(uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


@names_an_unreachable_server
def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(uri).set_terminated(run_id, status=status)


def end_run_if_reachable(uri: str, run_id: str, status: str) -> None:
    """Mark a run that is failing anyway; a server that is gone cannot hear it, and the error that made the
    run fail is the one to report."""
    with contextlib.suppress(TrackingError):
        end_run(uri, run_id, status)


def bounded_retries() -> dict[str, str]:
    """MLflow's client retries a dead server for minutes per call by default; a pipeline step should say
    the server is gone within seconds. Sets the defaults here and returns them for Ray's workers."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    return {name: os.environ[name] for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")}


@names_an_unreachable_server
def close_children(uri: str, experiment_id: str, parent_run_id: str, name_prefix: str,
                   finished: set[str]) -> None:
    """Mark the child runs named ``name_prefix*`` FINISHED if their name is in ``finished``, else FAILED."""
    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`{PARENT_TAG}` = '{parent_run_id}' AND attributes.run_name LIKE '{name_prefix}%'"))
    for run in runs:
        client.set_terminated(run.info.run_id, status="FINISHED" if run.info.run_name in finished else "FAILED")


def require_sent(uri: str, run_id: str, last_report: dict[str, Any], checkpoints: str) -> None:
    """Fail the step if training could not send all its figures to MLflow: a model must not be registered
    from a run whose record is incomplete. The checkpoints stay: a rerun resumes from the last one and logs
    the epochs it holds into its new run."""
    unsent = int(last_report.get("mlflow/unsent", 0))
    if unsent:
        raise TrackingError(f"MLflow tracking server {uri} stopped answering during training and {unsent} of run "
                            f"{run_id}'s logging calls could not be sent; the checkpoints are kept in {checkpoints}: "
                            "rerun the same command once the server is back (training resumes from its last "
                            "checkpoint and nothing is registered until then)")

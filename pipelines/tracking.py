"""MLflow, the pipeline's one way to it: the tracking URI, the experiment, runs, and one logger.

Default store: an sqlite database inside the run folder, created once by the driver before any
step starts (so trials never race to create its schema). Any tracking URI works instead,
e.g. a real ``mlflow server``; it is checked before any compute is spent.

Every call goes through ``client(uri)`` under one retry policy (``bounded_retries``) and sends metrics
and params with ``log_batch``. The driver's calls fail fast with a ``TrackingError``; training logs
through ``BufferedRunLogger``, which keeps what an outage holds back and sends it once the server is back.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vaegan.atomic import write_json
from vaegan.errors import UserError

from . import store


T = TypeVar("T")
PARENT_TAG = "mlflow.parentRunId"
RUN_DIR_TAG = "vaegan.run_dir"  # the run folder whose driver opened the run: what a rerun closes
BATCH_LIMITS = {"metrics": 1000, "params": 100}  # MLflow's most entries per log_batch call
# MLflow's client retries a dead server for minutes per call by default; a step (and a training epoch)
# should learn that the server is gone within seconds. One policy for the driver and every Ray worker.
RETRY_POLICY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


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


def resolve_tracking_uri(configured: str, run_dir: str) -> str:
    """The tracking URI (``configured``, else MLFLOW_TRACKING_URI, else sqlite in a local run folder), without
    credentials in it. A run folder on object storage cannot hold sqlite: it needs a tracking server.

    A ``user:password@`` in an http(s) URI moves to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD,
    MLflow's own way to authenticate, which every client of this process and of the local Ray it starts
    reads. The URI travels on into summary.json, Ray task arguments, Train's config and MLflow's "View run"
    lines, and a configured ``register.tracking_uri`` into the run's params, so both keep only the host.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if store.is_remote(run_dir):
        if urllib.parse.urlsplit(uri).scheme not in ("http", "https", "databricks"):
            raise TrackingError(f"--run-dir {run_dir} is on object storage, where MLflow's sqlite store cannot live, "
                                f"and the tracking URI is {uri or 'unset'!r}; allowed: MLFLOW_TRACKING_URI (or "
                                "register.tracking_uri) naming a tracking server, e.g. http://mlflow:5000")
    elif not uri:
        uri = f"sqlite:///{Path(run_dir, 'mlflow.db').resolve()}"
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
    if not configured:
        os.environ["MLFLOW_TRACKING_URI"] = bare
    return bare


def ensure_experiment(uri: str, name: str, run_dir: str) -> str:
    """The experiment's id, creating it (with artifacts under the run folder for local stores)."""
    mlflow_client = client(uri)
    try:
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = Path(run_dir, "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
        return mlflow_client.create_experiment(name, artifact_location=location)
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
              params: dict[str, Any] | None = None, run_dir: str = "") -> str:
    """Create a (child) run and return its id; the run stays open until ``end_run``. ``run_dir`` tags it
    with the pipeline's run folder, so that a rerun there can close it if its driver dies first."""
    tags = {PARENT_TAG: parent_run_id} if parent_run_id else {}
    if run_dir:
        tags[RUN_DIR_TAG] = run_dir
    run = client(uri).create_run(experiment_id, run_name=name, tags=tags)
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


@names_an_unreachable_server
def run_exists(uri: str, run_id: str) -> bool:
    """Whether the store at ``uri`` holds run ``run_id`` (a cached step's run may live on another server)."""
    try:
        client(uri).get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def client(uri: str) -> MlflowClient:
    bounded_retries()
    return MlflowClient(uri)


def metric_entities(metrics: dict[str, float], step: int) -> list:
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()]


def send_batch(mlflow_client: MlflowClient, run_id: str, metrics: list = (), params: list = ()) -> None:
    """``log_batch`` in chunks of MLflow's limits."""
    for kind, items in (("metrics", list(metrics)), ("params", list(params))):
        size = BATCH_LIMITS[kind]
        for start in range(0, len(items), size):
            mlflow_client.log_batch(run_id, **{kind: items[start:start + size]})


@names_an_unreachable_server
def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param
    send_batch(client(uri), run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])


@names_an_unreachable_server
def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    send_batch(client(uri), run_id, metrics=metric_entities(metrics, step))


@names_an_unreachable_server
def log_artifacts(uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    mlflow_client = client(uri)
    for path in paths:
        mlflow_client.log_artifact(run_id, str(path), artifact_path=artifact_path)


@names_an_unreachable_server
def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def end_run_if_reachable(uri: str, run_id: str, status: str) -> None:
    """Mark a run that is failing anyway; a server that is gone cannot hear it, and the error that made the
    run fail is the one to report."""
    with contextlib.suppress(TrackingError):
        end_run(uri, run_id, status)


def bounded_retries() -> dict[str, str]:
    """Apply ``RETRY_POLICY`` (a user's own MLFLOW_HTTP_REQUEST_* variables win) and return it, for the
    runtime environment of Ray's workers."""
    for name, value in RETRY_POLICY.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in RETRY_POLICY}


@names_an_unreachable_server
def close_children(uri: str, experiment_id: str, parent_run_id: str, name_prefix: str,
                   finished: set[str]) -> None:
    """Mark the child runs named ``name_prefix*`` FINISHED if their name is in ``finished`` or continues one
    (``<name>-<part>``: a PBT trial's later Train runs), else FAILED."""
    mlflow_client = client(uri)
    runs = mlflow_client.search_runs([experiment_id], filter_string=(
        f"tags.`{PARENT_TAG}` = '{parent_run_id}' AND attributes.run_name LIKE '{name_prefix}%'"))
    for run in runs:
        name = run.info.run_name
        ok = name in finished or name.rsplit("-", 1)[0] in finished
        mlflow_client.set_terminated(run.info.run_id, status="FINISHED" if ok else "FAILED")


@names_an_unreachable_server
def close_left_running(uri: str, experiment_id: str, run_dir: str) -> list[str]:
    """End as KILLED the runs tagged with ``run_dir`` that are still RUNNING, and return their names.

    Only the driver holding the run folder's lock (``pipeline.holding_run_dir``) calls this, before it opens
    its own run, so every such run belongs to an earlier driver that died without closing it (SIGKILL gives
    no chance to). Their end time is when this rerun noticed, not when that driver died."""
    mlflow_client = client(uri)
    closed, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                         max_results=1000, page_token=token)
        for run in page:
            if run.data.tags.get(RUN_DIR_TAG) == run_dir:
                mlflow_client.set_terminated(run.info.run_id, status="KILLED")
                closed.append(run.info.run_name)
        token = page.token
        if not token:
            return closed


def require_sent(uri: str, run_id: str, unsent: int, checkpoints: str) -> None:
    """Fail the step if training could not send all its figures to MLflow: a model must not be registered
    from a run whose record is incomplete. The checkpoints stay: a rerun resumes from the last one and logs
    the epochs it holds into its new run."""
    if unsent:
        raise TrackingError(f"MLflow tracking server {uri} stopped answering during training and {unsent} of run "
                            f"{run_id}'s logging calls could not be sent; the checkpoints are kept in {checkpoints}: "
                            "rerun the same command once the server is back (training resumes from its last "
                            "checkpoint and nothing is registered until then)")


def is_rejection(err: BaseException) -> bool:
    """Whether the server answered ``err`` with a 4xx (other than 429 Too Many Requests): the call itself is
    refused and will be again. Connection errors, timeouts and 5xx (MLflow's client reports the first two, and
    5xx after its retries, as "API request to ... failed with [timeout] exception") are an outage instead: the
    same call may succeed later."""
    if not isinstance(err, MlflowException):
        return False
    if str(err).startswith("API request to") and ("failed with exception" in str(err)
                                                   or "failed with timeout exception" in str(err)):
        return False
    status = err.get_http_status_code()
    return 400 <= status < 500 and status != 429


class BufferedRunLogger:
    """Training's MLflow logging, from world rank 0 only, into the run the driver created.

    A tracking server that goes away must not stop training: whatever cannot be sent is kept, in order,
    and sent before the next epoch's figures once the server answers again. A call the server refuses (a
    4xx, e.g. a param re-logged with another value) would be refused again: it is dropped with one line
    instead of holding back everything after it. ``unsent()`` counts what is
    still held; the driver fails the step with a clear error instead of registering a model whose run
    lacks them.

    With a ``spool`` folder (beside the run's checkpoints in Ray's storage) what an outage holds back is also
    kept on disk, written atomically after every call it holds back, the grids moved in beside it; the next
    logger with that spool (the restarted rank 0, or a rerun's) sends it first, each call into the run it
    was made for. So rank 0 dying during an outage loses no epoch.
    """

    def __init__(self, uri: str, run_id: str, enabled: bool, spool: Path | None = None):
        self.enabled = enabled and bool(run_id)
        self.uri, self.run_id = uri, run_id
        self.spool = spool if self.enabled else None
        # Plain-JSON calls, each {"kind", "run", ...}: what _call sends and what the spool stores.
        self.pending: list[dict[str, Any]] = self._spooled()
        self.outage_reported = False
        self.rejected = 0
        self.client = client(uri) if self.enabled else None

    def log_nodes(self, nodes: list[str]) -> None:
        self._send({"kind": "tag", "key": "train.node_ids", "value": ",".join(nodes)},
                   {"kind": "param", "key": "train.num_nodes", "value": len(set(nodes))})

    def log_epoch(self, summary: dict[str, float], epoch: int, pngs: list[Path]) -> None:
        metrics = [[m.key, m.value, m.timestamp, m.step] for m in metric_entities(summary, epoch)]
        self._send({"kind": "metrics", "metrics": metrics},
                   *({"kind": "artifact", "path": str(png), "folder": f"epoch_{epoch:03d}"} for png in pngs))

    def backfill(self, history: list[dict[str, float]]) -> None:
        """A rerun of the pipeline resumes into a new MLflow run: give it the epochs its checkpoint holds
        (a worker restart resumes into the same run, which has them already)."""
        if history:
            self._send({"kind": "backfill", "history": history})

    def unsent(self) -> int:
        return len(self.pending)

    def _call(self, call: dict[str, Any]) -> None:
        from mlflow.entities import Metric
        kind, run_id = call["kind"], call["run"]
        if kind == "tag":
            self.client.set_tag(run_id, call["key"], call["value"])
        elif kind == "param":
            self.client.log_param(run_id, call["key"], call["value"])
        elif kind == "metrics":
            send_batch(self.client, run_id, metrics=[Metric(*m) for m in call["metrics"]])
        elif kind == "backfill":
            if "epoch" not in self.client.get_run(run_id).data.metrics:
                send_batch(self.client, run_id, metrics=[m for h in call["history"]
                                                         for m in metric_entities(h, int(h["epoch"]))])
        elif os.path.exists(call["path"]):  # an artifact; gone only if a spool was cleared by hand
            self.client.log_artifact(run_id, call["path"], artifact_path=call["folder"])
            os.unlink(call["path"])

    def _spooled(self) -> list[dict[str, Any]]:
        if self.spool is None or not (self.spool / "pending.json").is_file():
            return []
        calls = json.loads((self.spool / "pending.json").read_text())
        print(f"[train] {len(calls)} MLflow calls an earlier attempt held back during an outage are sent first "
              f"(from {self.spool})", flush=True)
        return calls

    def _keep(self) -> None:
        """Mirror ``pending`` into the spool: the grids moved in beside it, the list written atomically; an
        empty list removes the spool."""
        if self.spool is None:
            return
        if not self.pending:
            shutil.rmtree(self.spool, ignore_errors=True)
            return
        self.spool.mkdir(parents=True, exist_ok=True)
        for index, call in enumerate(self.pending):
            if call["kind"] == "artifact" and Path(call["path"]).parent != self.spool and os.path.exists(call["path"]):
                # A folder per grid: the file keeps its name, which is the artifact's name.
                target = self.spool / f"{time.time_ns()}-{index}" / Path(call["path"]).name
                target.parent.mkdir()
                shutil.move(call["path"], target)
                call["path"] = str(target)
        write_json(self.spool / "pending.json", self.pending)

    def _report_rejection(self, err: MlflowException) -> None:
        if not self.rejected:
            print(f"[train] MLflow at {self.uri} rejected a logging call of run {self.run_id} "
                  f"({str(err).splitlines()[0][:200]}); it is dropped and the other figures are sent "
                  "(later rejections are dropped silently)", flush=True)
        self.rejected += 1

    def _send(self, *calls: dict[str, Any]) -> None:
        if not self.enabled:
            return
        held_back = bool(self.pending)
        self.pending.extend({**call, "run": self.run_id} for call in calls)
        while self.pending:
            try:
                self._call(self.pending[0])
            except (MlflowException, OSError) as err:  # requests' errors are OSErrors
                if is_rejection(err):  # sending it again gets the same answer: drop it, keep the rest flowing
                    self._report_rejection(err)
                    self.pending.pop(0)
                    continue
                if not self.outage_reported:
                    print(f"[train] MLflow at {self.uri} is not answering ({type(err).__name__}); training goes on "
                          "and its figures are sent once it is back", flush=True)
                self.outage_reported = True
                self._keep()
                return
            self.pending.pop(0)
        if held_back:
            self._keep()
        if self.outage_reported:
            print(f"[train] MLflow at {self.uri} is back; buffered figures sent", flush=True)
            self.outage_reported = False

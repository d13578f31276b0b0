"""Shared fixtures: real `mlflow server`s on 127.0.0.1 (a plain one, and one with basic auth), the suite's one
full smoke pipeline run, and the CLI runner; and how the suite is shared between two test processes."""
from __future__ import annotations

import base64
import configparser
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from deploy.local_server import free_port, tracking_server

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# One torch thread per process, in this process and every one it starts (the CLI, Ray's workers, servers): the
# suite keeps both cores busy with two test processes, and torch's OpenMP threads spin while they wait for each
# other, so two 2-thread torch processes at once ran each train step 29.6x slower than one alone, and two 1-thread
# ones 1.29x (benchmarks/results/contention.json). Ray leaves an OMP_NUM_THREADS it finds set. A value of your own wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# README's test command runs the suite in two processes (pytest-xdist, ``-n 2``): about a third of a serial run's
# wall time is waiting (a Ray starting, a server answering, a subprocess), which the other process fills. A
# module's tests stay in one process, so that its module fixtures (a Ray run, a cluster, a server) are built
# once; the modules named in SPREAD have tests that share no such fixture and take a minute or more each, so
# those are dealt out one by one (a parametrized test's cases together).
SPREAD = {"test_benchmarks", "test_mlflow_outage"}
SAME_PROCESS = {"test_security": "test_pipeline"}  # both read conftest's session-wide smoke_run
# The longest groups first (from the --durations of a serial run), so that neither process is left with a long one
# at the end while the other idles; the rest keep their file order.
LONGEST_FIRST = ("test_pipeline", "test_faults", "test_deploy", "test_object_storage", "test_sweeps",
                 "test_benchmarks::test_quality_quick",
                 "test_mlflow_outage::test_a_server_down_until_training_ends", "test_benchmarks::test_throughput_quick",
                 "test_benchmarks::test_sweep_quick", "test_mlflow_outage::test_a_server_that_comes_back",
                 "test_benchmarks::test_preprocess_quick", "test_steps", "test_bad_input")


def pytest_configure(config: pytest.Config) -> None:
    """Before the test processes start: every local Ray started without RAY_AUTH_MODE uses the token in
    ~/.ray/auth_token and writes a new one where there is none, so on a fresh machine two Rays starting at once
    would each write their own and one would find the other's."""
    if not hasattr(config, "workerinput") and not (Path.home() / ".ray" / "auth_token").is_file():
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], capture_output=True, check=True)


def process_group(nodeid: str) -> str:
    """The tests that must share a process: ``tests/test_x.py::test_y[case]`` -> its module, or in SPREAD's
    modules the test with all its cases."""
    path, _, name = nodeid.partition("::")
    module = Path(path).stem
    if module in SPREAD:
        return f"{module}::{name.split('[')[0]}"
    return SAME_PROCESS.get(module, module)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        group = process_group(item.nodeid)
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if group.startswith(prefix)), len(LONGEST_FIRST))
    items.sort(key=rank)  # stable: within a group, and among the rest, file order stays


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's scheduling by scope (a scope's tests go to one process, the scopes in collection order with
    ``--no-loadscope-reorder``), with ``process_group`` as the scope. (Its own ``--dist loadgroup`` reads
    ``xdist_group`` marks through a node id that pytest 9.2 no longer lets it rewrite.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByTestGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return process_group(nodeid)
    return ByTestGroup(config, log)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, proxied artifacts) on 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with tracking_server(root, str(root / "artifacts")) as uri:
        yield uri


def session_pids(session: int, title: str = "") -> list[int]:
    """The live processes of ``session`` (zombies left out) whose command line contains ``title``."""
    listed = subprocess.run(["ps", "-s", str(session), "-o", "pid=,stat=,args="], capture_output=True, text=True)
    rows = [line.split(None, 2) + [""] for line in listed.stdout.splitlines()]
    return [int(row[0]) for row in rows if not row[1].startswith("Z") and title in row[2]]


def sigkill_session(session: int) -> None:
    """SIGKILL every process of ``session`` and return once the kernel has reaped them all. A Ray started in a
    session of its own stays in it, workers included (even those that take a process group of their own), and
    no other Ray on the host (another test's, a user's) is in it."""
    deadline = time.time() + 60
    while pids := session_pids(session):
        assert time.time() < deadline, f"processes of session {session} outlived SIGKILL: {pids}"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@contextlib.contextmanager
def ray_head(env: dict[str, str], *flags: str):
    """`ray start --head --block` with ``flags`` and ``env``, in a session and a temp folder of its own; yields
    its address once it is up, and stops it after (SIGKILL to its session: a test's Ray has nothing to save)."""
    temp = Path(tempfile.mkdtemp(prefix="vr-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    log = temp / "head.log"
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--temp-dir={temp}", "--disable-usage-stats", *flags],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, f"ray start --head did not come up:\n{log.read_text()}"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        sigkill_session(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def head_for_runs(workers_env: dict[str, str] | None = None):
    """A Ray head that CLI runs and benchmarks join at RAY_ADDRESS (as under `ray job submit` or on a user's
    cluster), which saves each of them a local Ray's start and stop (~12 s on 2 cores); yields the variables
    that join it. Set up as ``pipelines.cluster.start_local_ray`` sets up a local one: Train's placement-group
    cleaner finds this Ray's state API by address (other Rays run on the machine), no preemption watcher. Its
    workers get the head's environment plus ``workers_env``, not a joining driver's."""
    dashboard = free_port()
    # Token auth with ~/.ray/auth_token, like every local Ray here; a driver that joins a cluster assumes no
    # auth unless RAY_AUTH_MODE says so.
    env = {**os.environ, **(workers_env or {}), "RAY_AUTH_MODE": "token",
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    with ray_head(env, "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                  f"--dashboard-agent-listen-port={free_port()}", f"--num-cpus={os.cpu_count()}", "--num-gpus=0") as address:
        yield {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}


# Where this test process arms its shared head's fault injection (tests/hooks/nonfinite.py, ``armed``).
POISON_FILE = Path(tempfile.gettempdir()) / f"vaegan-test-poison-{os.getpid()}"


@pytest.fixture(scope="session")
def shared_ray():
    """One Ray head per test process (``head_for_runs``), for the CLI runs and benchmarks whose tests are not
    about how the pipeline starts and stops its own Ray. Its workers carry the NaN-injection hook, unarmed
    until a test writes POISON_FILE. A test whose workers need variables of their own starts a head with
    them, or its own Ray."""
    from hooks.nonfinite import hook_env
    with head_for_runs(hook_env(POISON_FILE)) as join:
        yield join


def run_cli(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the `vaegan` console script as a user would, from the repository root."""
    return subprocess.run([str(BIN / "vaegan"), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


# What a fresh `python` process starts with (CPython's default warning filters), so that a warning the CLI
# raises is printed on stderr as it would be there, not recorded by pytest.
PROCESS_WARNING_FILTERS = [("default", None, DeprecationWarning, "__main__", 0),
                           ("ignore", None, DeprecationWarning, None, 0),
                           ("ignore", None, PendingDeprecationWarning, None, 0),
                           ("ignore", None, ImportWarning, None, 0), ("ignore", None, ResourceWarning, None, 0)]


@contextlib.contextmanager
def captured_output():
    """Everything this process writes to stdout and stderr inside the block, into files: Python's streams,
    the file descriptors (C code), logging handlers that hold a stream opened before, and warnings as a fresh
    process shows them. Yields a dict that holds the two texts once the block ends."""
    out: dict[str, str] = {}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        old = {id(stream): new for streams, new in (((sys.stdout, sys.__stdout__), stdout),
                                                    ((sys.stderr, sys.__stderr__), stderr)) for stream in streams}
        handlers = [h for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
                    for h in getattr(logger, "handlers", []) if type(h) is logging.StreamHandler
                    and id(h.stream) in old]
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(stdout.fileno(), 1), os.dup2(stderr.fileno(), 2)
        streams = [(h, h.setStream(old[id(h.stream)])) for h in handlers]
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
                    warnings.catch_warnings(record=True) as caught:
                warnings.filters[:] = PROCESS_WARNING_FILTERS
                yield out
        finally:
            for warning in caught:
                stderr.write(warnings.formatwarning(warning.message, warning.category, warning.filename,
                                                    warning.lineno, warning.line))
            for handler, stream in streams:
                handler.setStream(stream)
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            for name, file in (("stdout", stdout), ("stderr", stderr)):
                file.seek(0)
                out[name] = file.read()


def vaegan_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """``vaegan ARGS`` as ``pipelines.cli.main`` in this process (the main thread: main sets a SIGTERM handler,
    put back here); the same record as a finished process: exit code, stdout, stderr."""
    from pipelines import cli  # its imports are light; a verb loads what it needs
    sigterm = signal.getsignal(signal.SIGTERM)
    with captured_output() as out:
        try:
            code = cli.main(args)
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
        finally:
            signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess(["vaegan", *args], code, out["stdout"], out["stderr"])


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory):
    """A basic-auth MLflow server (own sqlite stores, admin from the environment) and one non-admin user."""
    root = tmp_path_factory.mktemp("auth-server")
    config = configparser.ConfigParser()
    # The credential cache as a production server would set it: without it every request pays a PBKDF2 hash
    # (0.2 s here), and a run of hundreds of logging calls and artifact uploads takes minutes longer.
    config["mlflow"] = {"default_permission": "READ", "database_uri": f"sqlite:///{root / 'users.db'}",
                        "admin_username": "admin", "auth_cache_ttl_seconds": "300",
                        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth"}
    with open(root / "auth.ini", "w") as f:
        config.write(f)
    admin_password, user_password = secrets.token_hex(16), secrets.token_hex(16)
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    with tracking_server(root, str(root / "artifacts"), env, app_name="basic-auth") as uri:
        assert api(uri, "users/create", {"username": "pipeline-bot", "password": user_password},
                   ("admin", admin_password)) == 200
        yield {"uri": uri, "user": "pipeline-bot", "password": user_password}


def api(uri: str, endpoint: str, body: dict | None, auth: tuple[str, str] | None) -> int:
    """The HTTP status of one MLflow REST call (POST with ``body``, else GET), as ``auth`` or anonymous."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{endpoint}", headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@contextlib.contextmanager
def as_user(server: dict):
    """MLflow clients in this process use ``server`` as the pipeline's user inside the block."""
    from mlflow.tracking import MlflowClient
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", server["uri"])
        patch.setenv("MLFLOW_TRACKING_USERNAME", server["user"])
        patch.setenv("MLFLOW_TRACKING_PASSWORD", server["password"])
        yield MlflowClient(server["uri"])


def without_mlflow_settings() -> dict[str, str]:
    """This process's environment less every MLFLOW_ variable, so that a run gets only the ones a test gives."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


BUCKET = "vaegan-test"  # the local S3 server's bucket


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A local S3 server (``deploy/local_s3.py``, credentials checked) with BUCKET; its AWS_* variables."""
    from deploy.local_s3 import local_s3
    with local_s3(BUCKET, log=tmp_path_factory.mktemp("s3") / "moto.log") as env:
        yield env


@pytest.fixture(scope="session")
def s3_mlflow(s3, tmp_path_factory):
    """A tracking server that proxies artifacts to the bucket (``--artifacts-destination s3://…``)."""
    root = tmp_path_factory.mktemp("s3-mlflow")
    env = {**s3, "MLFLOW_S3_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"]}
    with tracking_server(root, f"s3://{BUCKET}/mlartifacts", env) as uri:
        yield uri


def bucket_fs(s3: dict[str, str]) -> pafs.S3FileSystem:
    """The test's own view of the bucket, with the key given explicitly (this process has no AWS_* set)."""
    return pafs.S3FileSystem(endpoint_override=s3["AWS_ENDPOINT_URL"], access_key=s3["AWS_ACCESS_KEY_ID"],
                             secret_key=s3["AWS_SECRET_ACCESS_KEY"], region="us-east-1")


def objects(fs: pafs.S3FileSystem, prefix: str) -> dict[str, int]:
    """Every object under ``BUCKET/prefix``: its key below the prefix and its size."""
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return {i.path.removeprefix(f"{BUCKET}/{prefix}/"): i.size for i in infos if i.type == pafs.FileType.File}


# smoke.yaml runs one trial and no VAE baseline; the suite's full smoke run asks for both, to check the tune
# table and the baseline's MLflow run (the only Ray run of the suite that pays for them). Its two trials are
# drawn by Optuna on two objectives, for the Pareto report (the same cost as random draws). loss.gamma is
# given, so the sweep must leave it alone.
FULL_SMOKE = ("--set", "tune.num_samples=2", "--set", "eval.baseline_vae=true", "--set", "loss.gamma=2.0",
              "--set", "tune.search=optuna", "--set", "tune.objectives=[val/fid,val/recon_mse]")


def full_smoke_args(run_dir: Path) -> list[str]:
    """The CLI arguments of the suite's full smoke run into ``run_dir``."""
    return ["run", "--config", "pipelines/configs/smoke.yaml", *FULL_SMOKE, "--run-dir", str(run_dir)]


def full_smoke(run_dir: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    """``vaegan run`` of smoke.yaml with FULL_SMOKE into ``run_dir``, with only the MLflow settings in ``env``
    (none inherited from this process)."""
    return subprocess.run([str(BIN / "vaegan"), *full_smoke_args(run_dir), *extra], cwd=REPO, capture_output=True,
                          text=True, env={**without_mlflow_settings(), **env}, timeout=900, check=False)


@pytest.fixture(scope="session")
def smoke_run(auth_server, tmp_path_factory):
    """The suite's one full smoke DAG, against the basic-auth server as its non-admin user with the password
    in the environment: test_pipeline checks the DAG's contracts on it, test_security that the password is
    written nowhere. Ray's session files go to a folder of our own (short: Ray's socket paths must fit 107
    bytes), for test_security to grep; the reruns the tests make with ``env`` write there too."""
    run_dir = tmp_path_factory.mktemp("smoke-run")
    ray_tmp = Path(tempfile.mkdtemp(prefix="vs-", dir="/tmp"))
    args = full_smoke_args(run_dir)
    env = {"MLFLOW_TRACKING_URI": auth_server["uri"], "MLFLOW_TRACKING_USERNAME": auth_server["user"],
           "MLFLOW_TRACKING_PASSWORD": auth_server["password"], "RAY_TMPDIR": str(ray_tmp)}
    try:
        first = full_smoke(run_dir, env)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        yield {"run_dir": run_dir, "args": args, "env": env, "ray_tmp": ray_tmp, "first": first,
               "summary": json.loads((run_dir / "summary.json").read_text())}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

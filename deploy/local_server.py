"""Local servers on 127.0.0.1 for the tests, the benchmarks and trying things without a cloud account: the
process handling that ``deploy/local_s3.py`` and ``deploy/local_gcs.py`` share, and a local `mlflow server`."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until something listens on ``port``: a TCP connect, which a server does not count as a request."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it listened on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the server did not listen on {port} within {timeout}s")


@contextlib.contextmanager
def server(command: list[str], port: int, log: Path | None = None, env: dict[str, str] | None = None,
           timeout: float = 60) -> Iterator[subprocess.Popen]:
    """``command``, a server in its own session, from when it listens on ``port`` (within ``timeout`` s) until
    the block ends; yields its process."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for_port(port, proc, timeout)
        yield proc
    finally:
        stop_group(proc)
        if log:
            out.close()


def wait_for_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    """Until ``url`` answers 200 (a server's port opens before its app is ready), or ``proc`` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server started with start_new_session, children included: SIGTERM, then SIGKILL after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def tracking_server(root: Path, artifacts: str, env: dict[str, str] | None = None,
                    app_name: str | None = None) -> Iterator[str]:
    """`mlflow server` with its sqlite store in ``root`` (and its log, ``server.log``), proxying artifacts to
    ``artifacts`` (a folder, or ``s3://…``); yields its URI once ``/health`` answers."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "mlflow"), "server", *(["--app-name", app_name] if app_name else []),
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", artifacts,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with server(command, port, root / "server.log", {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})},
                timeout=120) as proc:
        wait_for_http(f"{uri}/health", 120, proc)
        yield uri


def serve_from_command_line(start: Callable[[str], contextlib.AbstractContextManager[dict[str, str]]],
                            scheme: str, description: str) -> None:
    """A ``python -m deploy.local_…`` command: ``start(--bucket)``, print the variables to export, then wait for
    Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bucket", default="vaegan")
    bucket = parser.parse_args().bucket
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` too stops the server it started
    with start(bucket) as env:
        print("".join(f"export {name}={value}\n" for name, value in env.items()), flush=True)
        print(f"# bucket {scheme}://{bucket} is ready; Ctrl-C stops the server", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()

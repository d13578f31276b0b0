"""A local S3-compatible server on 127.0.0.1, for trying ``--run-dir s3://…`` without a cloud account and for
the tests and the storage benchmark: moto's server mode (``moto[server]``, a dev dependency) with one bucket
and one access key.

    python -m deploy.local_s3 --bucket vaegan     # prints the variables to export; Ctrl-C stops it

Unlike moto's default, the server checks credentials (as a real store does): the bucket and an IAM user
with its key are made by the first four requests, which moto lets through unsigned
(``INITIAL_NO_AUTH_ACTION_COUNT``); every later request needs that key.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

SETUP_REQUESTS = 4  # create_bucket, create_user, create_access_key, put_user_policy
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until something listens on ``port``: a TCP connect, which moto does not count as a request."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the S3 server exited with {proc.returncode} before it listened on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the S3 server did not listen on {port} within {timeout}s")


@contextlib.contextmanager
def local_s3(bucket: str, log: Path | None = None) -> Iterator[dict[str, str]]:
    """A running server with ``bucket``; yields the AWS_* variables a client needs (endpoint, key, region)."""
    import boto3
    port = free_port()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)},
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, proc)
        endpoint = f"http://127.0.0.1:{port}"
        setup = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup"}
        boto3.client("s3", **setup).create_bucket(Bucket=bucket)
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="vaegan")
        key = iam.create_access_key(UserName="vaegan")["AccessKey"]
        iam.put_user_policy(UserName="vaegan", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        if log:
            out.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket", default="vaegan")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` too stops the server it started
    with local_s3(args.bucket) as env:
        print("".join(f"export {name}={value}\n" for name, value in env.items()), flush=True)
        print(f"# bucket s3://{args.bucket} is ready; Ctrl-C stops the server", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()

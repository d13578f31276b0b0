"""A local S3-compatible server on 127.0.0.1, for trying ``--run-dir s3://…`` without a cloud account and for
the tests and the storage benchmark: moto's server mode (``moto[server]``, a dev dependency) with one bucket
and one access key.

    python -m deploy.local_s3 --bucket vaegan     # prints the variables to export; Ctrl-C stops it

Unlike moto's default, the server checks credentials (as a real store does): the bucket and an IAM user
with its key are made by the first four requests, which moto lets through unsigned
(``INITIAL_NO_AUTH_ACTION_COUNT``); every later request needs that key.
"""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from deploy.local_server import free_port, serve_from_command_line, server

SETUP_REQUESTS = 4  # create_bucket, create_user, create_access_key, put_user_policy
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


@contextlib.contextmanager
def local_s3(bucket: str, log: Path | None = None) -> Iterator[dict[str, str]]:
    """A running server with ``bucket``; yields the AWS_* variables a client needs (endpoint, key, region)."""
    import boto3
    port = free_port()
    with server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, log,
                env={"INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)}):
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


if __name__ == "__main__":
    serve_from_command_line(local_s3, "s3", __doc__.split("\n\n")[0])

"""A local GCS emulator on 127.0.0.1, for trying ``--run-dir gs://…`` without a cloud account and for the tests:
gcp-storage-emulator (a dev dependency), in memory, with one bucket.

    python -m deploy.local_gcs --bucket vaegan     # prints the variable to export; Ctrl-C stops it

Clients find it through ``STORAGE_EMULATOR_HOST``, as Google's client libraries do (``pipelines/store.py``
passes it to pyarrow, which does not read it). The emulator checks no credentials.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from deploy.local_server import free_port, serve_from_command_line, server


@contextlib.contextmanager
def local_gcs(bucket: str, log: Path | None = None) -> Iterator[dict[str, str]]:
    """A running emulator with ``bucket``; yields the variable a client needs to reach it."""
    port = free_port()
    with server([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
                 "--in-memory", "--default-bucket", bucket], port, log):
        yield {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}


if __name__ == "__main__":
    serve_from_command_line(local_gcs, "gs", __doc__.split("\n\n")[0])

"""Atomic file writes: a reader (or a run restarted after a crash) sees the old file or the complete new one,
never a partial file."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """Yield a temporary file beside ``path``; on success it is renamed over ``path`` (flushed to disk first
    when ``durable``), on error it is removed and ``path`` is left as it was. The rename alone already keeps
    a killed process from leaving half a file; ``durable`` also survives a machine crash, at an fsync's cost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any, durable: bool = True) -> Path:
    with atomic_file(path, "w", durable) as f:
        json.dump(data, f, indent=2)
    return Path(path)


def unwritable_reason(folder: str | Path) -> tuple[Path, str] | None:
    """Why files could not be written into ``folder`` (created if missing): the nearest of it and the folders
    above it that exists, and what is wrong with that ("is not a folder", "is not writable"); None if nothing."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return existing, "is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return existing, "is not writable"
    return None

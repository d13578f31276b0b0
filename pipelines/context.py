"""What every DAG step is handed besides the config: the run's context and its upstream steps' outputs.

Both cross the Ray boundary as they are (plain dataclasses), so a step reads ``ctx.run_dir`` and
``inputs.preprocess.manifest`` with types, never through nested string lookups.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from . import store

OUTPUTS_FILE = "outputs.json"  # written last into a step's folder: its presence is what "complete" means


@dataclasses.dataclass(frozen=True)
class RunContext:
    """The pipeline run a step belongs to; ``step_key`` is the running step's cache key (it names the
    Ray Train and MLflow runs the step starts, so a rerun of the same key resumes them)."""

    run_dir: str  # a local folder or an object-storage URI (``pipelines/store.py``)
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    step_key: str = ""

    def featnet_cache(self, data_dir: str) -> str:
        """Where the run's feature nets are cached: beside the data for a local run (every run of that data
        shares them), under the run's URI on object storage (where every node reaches it)."""
        return store.join(self.run_dir, "featnets") if store.is_remote(self.run_dir) else store.join(data_dir, "featnets")


@dataclasses.dataclass(kw_only=True)
class StepOutputs:
    """Base of every step's outputs: JSON-able fields, plus the folder the step wrote its files into
    (set when the outputs are read back, never stored: a run folder may move), a local path or a URI."""

    folder: str = ""

    @property
    def path(self) -> Path:
        """The folder's files on this machine: the folder itself, or a copy of it downloaded from object storage."""
        return store.local_view(self.folder)

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields.pop("folder")
        return json.dumps(fields, indent=2)


O = TypeVar("O", bound=StepOutputs)


def read_outputs(cls: type[O], folder: str) -> O:
    """The outputs a complete step folder (path or URI) holds (``OUTPUTS_FILE``), as the step's own dataclass."""
    fields: dict[str, Any] = json.loads(store.read_text(store.join(folder, OUTPUTS_FILE)))
    return cls(**fields, folder=folder)


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One executed step as the DAG saw it: summary.json's per-step status, seconds and key."""

    name: str
    key: str
    status: str  # "ran" or "cached"
    seconds: float
    outputs: StepOutputs

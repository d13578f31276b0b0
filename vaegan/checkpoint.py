"""Checkpoints as plain dicts of tensors and numbers, readable with ``torch.load(weights_only=True)``.

A checkpoint holds every network's unwrapped state_dict, the optimiser states, the step and
counters (``VAEGANTrainer.state_dict``), the resolved config as a plain dict, and any extra
plain values the caller adds (epoch, metrics). No pickled classes: loading one never runs code.
"""
from __future__ import annotations

import dataclasses
import hashlib
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .atomic import atomic_file
from .config import VAEGANConfig, from_dict
from .errors import UserError

if TYPE_CHECKING:  # for the annotations only: loading a checkpoint (serving) must not import the trainer
    from .step import VAEGANTrainer

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, truncated, or holds something other than plain weights."""


def checkpoint_payload(trainer: VAEGANTrainer, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**trainer.state_dict(), "config": dataclasses.asdict(trainer.cfg), **(extra or {})}


def weights_digest(state: dict[str, Any]) -> str:
    """SHA-256 of every tensor in ``state`` (a ``VAEGANTrainer.state_dict``: weights, buffers, optimiser
    moments) with its key path; numbers such as the step are left out. Equal digests mean equal bytes."""
    digest = hashlib.sha256()

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                visit(f"{prefix}/{key}", value[key])
        elif isinstance(value, torch.Tensor):
            digest.update(prefix.encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    visit("", state)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, trainer: VAEGANTrainer, extra: dict[str, Any] | None = None) -> Path:
    """Write atomically: a reader sees the old file or the complete new one, never a partial file."""
    with atomic_file(path) as f:
        torch.save(checkpoint_payload(trainer, extra), f)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load onto the CPU with ``weights_only=True``; anything that needs unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {path} holds objects other than plain weights and was refused "
                              f"(weights_only=True): {str(err).splitlines()[0]}") from err
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint "
                              f"(truncated or corrupt): {err}") from err
    if not isinstance(state, dict) or "config" not in state or "enc" not in state:
        raise CheckpointError(f"checkpoint {path} is not a vaegan checkpoint (no 'config'/'enc' entries)")
    return state


# Keys that earlier versions wrote into every checkpoint's config and that no longer exist (test-only NaN
# injection, now done by the tests themselves). Dropped on load, so that models registered before their
# removal still load; they never had an effect on the weights.
RETIRED_KEYS = {"train": ("inject_nonfinite_from", "inject_nonfinite_steps")}


def config_of(state: dict[str, Any]) -> VAEGANConfig:
    config = {section: {k: v for k, v in values.items() if k not in RETIRED_KEYS.get(section, ())}
              if isinstance(values, dict) else values for section, values in state["config"].items()}
    return from_dict(VAEGANConfig, config)

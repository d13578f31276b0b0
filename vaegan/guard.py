"""The divergence guard beside the train step: skip non-finite steps, roll back when they persist.

A step whose gradients are not finite is skipped (no optimiser moves). ``max_bad_steps`` of them in a
row roll the trainer back to the last state marked good (the last checkpoint) with every learning rate
multiplied by ``rollback_lr_factor``; once ``max_rollbacks`` rollbacks did not help, training fails
with ``NonFiniteLossError``. The guard decides on gradient norms taken after DDP's all-reduce, so every
worker takes the same decision.

    guard = DivergenceGuard(cfg.train)
    guard.mark_good(trainer.state_dict())       # at every checkpoint
    if not guard.allows(norms): guard.skip(trainer, norms)   # the trainer calls this inside its step
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from .config import TrainConfig
from .errors import UserError


class NonFiniteLossError(UserError, RuntimeError):
    """Training diverged: non-finite gradients persisted through every allowed rollback."""


class Restorable(Protocol):
    step: int

    def restore(self, state: dict, lr_factor: float) -> None: ...


def cpu_copy(value: Any) -> Any:
    """A deep copy of nested containers with every tensor cloned to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return value


class DivergenceGuard:
    """Counts non-finite steps (``nonfinite_skipped``) and rollbacks (``rollbacks``) over the run."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.bad_steps = 0  # consecutive non-finite steps
        self.counters = {"nonfinite_skipped": 0, "rollbacks": 0}
        self.good_state: dict | None = None

    def mark_good(self, state: dict) -> None:
        """Remember ``state`` (copied to the CPU) as the one a divergence rolls back to."""
        self.good_state = cpu_copy(state)

    def allows(self, norms: dict[str, torch.Tensor]) -> bool:
        """Whether a step with these gradient norms may update the networks."""
        finite = bool(torch.isfinite(torch.stack(list(norms.values()))).all())
        if finite:
            self.bad_steps = 0
        return finite

    def skip(self, trainer: Restorable, norms: dict[str, torch.Tensor]) -> None:
        """Count a skipped step; roll ``trainer`` back once too many came in a row, or give up."""
        self.bad_steps += 1
        self.counters["nonfinite_skipped"] += 1
        if self.bad_steps < self.cfg.max_bad_steps:
            return
        if self.counters["rollbacks"] >= self.cfg.max_rollbacks:
            cfg = self.cfg
            raise NonFiniteLossError(
                f"{self.bad_steps} consecutive training steps had non-finite gradients (at step {trainer.step}; "
                f"norms {({k: float(v) for k, v in norms.items()})}) after {self.counters['rollbacks']} "
                f"rollbacks to the last good checkpoint, each multiplying the learning rates by "
                f"{cfg.rollback_lr_factor}; limits train.max_bad_steps={cfg.max_bad_steps}, "
                f"train.max_rollbacks={cfg.max_rollbacks}. Lower the learning rates, keep "
                "train.grad_clip > 0, enable model.spectral_norm or raise train.max_rollbacks.")
        # A fresh copy: optimisers adopt loaded CPU tensors as their own state and update them in place.
        trainer.restore(cpu_copy(self.good_state), self.cfg.rollback_lr_factor)
        self.bad_steps = 0
        self.counters["rollbacks"] += 1

    def load_counters(self, counters: dict[str, int]) -> None:
        self.counters.update({k: counters[k] for k in self.counters if k in counters})

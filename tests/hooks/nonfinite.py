"""Fault injection for tests, kept out of the product: NaN losses on chosen train steps.

``poison(target, start, steps)`` makes every loss of the ``train_step`` calls numbered
[start, start + steps) (in execution order, a count that rollbacks never rewind) NaN, so their gradients
are NaN and the real divergence guard has to catch them. Every DDP worker poisons the same steps.
``target`` is one trainer, or the ``VAEGANTrainer`` class (every trainer of the process).

Processes a test starts (the CLI, Ray's workers) get it through ``sitecustomize.py`` in this folder:
put the folder on PYTHONPATH and set ``VAEGAN_TEST_POISON=start:steps`` (``poisoned_env``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

HOOKS = Path(__file__).resolve().parent
ENV = "VAEGAN_TEST_POISON"


def poison(target: Any, start: int, steps: int) -> None:
    original = target._backward
    if isinstance(target, type):
        def _backward(self, loss, inputs, retain_graph):
            original(self, _maybe_nan(self, loss, start, steps), inputs, retain_graph)
        target._backward = _backward
    else:  # ``original`` is bound to this trainer already
        target._backward = lambda loss, inputs, retain_graph: original(
            _maybe_nan(target, loss, start, steps), inputs, retain_graph)


def _maybe_nan(trainer: Any, loss: Any, start: int, steps: int) -> Any:
    return loss * float("nan") if start <= trainer.executed_steps < start + steps else loss


def poisoned_env(start: int, steps: int) -> dict[str, str]:
    """Environment for a subprocess whose every trainer gets ``poison(..., start, steps)``."""
    path = os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, ENV: f"{start}:{steps}"}

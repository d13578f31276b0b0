"""Fault injection for tests, kept out of the product: NaN losses on chosen train steps.

``poison(target, start, steps)`` makes every loss of the ``train_step`` calls numbered
[start, start + steps) (in execution order, a count that rollbacks never rewind) NaN, so their gradients
are NaN and the real divergence guard has to catch them. Every DDP worker poisons the same steps.
``target`` is one trainer, or the ``VAEGANTrainer`` class (every trainer of the process).

Processes a test does not run itself (Ray's workers) get it through ``sitecustomize.py`` in this folder:
a Ray head started with ``hook_env(path)`` runs every worker with it, and each trainer reads ``path``
("start:steps", written by ``armed``) at its first step; no file, no poison. So one head serves poisoned
and clean runs alike (conftest's ``shared_ray``).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HOOKS = Path(__file__).resolve().parent
FILE_ENV = "VAEGAN_TEST_POISON_FILE"


def poison(target: Any, start: int, steps: int) -> None:
    original = target._backward
    if isinstance(target, type):
        def _backward(self, loss, inputs, retain_graph):
            original(self, _maybe_nan(self, loss, start, steps), inputs, retain_graph)
        target._backward = _backward
    else:  # ``original`` is bound to this trainer already
        target._backward = lambda loss, inputs, retain_graph: original(
            _maybe_nan(target, loss, start, steps), inputs, retain_graph)


def poison_from_file(trainer_class: type, path: Path) -> None:
    """``poison`` every trainer of ``trainer_class`` with the steps ``path`` names when it first trains."""
    original = trainer_class._backward

    def _backward(self, loss, inputs, retain_graph):
        if not hasattr(self, "_test_poison"):
            self._test_poison = read_spec(path)
        if self._test_poison:
            loss = _maybe_nan(self, loss, *self._test_poison)
        original(self, loss, inputs, retain_graph)
    trainer_class._backward = _backward


def read_spec(path: Path) -> tuple[int, int] | None:
    with contextlib.suppress(FileNotFoundError):
        start, steps = (int(part) for part in path.read_text().split(":"))
        return start, steps
    return None


def _maybe_nan(trainer: Any, loss: Any, start: int, steps: int) -> Any:
    return loss * float("nan") if start <= trainer.executed_steps < start + steps else loss


def hook_env(path: Path) -> dict[str, str]:
    """Environment for a Ray head whose workers' trainers read their poison from ``path``."""
    pythonpath = os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": pythonpath, FILE_ENV: str(path)}


@contextlib.contextmanager
def armed(path: Path, start: int, steps: int) -> Iterator[None]:
    """Trainers that start while this is open poison train steps [start, start + steps)."""
    path.write_text(f"{start}:{steps}")
    try:
        yield
    finally:
        path.unlink()

"""The run ledger: the one channel from a training run's rank 0 to the driver, beside Ray's storage.

Checkpoints hold the state at the end of an epoch, so a worker killed mid-epoch loses the steps since;
only a record written outside the checkpoint can say how many. Rank 0 keeps ``<name>.progress.json``:
the last step reached, the running totals of restarts, steps redone and recovery seconds (which must
survive several restarts between two checkpoints), the count of MLflow calls still unsent at the last
report, and, when training gave up, why. The driver reads it once ``fit`` returns.

It is written at most once a second while training runs (a killed process loses less than a second of
progress, which the redone count may then miss) and always at the end of an epoch and on divergence.
"""
from __future__ import annotations

import json
import time
from typing import Any

from . import store

WRITE_INTERVAL_S = 1.0


def ledger_path(storage: str, name: str) -> str:
    """Where training run ``name``'s ledger lives (Ray owns the folder named ``name`` itself): a path or URI."""
    return store.join(storage, f"{name}.progress.json")


def read_ledger(path: str) -> dict[str, Any]:
    return json.loads(store.read_text(path)) if store.exists(path) else {}


class FaultLedger:
    """How often this training run was restarted and how many steps it had to redo; see the module doc."""

    def __init__(self, path: str, resumed_step: int, writer: bool):
        self.path, self.writer = path, writer
        last = read_ledger(path)
        if not last:
            self.totals = {"restarts": 0, "steps_redone": 0, "recovery_seconds": 0.0}
        else:  # a previous attempt of this run got as far as last["step"]: everything since the checkpoint is redone
            self.totals = {"restarts": last["restarts"] + 1,
                           "steps_redone": last["steps_redone"] + max(0, last["step"] - resumed_step),
                           "recovery_seconds": round(last["recovery_seconds"] + time.time() - last["time"], 3)}
            if writer:
                print(f"[train] restart {self.totals['restarts']}: redoing {last['step'] - resumed_step} steps "
                      f"(from step {resumed_step}); {time.time() - last['time']:.1f}s since the last step",
                      flush=True)
        self.step, self.unsent, self.diverged = resumed_step, 0, ""
        self.written_at = 0.0
        self.write()

    def record(self, step: int) -> None:
        """After every train step: cheap, since it writes only when a second has passed."""
        self.step = step
        if time.monotonic() - self.written_at >= WRITE_INTERVAL_S:
            self.write()

    def end_epoch(self, step: int, unsent: int) -> None:
        self.step, self.unsent = step, unsent
        self.write()

    def give_up(self, reason: str) -> None:
        self.diverged = reason
        self.write()

    def write(self) -> None:
        if self.writer:
            # Not fsynced: surviving a killed process is the point, not a machine crash.
            store.write_text(self.path, json.dumps({"step": self.step, "time": time.time(), **self.totals,
                                                    "mlflow_unsent": self.unsent, "diverged": self.diverged}),
                             durable=False)
        self.written_at = time.monotonic()

    def metrics(self) -> dict[str, float]:
        return {f"fault/{name}": float(value) for name, value in self.totals.items()}

"""One Tune trial: a real Ray Train run of the config with the trial's overrides, whose every epoch report
Tune sees, with its checkpoint when the scheduler needs one (PBT).

The Train run goes in a thread of the trial; its reports come back through a queue (``TrialReports``) and
the trial reports them to Tune, so that Tune holds each checkpoint as the trial's own. A trial that Tune
starts from a checkpoint (PBT's exploit of a donor, or its own after a pause) starts a new Train run from it,
named after the trial and that checkpoint, so that a retry of the same start resumes that run.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
from pathlib import Path
from typing import Any, Callable

from ray import tune as ray_tune
from ray.exceptions import RayActorError
from ray.train import Checkpoint
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Empty, Queue

from pipelines.config import PipelineConfig, flatten, merge
from pipelines.context import RunContext
from pipelines.training import fit_tracked
from vaegan.config import from_dict

# In a trial's first report after it took over another trial's checkpoint: that trial's folder name, which the
# driver's TrialHistory turns into its id (a trial id cannot be read off a folder name: its form depends on the
# search algorithm).
DONOR = "pbt/donor"
PARAM = "param/"  # the prefix of the trial's current overrides in every report (PBT changes them mid-trial)
_END = "end"  # what the Train thread puts on the queue when it returns or raises


class TrialReports(UserCallback):
    """Hands each report of a trial's Train run (rank 0's metrics and its checkpoint, if any) to the trial,
    through a queue the Train controller reaches (it runs in another process)."""

    def __init__(self):
        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None) -> None:
        self.queue.put((metrics[0], checkpoint))


def make_trial(base: dict[str, Any], ctx: RunContext, data: str, image_shape: list[int], featnet: str, *,
               prefix: str, train_limit: int, keep_checkpoints: bool) -> Callable[[dict[str, Any]], None]:
    """The trial function for the Tuner: the config dict ``base`` with the trial's overrides, trained over the
    preprocess folder ``data``; ``keep_checkpoints`` hands every Train checkpoint to Tune (PBT exploits them)."""

    def trial(overrides: dict[str, Any]) -> None:
        trial_cfg = from_dict(PipelineConfig, merge(base, overrides))
        trial_id = ray_tune.get_context().get_trial_id()
        start = ray_tune.get_checkpoint()
        name = prefix + trial_id + (f"-{hashlib.sha1(start.path.encode()).hexdigest()[:8]}" if start else "")
        params = {PARAM + key: value for key, value in flatten(overrides).items()}
        donor = Path(start.path).parent.name if start else ""
        first = {DONOR: donor} if donor and donor != Path(ray_tune.get_context().get_trial_dir()).name else {}
        reports = TrialReports()
        outcome: dict[str, BaseException] = {}

        def train() -> None:
            try:
                fit_tracked(trial_cfg, ctx, data, image_shape, featnet, name=name, params=flatten(overrides),
                            train_limit=train_limit, callbacks=[reports], status_on_error=None, start_from=start)
            except BaseException as err:  # re-raised in the trial's own thread, where Tune sees it
                outcome["error"] = err
            finally:
                # When a scheduler stops the trial, Tune removes its placement group, and the queue's actor with
                # it: the trial is over and nothing reads the queue any more.
                with contextlib.suppress(RayActorError):
                    reports.queue.put(_END)

        thread = threading.Thread(target=train, name=f"train-{trial_id}", daemon=True)
        thread.start()
        while (item := next_report(reports.queue, thread)) != _END:
            metrics, checkpoint = item
            ray_tune.report({**metrics, **params, **first},
                            checkpoint=tune_checkpoint(checkpoint) if keep_checkpoints else None)
            first = {}
        thread.join()
        if "error" in outcome:
            raise outcome["error"]

    return trial


def tune_checkpoint(checkpoint: Checkpoint | None) -> ray_tune.Checkpoint | None:
    """The Train run's checkpoint as the class Tune's report takes (the same files: Tune keeps them as the
    trial's own)."""
    return checkpoint and ray_tune.Checkpoint(checkpoint.path, filesystem=checkpoint.filesystem)


def next_report(queue: Queue, thread: threading.Thread) -> Any:
    """The next item on ``queue``; ``_END`` if the Train thread died without saying so."""
    while True:
        try:
            return queue.get(timeout=5)
        except Empty:
            if not thread.is_alive() and queue.empty():
                return _END

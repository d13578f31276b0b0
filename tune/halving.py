"""Synchronous successive halving (``tune.scheduler: sha``): every trial trains to the first rung and pauses
there; once all of them have, the best 1/``reduction_factor`` resume from their checkpoints to the next rung,
and so on until the last ones train to ``max_t``.

ASHA judges a trial at a rung only against the trials that reached it before, so its cost depends on the order
in which trials arrive (docs/benchmarks.md, section 4). Here every trial at a rung is judged against all the
others, so the cost is fixed by the trial count and the rungs, in any order: 27 trials, rungs at epochs 1, 2 and
4 of 8, halving: 27 + 14 + 7 x 2 + 4 x 4 = 71 trial-epochs, against 216 for running them all.

A paused trial holds no slot, so the slots (the trials that fit at once) are counted here, over the running
trials only, and the search asks for a new trial only while one is free (``SlotGate``). The search's own limit
would count the paused trials as live and never fill the first rung.

    scheduler = SuccessiveHalving(metric="val/fid", mode="min", time_attr="epoch", max_t=8, grace_period=1,
                                  reduction_factor=2, slots=2)
    search_alg = SlotGate(scheduler, random_state=0)
"""
from __future__ import annotations

import math

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator


def milestones(max_t: int, grace_period: int, reduction_factor: int) -> list[int]:
    """The rungs' epochs: ``grace_period`` times powers of ``reduction_factor`` below ``max_t``, then ``max_t``."""
    rungs, epoch = [], grace_period
    while epoch < max_t:
        rungs.append(epoch)
        epoch *= reduction_factor
    return rungs + [max_t]


class SuccessiveHalving(FIFOScheduler):
    """One bracket of synchronous successive halving over every trial the search creates."""

    # One result at a time, so that a trial pauses at the epoch of its rung and not after it.
    _supports_buffered_results = False

    def __init__(self, *, metric: str, mode: str, time_attr: str, max_t: int, grace_period: int,
                 reduction_factor: int, slots: int):
        super().__init__()
        self._metric, self._mode = metric, mode
        self._time_attr, self._max_t = time_attr, max_t
        self._rungs = milestones(max_t, grace_period, reduction_factor)
        self._reduction_factor, self._slots = reduction_factor, slots
        self._rung = 0  # index into self._rungs of the rung the live trials train to
        self._live: list[Trial] = []  # the trials still in the bracket
        self._scores: dict[Trial, float] = {}  # lower is better, at the current rung's epoch
        self._promoted: list[Trial] = []  # paused trials that go on to the current rung, not yet resumed
        self.search_finished = lambda: False  # set by SlotGate: the search will create no more trials

    def free_slots(self) -> int:
        return self._slots - sum(trial.status in (Trial.PENDING, Trial.RUNNING) for trial in self._live)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._live.append(trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        epoch = result[self._time_attr]
        if epoch >= self._max_t:
            return TrialScheduler.STOP
        if epoch < self._rungs[self._rung]:
            return TrialScheduler.CONTINUE
        value = result[self._metric]
        self._scores[trial] = value if self._mode == "min" else -value
        return TrialScheduler.PAUSE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        """A finished, failed or stopped trial leaves the bracket (its rung no longer waits for it)."""
        if trial in self._live:
            self._live.remove(trial)
        self._scores.pop(trial, None)
        if trial in self._promoted:
            self._promoted.remove(trial)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """Halve once every trial has reached the rung, then resume the promoted trials while slots are free
        (new trials start through the search, ``SlotGate``)."""
        if self._rung_reached():
            self._halve(tune_controller)
        if self.free_slots() > 0:
            for trial in self._promoted:
                if trial.status == Trial.PAUSED:
                    self._promoted.remove(trial)
                    return trial
        return None

    def _rung_reached(self) -> bool:
        return self.search_finished() and bool(self._live) and all(trial in self._scores for trial in self._live)

    def _halve(self, tune_controller) -> None:
        ranked = sorted(self._live, key=self._scores.__getitem__)
        kept = math.ceil(len(ranked) / self._reduction_factor)
        # The bracket moves on before stopping anything: Tune calls on_trial_remove for each stopped trial.
        self._live, self._promoted, self._scores = ranked[:kept], ranked[:kept], {}
        self._rung += 1
        for trial in ranked[kept:]:
            tune_controller.stop_trial(trial)

    def debug_string(self) -> str:
        return (f"Using synchronous successive halving: rung {self._rung + 1} of {len(self._rungs)} "
                f"(epoch {self._rungs[self._rung]}), {len(self._live)} trials live, {len(self._scores)} there")


class SlotGate(BasicVariantGenerator):
    """Random draws (Tune's variant generator) that create a trial only while ``scheduler`` has a free slot."""

    def __init__(self, scheduler: SuccessiveHalving, **kwargs):
        super().__init__(**kwargs)
        self._scheduler = scheduler
        scheduler.search_finished = self.is_finished

    def next_trial(self):
        return super().next_trial() if self._scheduler.free_slots() > 0 else None

"""Replays Ray's ASHA rule over a grid's per-epoch history: what ASHA would have spent, and found, had the
grid's points arrived in another order.

ASHA judges a trial at a rung only against the trials that reached that rung before it, so its cost depends
on the order in which trials arrive. One real ASHA run measures one order. Replaying Ray's own rung bookkeeping
(``async_hyperband._Bracket``) over the grid's history, with each epoch taking as long as it took in the grid
and ``slots`` trials at once, shows where that order stands among the others.

    histories = read_histories(Path("benchmarks/results/sweep_reports/grid/history.csv"), keys, "val/fid")
    spent, best = replay(histories, order, max_t=8, grace_period=1, reduction_factor=2, slots=2)
"""
from __future__ import annotations

import csv
import heapq
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Hashable

import numpy as np

Epoch = tuple[float, float]  # (seconds, metric) of one epoch of one trial; lower metric is better


def read_histories(history_csv: Path, keys: tuple[str, ...], metric: str) -> dict[tuple, list[Epoch]]:
    """Each grid point's epochs, keyed by its values of ``keys`` (the report's ``param/<key>`` columns)."""
    histories: dict[tuple, list[tuple[int, float, float]]] = {}
    with open(history_csv, newline="") as f:
        for row in csv.DictReader(f):
            point = tuple(float(row[f"param/{key}"]) for key in keys)
            histories.setdefault(point, []).append((int(float(row["epoch"])), float(row["epoch_seconds"]),
                                                    float(row[metric])))
    return {point: [(seconds, value) for _, seconds, value in sorted(epochs)] for point, epochs in histories.items()}


def replay(histories: dict[Hashable, list[Epoch]], order: list[Hashable], max_t: int, grace_period: int,
           reduction_factor: int, slots: int) -> tuple[int, float]:
    """Trial-epochs Ray's ASHA rule spends when ``order``'s trials start as slots free up, and the lowest metric
    a trial last reported (Tune's best)."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket
    bracket = _Bracket(min_t=grace_period, max_t=max_t, reduction_factor=reduction_factor, s=0)
    running: list[tuple[float, int, int]] = []  # a heap of (when the next epoch ends, position in order, epoch)
    spent, last = 0, {}

    def start(position: int, now: float) -> None:
        heapq.heappush(running, (now + histories[order[position]][0][0], position, 1))

    for position in range(min(slots, len(order))):
        start(position, 0.0)
    next_position = min(slots, len(order))
    while running:
        now, position, epoch = heapq.heappop(running)
        seconds_and_metric = histories[order[position]]
        spent += 1
        metric = last[position] = seconds_and_metric[epoch - 1][1]
        # ASHA hands the bracket rewards, higher is better: the metric negated, as for mode="min".
        stopped = bracket.on_result(SimpleNamespace(trial_id=position), epoch, -metric) == TrialScheduler.STOP
        if stopped or epoch >= min(max_t, len(seconds_and_metric)):
            if next_position < len(order):
                start(next_position, now)
                next_position += 1
        else:
            heapq.heappush(running, (now + seconds_and_metric[epoch][0], position, epoch + 1))
    return spent, min(last.values())


def summary(histories: dict[Hashable, list[Epoch]], orders: dict[str, list[Hashable]], random_orders: int,
            seed: int, **asha) -> dict:
    """The compute fraction (trial-epochs over the grid's) and best gap (relative to the grid's best) of each
    named order, and their spread over ``random_orders`` shuffles seeded by ``seed``."""
    grid_epochs = sum(min(asha["max_t"], len(epochs)) for epochs in histories.values())
    grid_best = min(epochs[min(asha["max_t"], len(epochs)) - 1][1] for epochs in histories.values())

    def figures(order: list[Hashable]) -> tuple[float, float]:
        spent, best = replay(histories, order, **asha)
        return spent / grid_epochs, (best - grid_best) / grid_best

    named = {name: dict(zip(("compute_fraction", "best_gap"), (round(v, 3) for v in figures(order))))
             for name, order in orders.items()}
    rng, points = random.Random(seed), list(histories)
    shuffled = np.array([figures(rng.sample(points, len(points))) for _ in range(random_orders)])
    fractions, gaps = shuffled[:, 0], shuffled[:, 1]
    spread = {"orders": random_orders, "seed": seed,
              "compute_fraction": {f"p{q}": round(float(np.percentile(fractions, q)), 3) for q in (10, 50, 90)}
              | {"mean": round(float(fractions.mean()), 3), "max": round(float(fractions.max()), 3)},
              "best_gap": {"mean": round(float(gaps.mean()), 4), "max": round(float(gaps.max()), 4)}}
    return {"rule": "ray.tune.schedulers.async_hyperband._Bracket", **asha, **named, "random_orders": spread}

"""How a sweep searches: its scheduler (ASHA, synchronous successive halving or PBT) and its search algorithm
(random draws or Optuna).

    scheduler = make_scheduler(cfg.tune, space, slots)               # ASHA, SHA, or PBT perturbing ``space``'s keys
    search_alg = make_search(cfg.tune, slots, points, scheduler)     # random draws, or Optuna (one or more objectives)
"""
from __future__ import annotations

from typing import Any

from ray import tune as ray_tune
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.sample import Categorical

from pipelines.config import TuneConfig

from .halving import SlotGate, SuccessiveHalving
from .objectives import OBJECTIVES

EPOCH = "epoch"  # the reported epoch: PBT's clock, so that perturbation_interval counts epochs


def make_scheduler(tune_cfg: TuneConfig, space: dict[str, Any], slots: int) -> TrialScheduler:
    """ASHA or synchronous successive halving (``slots`` trials at once) on the first objective, or PBT, which
    perturbs every key of ``space`` (the search space)."""
    metric = tune_cfg.objectives[0]
    if tune_cfg.scheduler == "asha":
        return ASHAScheduler(metric=metric, mode=OBJECTIVES[metric], max_t=tune_cfg.max_epochs,
                             grace_period=tune_cfg.grace_period, reduction_factor=tune_cfg.reduction_factor)
    if tune_cfg.scheduler == "sha":
        return SuccessiveHalving(metric=metric, mode=OBJECTIVES[metric], time_attr=EPOCH, max_t=tune_cfg.max_epochs,
                                 grace_period=tune_cfg.grace_period, reduction_factor=tune_cfg.reduction_factor,
                                 slots=slots)
    # Synchronous, so that a seed gives one history. It waits only for live trials, and the search creates no
    # more trials than fit at once (make_search's max_concurrent), so a larger population runs in waves that
    # exploit only within themselves (measured: docs/benchmarks.md, section 4): size it to the trials that fit.
    return PopulationBasedTraining(time_attr=EPOCH, metric=metric, mode=OBJECTIVES[metric],
                                   perturbation_interval=tune_cfg.perturbation_interval,
                                   hyperparam_mutations=mutations(space), synch=True)


def mutations(space: dict[str, Any]) -> dict[str, Any]:
    """PBT's mutations of ``space``: a range is resampled or scaled by 0.8 or 1.2; a choice moves to a
    neighbouring category (as a list, which PBT shifts, rather than a domain, which it would scale)."""
    return {key: mutations(value) if isinstance(value, dict)
            else list(value.categories) if isinstance(value, Categorical) else value
            for key, value in space.items()}


def make_search(tune_cfg: TuneConfig, max_concurrent: int, points: list[dict[str, Any]] | None = None,
                scheduler: TrialScheduler | None = None) -> Searcher | ray_tune.search.BasicVariantGenerator:
    """Random draws (Tune's variant generator) or Optuna's TPE sampler over every objective, at most
    ``max_concurrent`` trials at once (under successive halving, the running ones: ``scheduler`` counts them);
    random search starts with ``points`` (nested overrides) in their order."""
    if isinstance(scheduler, SuccessiveHalving):
        return SlotGate(scheduler, points_to_evaluate=points, random_state=tune_cfg.seed)
    if tune_cfg.search == "random":
        return ray_tune.search.BasicVariantGenerator(points_to_evaluate=points, random_state=tune_cfg.seed,
                                                     max_concurrent=max_concurrent)
    if points:
        raise ValueError("sweep points (e.g. a grid's) need tune.search=random; Optuna proposes its own")
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    objectives = tune_cfg.objectives
    sampler = optuna.samplers.TPESampler(seed=tune_cfg.seed)  # multi-objective too (MOTPE) when given several
    metric, mode = (objectives[0], OBJECTIVES[objectives[0]]) if len(objectives) == 1 else \
        (list(objectives), [OBJECTIVES[m] for m in objectives])
    return ConcurrencyLimiter(OptunaSearch(metric=metric, mode=mode, sampler=sampler),
                              max_concurrent=max_concurrent)

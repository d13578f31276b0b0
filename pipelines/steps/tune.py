"""DAG step 2, tune (Ray Tune over Ray Train): search loss weights and learning rates.

Inputs:  the preprocess step's shards and feature net; the config's ``tune`` section.
Outputs: the best trial's ``overrides`` (which the train step applies); under PBT also its latest
         checkpoint (which the train step continues from); and the sweep report ``trials.csv`` /
         ``trials.md`` / ``trials.png`` (one row per trial), ``pareto.*``, ``pbt.png``. The sweep itself
         is ``tune/``'s.
Run it:  ``vaegan sweep --config pipelines/configs/smoke.yaml``
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tune.objectives import OBJECTIVES
from tune.space import left_as_given, searchable_keys
from vaegan.config import _require

from ..config import PipelineConfig, check_batch_fits
from ..context import RunContext, StepOutputs
from . import preprocess


@dataclasses.dataclass
class Inputs:
    preprocess: preprocess.Outputs


# Everything a trial trains with, and the search budget (data and evaluation are upstream or downstream).
CACHE_KEY = ("model", "loss", "opt_enc", "opt_dec", "opt_dis", "train", "tune")


@dataclasses.dataclass(kw_only=True)
class Outputs(StepOutputs):
    enabled: bool
    overrides: dict[str, Any]  # nested like the config; {} when the sweep is off
    left_as_given: list[str] = dataclasses.field(default_factory=list)  # searchable keys the user set
    best_score: float | None = None
    trials: int = 0
    trial_epochs: int = 0
    report: list[str] = dataclasses.field(default_factory=list)
    concurrent_trials: int = 0  # the trials that ran at once
    checkpoint: str = ""  # PBT: the folder (in this step's) of the winner's model, which the train step continues


def check(cfg: PipelineConfig) -> None:
    """On the driver, before any compute: every key in ``tune.search_keys`` is one the sweep can search, and
    every objective a figure the trials report."""
    allowed = searchable_keys(cfg.model.kind)
    for key in cfg.tune.search_keys:
        _require(key in allowed, "tune.search_keys", key,
                 f"keys the {cfg.model.kind} sweep searches ({', '.join(allowed)})")
    for objective in cfg.tune.objectives:
        _require(objective in OBJECTIVES, "tune.objectives", objective, ", ".join(OBJECTIVES))


def cache_extra(cfg: PipelineConfig, ctx: RunContext) -> dict[str, Any]:
    """Which keys are searched: a key given at its default value changes no config section, but it does
    change the search."""
    return {"searched": [k for k in searchable_keys(cfg.model.kind)
                         if k not in left_as_given(cfg.model.kind, cfg.given_keys, cfg.tune.search_keys)]}


def run(cfg: PipelineConfig, ctx: RunContext, inputs: Inputs, out: Path) -> Outputs:
    if not cfg.tune.enabled:
        return Outputs(enabled=False, overrides={}, folder=str(out))
    data = inputs.preprocess
    if 0 < cfg.tune.train_limit < data.train_rows:
        check_batch_fits(cfg, cfg.tune.train_limit, f"tune.train_limit={cfg.tune.train_limit} training images per trial")
    else:
        check_batch_fits(cfg, data.train_rows, data.train_rows_source)  # the real count; the driver's may be an estimate
    featnet, _ = data.feature_net(ctx.featnet_cache(cfg.data.data_dir), cfg.eval)
    from tune import sweep  # Ray Tune and Train: here, not at the top, for the driver imports this module
    outcome = sweep.run(cfg, ctx, data.folder, data.image_shape, featnet, out)
    return Outputs(enabled=True, folder=str(out), **dataclasses.asdict(outcome))

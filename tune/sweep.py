"""The sweep (Ray Tune over Ray Train): search loss weights and learning rates with ASHA.

Every trial is a real Ray Train run (``pipelines.training.fit_tracked``) named after its trial id, so a
retried trial resumes from its own checkpoints. Trials are chosen by the validation domain FID
(``val/fid``, lower is better), the same score that picks checkpoints and moves the registry alias.
The report (``report.py``) lands in the calling step's folder.

    outcome = sweep.run(cfg, ctx, data_folder, image_shape, featnet, out)  # ctx.step_key names the trials
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import ray
from ray import tune as ray_tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from pipelines import store, tracking
from pipelines.config import PipelineConfig, flatten, merge
from pipelines.context import RunContext
from pipelines.training import SCORE, fit_tracked, holds_train_split
from vaegan.config import from_dict

from .report import trial_rows, write_report
from .space import left_as_given, search_space


@dataclasses.dataclass
class SweepOutcome:
    """The best trial's overrides (nested like the config) and what the sweep cost."""

    overrides: dict[str, Any]
    left_as_given: list[str]  # searchable keys the user gave, which the sweep did not touch
    best_score: float
    trials: int
    trial_epochs: int
    report: list[str]  # file names in the output folder


def max_concurrent_trials(cfg: PipelineConfig, resources: dict[str, float], streamed: bool) -> int:
    """Trials that fit at once in ``resources`` (the cluster's), at most ``tune.max_concurrent`` (0: no cap): by
    GPUs, or by CPUs. Trials whose train split is ``streamed`` by Ray Data leave one CPU free for Data's read
    tasks, so that Data, Tune and Train never wait on each other; a held split (the usual case) needs none, and
    on a 2-core box two 1-CPU trials then run side by side (docs/benchmarks.md measures it)."""
    if cfg.train.use_gpu:
        fit = int(resources.get("GPU", 0)) // cfg.train.num_workers
    else:
        fit = (int(resources.get("CPU", 1)) - int(streamed)) // (cfg.train.num_workers * cfg.train.cpus_per_worker)
    return max(1, min(fit, cfg.tune.max_concurrent) if cfg.tune.max_concurrent else fit)


def trial_train_keys(cfg: PipelineConfig) -> dict[str, int]:
    """The train keys a trial sets: its epoch budget, and its workers' CPUs when ``tune.cpus_per_worker`` is set."""
    keys = {"epochs": cfg.tune.max_epochs}
    if cfg.tune.cpus_per_worker:
        keys["cpus_per_worker"] = cfg.tune.cpus_per_worker
    return keys


def run(cfg: PipelineConfig, ctx: RunContext, data: str, image_shape: list[int], featnet: str,
        out: Path, param_space: dict[str, Any] | None = None) -> SweepOutcome:
    """Run the sweep over the preprocess folder ``data`` (a path or URI, as is ``featnet``); ``param_space`` replaces ``search_space(cfg.model.kind)`` (e.g. ``tune.space.grid_space``
    for a grid, with ``tune.num_samples=1``: each grid point then runs once)."""
    trial_base = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **trial_train_keys(cfg)))
    base = dataclasses.asdict(trial_base)
    kept = left_as_given(cfg.model.kind, cfg.given_keys, cfg.tune.search_keys)
    if kept:
        print(f"[tune] leaving {', '.join(f'{k}={flatten(base)[k]}' for k in kept)} as given; list them in "
              "tune.search_keys to search them", flush=True)
    prefix = f"trial-{ctx.step_key}-"
    streamed = not holds_train_split(store.local_view(data) / "split=train", image_shape, cfg.tune.train_limit)

    def trial(overrides: dict[str, Any]) -> None:
        """One trial: a Ray Train run of the config with this trial's overrides."""
        trial_cfg = from_dict(PipelineConfig, merge(base, overrides))
        fit_tracked(trial_cfg, ctx, data, image_shape, featnet,
                    name=prefix + ray_tune.get_context().get_trial_id(), params=flatten(overrides),
                    train_limit=cfg.tune.train_limit, callbacks=[TuneReportCallback()], status_on_error=None)

    storage_fs, storage_path = store.filesystem(store.join(ctx.run_dir, "ray"))
    tuner = ray_tune.Tuner(
        # A trial only drives its Train run, so it must hold no CPU (an actor never lends its CPU back while it
        # waits); Tune refuses an empty request, so it asks for a little memory instead.
        ray_tune.with_resources(trial, {"memory": 64 * 1024**2}),
        param_space=param_space or search_space(cfg.model.kind, leave=tuple(kept)),
        tune_config=ray_tune.TuneConfig(
            metric=SCORE, mode="min", num_samples=cfg.tune.num_samples,
            scheduler=ASHAScheduler(max_t=cfg.tune.max_epochs, grace_period=cfg.tune.grace_period,
                                    reduction_factor=cfg.tune.reduction_factor),
            search_alg=ray_tune.search.BasicVariantGenerator(random_state=cfg.tune.seed,
                                                             max_concurrent=max_concurrent_trials(
                                                                 trial_base, ray.cluster_resources(), streamed))),
        run_config=ray_tune.RunConfig(name=f"tune-{ctx.step_key}", storage_path=storage_path,
                                      storage_filesystem=storage_fs, verbose=1),
    )
    results = tuner.fit()
    # Trial runs are closed here, by Tune's verdict, rather than by the trials themselves: Tune tears a trial
    # down as soon as it reports its last epoch or ASHA stops it, often before the trial's own code runs again.
    finished = {prefix + r.metrics["trial_id"] for r in results if r.error is None and r.metrics}
    tracking.close_children(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, prefix, finished)
    rows = trial_rows(results, SCORE)
    report = write_report(rows, SCORE, out)
    tracking.log_artifacts(ctx.tracking_uri, ctx.parent_run_id, report, "tune")
    epochs = sum(r["epochs"] for r in rows)
    print(f"[tune] {len(rows)} trials, {epochs} trial-epochs; "
          f"report: {', '.join(p.name for p in report)} in the tune step's folder", flush=True)
    best = results.get_best_result()
    if best.metrics is None or SCORE not in best.metrics or not math.isfinite(best.metrics[SCORE]):
        raise RuntimeError(f"no Tune trial reported {SCORE}; errors: {[r.error for r in results]}")
    print(f"[tune] best trial {SCORE}={best.metrics[SCORE]:.3f} with {flatten(best.config)}", flush=True)
    return SweepOutcome(overrides=best.config, left_as_given=kept, best_score=best.metrics[SCORE], trials=len(rows),
                        trial_epochs=epochs, report=[p.name for p in report])

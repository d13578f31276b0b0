"""The sweep (Ray Tune over Ray Train): search loss weights and learning rates with ASHA or PBT, drawing
trials at random or with Optuna (``search.py``).

Every trial is a real Ray Train run (``trial.py``) named after its trial id, so a retried trial resumes from
its own checkpoints. Trials are ranked by the first of ``tune.objectives`` (by default the validation domain
FID, ``val/fid``, the score that also picks checkpoints and moves the registry alias); with several, the
winner is ``search.pick``'s. The report (``report.py``) lands in the calling step's folder.

    outcome = sweep.run(cfg, ctx, data_folder, image_shape, featnet, out)  # ctx.step_key names the trials
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import ray
from ray import tune as ray_tune

from pipelines import store, tracking
from pipelines.config import PipelineConfig, flatten
from pipelines.context import RunContext
from pipelines.training import holds_train_split
from vaegan.checkpoint import CHECKPOINT_NAME

from .report import TrialHistory, trial_rows, write_report
from .objectives import pick
from .search import EPOCH, make_scheduler, make_search
from .space import left_as_given, search_space
from .trial import make_trial

PAUSING = ("pbt", "sha")  # schedulers that pause trials, which resume from the checkpoint of the epoch they paused at
BEST_MODEL = "best_model"  # the folder, in the output folder, of the winner's model (PBT: the train step continues it)


@dataclasses.dataclass
class SweepOutcome:
    """The best trial's overrides (nested like the config) and what the sweep cost."""

    overrides: dict[str, Any]
    left_as_given: list[str]  # searchable keys the user gave, which the sweep did not touch
    best_score: float
    trials: int
    trial_epochs: int
    report: list[str]  # file names in the output folder
    concurrent_trials: int  # the trials that ran at once (``max_concurrent_trials``)
    checkpoint: str = ""  # PBT or keep_best: the folder (in the output folder) of the winner's latest checkpoint


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


def waves_warning(population: int, fit: int) -> str:
    """What a PBT population larger than the trials that fit at once costs (measured: docs/benchmarks.md,
    section 4), and the keys that avoid it."""
    return (f"tune.num_samples={population} PBT trials, but {fit} fit at once here: the population runs in waves "
            f"of {fit} that take over checkpoints only within their wave, and the later waves pause and restart "
            f"their Train run after every epoch (docs/benchmarks.md, section 4); set tune.num_samples to at most {fit}, "
            "or give the sweep more CPUs (fewer train.num_workers x tune.cpus_per_worker per trial, or a bigger "
            "cluster)")


def trial_train_keys(cfg: PipelineConfig) -> dict[str, int]:
    """The train keys a trial sets: its epoch budget, its workers' CPUs when ``tune.cpus_per_worker`` is set,
    and under PBT a checkpoint every epoch (the ones PBT's interval lands on must exist)."""
    keys = {"epochs": cfg.tune.max_epochs}
    if cfg.tune.cpus_per_worker:
        keys["cpus_per_worker"] = cfg.tune.cpus_per_worker
    if cfg.tune.scheduler in PAUSING:
        keys["checkpoint_every"] = 1
    return keys


def run(cfg: PipelineConfig, ctx: RunContext, data: str, image_shape: list[int], featnet: str,
        out: Path, param_space: dict[str, Any] | None = None, points: list[dict[str, Any]] | None = None,
        keep_best: bool = False) -> SweepOutcome:
    """Run the sweep over the preprocess folder ``data`` (a path or URI, as is ``featnet``); ``param_space``
    replaces ``search_space(cfg.model.kind)``, and ``points`` (nested overrides, e.g. ``tune.space.grid_points``)
    are the first trials, in their order: a grid is its points with ``tune.num_samples`` = their number.
    ``keep_best`` copies the best trial's latest model into ``out`` (``SweepOutcome.checkpoint``), as PBT always
    does for the train step to continue."""
    trial_base = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **trial_train_keys(cfg)))
    base = dataclasses.asdict(trial_base)
    kept = left_as_given(cfg.model.kind, cfg.given_keys, cfg.tune.search_keys)
    if kept:
        print(f"[tune] leaving {', '.join(f'{k}={flatten(base)[k]}' for k in kept)} as given; list them in "
              "tune.search_keys to search them", flush=True)
    prefix = f"trial-{ctx.step_key}-"
    streamed = not holds_train_split(store.local_view(data) / "split=train", image_shape, cfg.tune.train_limit)
    space = param_space or search_space(cfg.model.kind, leave=tuple(kept))
    pbt = cfg.tune.scheduler == "pbt"
    fit = max_concurrent_trials(trial_base, ray.cluster_resources(), streamed)
    if pbt and cfg.tune.num_samples > fit:
        print(f"[tune] warning: {waves_warning(cfg.tune.num_samples, fit)}", flush=True)
    keep_best = keep_best or pbt
    trial = make_trial(base, ctx, data, image_shape, featnet, prefix=prefix, train_limit=cfg.tune.train_limit,
                       keep_checkpoints=keep_best or cfg.tune.scheduler in PAUSING)
    scheduler = make_scheduler(cfg.tune, space, fit)
    storage_fs, storage_path = store.filesystem(store.join(ctx.run_dir, "ray"))
    history = TrialHistory()
    tuner = ray_tune.Tuner(
        # A trial only drives its Train run, so it must hold no CPU (an actor never lends its CPU back while it
        # waits); Tune refuses an empty request, so it asks for a little memory instead.
        ray_tune.with_resources(trial, {"memory": 64 * 1024**2}),
        param_space=space,
        tune_config=ray_tune.TuneConfig(
            num_samples=cfg.tune.num_samples, scheduler=scheduler, search_alg=make_search(cfg.tune, fit, points,
                                                                                          scheduler)),
        run_config=ray_tune.RunConfig(name=f"tune-{ctx.step_key}", storage_path=storage_path,
                                      storage_filesystem=storage_fs, verbose=1, callbacks=[history],
                                      # PBT's last epoch ends the trial before PBT sees it: a take-over then
                                      # would restart a Train run only to hand back the donor's final model.
                                      stop={EPOCH: cfg.tune.max_epochs} if pbt else None),
    )
    results = tuner.fit()
    # Trial runs are closed here, by Tune's verdict, rather than by the trials themselves: Tune tears a trial
    # down as soon as it reports its last epoch or a scheduler stops or pauses it, often before the trial's own
    # code runs again.
    finished = {prefix + r.metrics["trial_id"] for r in results if r.error is None and r.metrics}
    tracking.close_children(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, prefix, finished)
    objectives = cfg.tune.objectives
    rows = trial_rows(results, objectives, history)
    winner = pick(rows, objectives, cfg.tune.objective_tolerance)
    if winner is None:
        raise RuntimeError(f"no Tune trial reported {', '.join(objectives)}; errors: {[r.error for r in results]}")
    report = write_report(rows, objectives, out, history, winner["trial"], pbt)
    tracking.log_artifacts(ctx.tracking_uri, ctx.parent_run_id, report, "tune")
    epochs = sum(r["epochs"] for r in rows)
    print(f"[tune] {len(rows)} trials, {epochs} trial-epochs; "
          f"report: {', '.join(p.name for p in report)} in the tune step's folder", flush=True)
    best = next(r for r in results if (r.metrics or {}).get("trial_id") == winner["trial"])
    print(f"[tune] best trial {', '.join(f'{m}={winner[m]:.4g}' for m in objectives)} with {flatten(best.config)}",
          flush=True)
    return SweepOutcome(overrides=best.config, left_as_given=kept, best_score=winner[objectives[0]],
                        trials=len(rows), trial_epochs=epochs, report=[p.name for p in report],
                        concurrent_trials=fit, checkpoint=keep_model(best, out) if keep_best else "")


def keep_model(best: ray_tune.Result, out: Path) -> str:
    """Copy the winner's latest checkpoint (its model at the end of the sweep; under PBT, trained under the
    schedule its config ends with) into ``out``; returns the folder's name."""
    if best.checkpoint is None:
        raise RuntimeError(f"the best trial {best.path} left no checkpoint: {best.error}")
    folder = out / BEST_MODEL
    folder.mkdir(exist_ok=True)
    with best.checkpoint.as_directory() as source:
        shutil.copy2(Path(source) / CHECKPOINT_NAME, folder / CHECKPOINT_NAME)
    return BEST_MODEL

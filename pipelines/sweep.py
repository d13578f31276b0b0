"""DAG step 2, tune (Ray Tune over Ray Train): search loss weights and learning rates with ASHA.

Inputs:  the preprocess folder, the feature net, the config's ``tune`` section and ``tune/space.py``.
Outputs: ``trials.csv`` / ``trials.md`` (one row per trial: params, final metric, epochs run),
         and the best trial's overrides, which the train step applies.
Run it:  ``vaegan run --config pipelines/configs/smoke.yaml --steps preprocess,tune``

Every trial is a real Ray Train run (``train.fit``) named after its trial id, so a retried trial
resumes from its own checkpoints. Trials are chosen by the validation domain FID (``val/fid``,
lower is better), the same score that picks checkpoints and moves the registry alias.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

import ray
from ray import tune as ray_tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from tune.space import search_space
from vaegan.config import from_dict

from . import plots, tracking
from . import train as train_step
from .config import PipelineConfig, flatten, merge


def max_concurrent_trials(cfg: PipelineConfig) -> int:
    """Trials that fit at once: by GPUs, or by CPUs while one stays free for Ray Data's read tasks
    (so Data, Tune and Train never wait on each other on a 2-core box)."""
    resources = ray.cluster_resources()
    if cfg.train.use_gpu:
        return max(1, int(resources.get("GPU", 0)) // cfg.train.num_workers)
    cpus_per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker
    return max(1, (int(resources.get("CPU", 1)) - 1) // cpus_per_trial)


def run(cfg: PipelineConfig, ctx, pre_dir: Path, manifest: dict, featnet_path: Path, out: Path,
        key: str, param_space: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the sweep; ``param_space`` replaces ``search_space(cfg.model.kind)`` (e.g. ``tune.space.grid_space``
    for a grid, with ``tune.num_samples=1``: each grid point then runs once)."""
    base = dataclasses.asdict(cfg)
    base["train"]["epochs"] = cfg.tune.max_epochs

    def trial(overrides: dict[str, Any]) -> None:
        """One trial: a Ray Train run of the config with this trial's overrides."""
        trial_id = ray_tune.get_context().get_trial_id()
        trial_cfg = from_dict(PipelineConfig, merge(base, overrides))
        train_step.fit_tracked(trial_cfg, ctx, pre_dir, manifest["image_shape"], featnet_path,
                               name=f"trial-{key}-{trial_id}", params=flatten(overrides),
                               train_limit=cfg.tune.train_limit, callbacks=[TuneReportCallback()],
                               status_on_error=None)

    tuner = ray_tune.Tuner(
        # A trial only drives its Train run, so it must hold no CPU (an actor never lends its CPU back while it
        # waits); Tune refuses an empty request, so it asks for a little memory instead.
        ray_tune.with_resources(trial, {"memory": 64 * 1024**2}),
        param_space=param_space or search_space(cfg.model.kind),
        tune_config=ray_tune.TuneConfig(
            metric=train_step.SCORE, mode="min", num_samples=cfg.tune.num_samples,
            scheduler=ASHAScheduler(max_t=cfg.tune.max_epochs, grace_period=cfg.tune.grace_period,
                                    reduction_factor=cfg.tune.reduction_factor),
            search_alg=ray_tune.search.BasicVariantGenerator(
                random_state=cfg.tune.seed,
                max_concurrent=max_concurrent_trials(cfg))),
        run_config=ray_tune.RunConfig(name=f"tune-{key}", storage_path=str(Path(ctx.run_dir).resolve() / "ray"),
                                      verbose=1),
    )
    results = tuner.fit()
    # Trial runs are closed here, by Tune's verdict, rather than by the trials themselves: Tune tears a trial
    # down as soon as it reports its last epoch or ASHA stops it, often before the trial's own code runs again.
    finished = {f"trial-{key}-{r.metrics['trial_id']}" for r in results if r.error is None and r.metrics}
    tracking.close_children(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, f"trial-{key}-", finished)
    rows = trial_rows(results)
    report = write_report(rows, out)
    tracking.log_artifacts(ctx.tracking_uri, ctx.parent_run_id, report, "tune")
    print(f"[tune] {len(rows)} trials, {sum(r['epochs'] for r in rows)} trial-epochs; "
          f"report: {', '.join(p.name for p in report)} in the tune step's folder", flush=True)
    best = results.get_best_result()
    if best.metrics is None or train_step.SCORE not in best.metrics or not math.isfinite(best.metrics[train_step.SCORE]):
        raise RuntimeError(f"no Tune trial reported {train_step.SCORE}; errors: {[r.error for r in results]}")
    print(f"[tune] best trial {train_step.SCORE}={best.metrics[train_step.SCORE]:.3f} with {flatten(best.config)}",
          flush=True)
    return {"overrides": best.config, "best_score": best.metrics[train_step.SCORE], "trials": len(rows),
            "trial_epochs": sum(r["epochs"] for r in rows), "report": [p.name for p in report]}


def trial_rows(results: ray_tune.ResultGrid) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        # Tune names a trial's folder "<trainable>_<experiment>_<index>_<params...>".
        rows.append({"trial": "_".join(Path(result.path).name.split("_")[1:3]) if result.path else "?",
                     **flatten(result.config or {}), train_step.SCORE: metrics.get(train_step.SCORE, float("nan")),
                     "epochs": int(metrics.get("training_iteration", 0)), "error": str(result.error or "")})
    return sorted(rows, key=lambda r: (math.isnan(r[train_step.SCORE]), r[train_step.SCORE]))


def write_report(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """The trials table as CSV and markdown, best first, and trials.png: the metric against each parameter."""
    columns = list(rows[0]) if rows else []
    with open(out / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    (out / "trials.md").write_text("\n".join(lines) + "\n")
    params = [c for c in columns if c not in ("trial", train_step.SCORE, "epochs", "error")]
    plots.metric_vs_params(rows, params, train_step.SCORE, out / "trials.png")
    return [out / "trials.csv", out / "trials.md", out / "trials.png"]


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

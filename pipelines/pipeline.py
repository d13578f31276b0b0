"""The driver: connect to Ray, open the MLflow parent run, execute the DAG, write ``summary.json``.

``summary.json`` is a contract other tools read: tracking_uri, model_uri, model_name, model_version,
alias_moved, image_shape, metrics, feature_net, data_fingerprint, per-step status/seconds and run_dir.

The run folder is a local path or an object-storage URI (``pipelines/store.py``); a local one is locked
for the driver's lifetime, which object storage cannot do, so there one run dir takes one driver at a time
by convention.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from vaegan.atomic import unwritable_reason
from vaegan.config import ConfigError

from . import dag, shards, store, tracking
from .cluster import check_fits, connect_ray, local_resources
from .config import PipelineConfig, check_batch_fits, flatten
from .context import RunContext, StepResult

SUMMARY_METRICS = ("fid", "fid_fitted_prior", "kid", "precision", "recall", "recon_mse", "elbo", "iwae_nll",
                   "active_units", "elbo_gap")


def check_run_dir(run_dir: Path) -> None:
    """The run folder, or the nearest folder above it that exists, must be writable."""
    reason = unwritable_reason(run_dir)
    if reason is not None:
        existing, problem = reason
        raise ConfigError(f"run folder {str(run_dir)!r} (--run-dir) cannot be written: {str(existing)!r} {problem}; "
                          "allowed: a folder this user can write")


@contextlib.contextmanager
def holding_run_dir(run_dir: Path):
    """Hold an exclusive lock on the run folder for as long as this driver runs. The kernel drops it when
    the driver dies, however it dies: whoever holds it knows that any run left RUNNING there is orphaned."""
    fd = os.open(run_dir, os.O_RDONLY)  # flock works on a folder's descriptor: no lock file to leave behind
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"run folder {str(run_dir)!r} (--run-dir) is in use by another `vaegan` run that "
                              "is still going; allowed: wait for it to end, or another --run-dir") from None
        yield
    finally:
        os.close(fd)


def check_data_fits(cfg: PipelineConfig, steps: list[str]) -> None:
    """The source reads, no split comes out empty (or under shards.MIN_SPLIT_ROWS where ``steps`` score the
    splits) and each Train worker gets at least one batch (workers drop their last partial batch, so a larger
    batch would train on nothing)."""
    counts, exact = shards.split_counts(cfg.data)
    if exact and {"tune", "train", "evaluate"} & set(steps):  # Parquet's estimate: the train step checks again
        shards.check_no_empty_split(counts, cfg.data, shards.MIN_SPLIT_ROWS)
    rows, what = counts["train"], f"{'' if exact else 'an expected '}{counts['train']} training images"
    if cfg.tune.enabled and 0 < cfg.tune.train_limit < rows:
        rows, what = cfg.tune.train_limit, f"tune.train_limit={cfg.tune.train_limit} training images per trial"
    # For Parquet the count is an estimate: the train and tune steps check again with the real one.
    check_batch_fits(cfg, rows, f"{what} of {cfg.data.source or 'Fashion-MNIST'} with data.limit={cfg.data.limit}")


def with_absolute_paths(cfg: PipelineConfig, run_dir: str) -> PipelineConfig:
    """Resolve the data paths against the driver's working directory: Ray workers run elsewhere. A run on
    object storage writes nothing under the working directory, so there a relative ``data.data_dir`` (an IDX
    download and its decompressed copy) resolves under the temporary folder instead."""
    base = Path(tempfile.gettempdir(), "vaegan") if store.is_remote(run_dir) else Path.cwd()
    local_source = cfg.data.source and not store.is_remote(cfg.data.source)
    data = dataclasses.replace(cfg.data, data_dir=str((base / cfg.data.data_dir).resolve()),
                               source=str(Path(cfg.data.source).resolve()) if local_source else cfg.data.source)
    return dataclasses.replace(cfg, data=data)


def run_pipeline(cfg: PipelineConfig, run_dir: str, steps: list[str], force: set[str]) -> dict[str, Any]:
    """Run ``steps`` of the DAG into ``run_dir`` (a local folder or an object-storage URI); returns the summary."""
    cfg = with_absolute_paths(cfg, run_dir)
    # Cheap checks first, on the driver: a user error ends here, before Ray starts or anything is written.
    remote = store.is_remote(run_dir)
    if not remote:
        run_dir = str(Path(run_dir).absolute())
        check_run_dir(Path(run_dir))
    uri = tracking.resolve_tracking_uri(cfg.register.tracking_uri, run_dir)  # on object storage: a server, or one line
    if remote:
        store.check_writable(run_dir, "--run-dir")
    cfg.data.check_source()
    check_data_fits(cfg, steps)
    dag.check_steps(cfg, steps)
    if not os.environ.get("RAY_ADDRESS"):
        check_fits(cfg, local_resources(gpus=cfg.train.use_gpu))
    if remote:
        return run_locked(cfg, run_dir, uri, steps, force)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with holding_run_dir(Path(run_dir)):
        for path in dag.remove_stale_partials(Path(run_dir)):
            print(f"[dag] removed {path.name}, left half-written by an interrupted run", flush=True)
        return run_locked(cfg, run_dir, uri, steps, force)


def run_locked(cfg: PipelineConfig, run_dir: str, uri: str, steps: list[str], force: set[str]) -> dict[str, Any]:
    """The rest of ``run_pipeline``, while this driver alone holds the run folder; ``uri`` is the tracking URI."""
    if cfg.register.tracking_uri:  # it goes into the run's params: without the credentials it may have held
        cfg = dataclasses.replace(cfg, register=dataclasses.replace(cfg.register, tracking_uri=uri))
    experiment_id = tracking.ensure_experiment(uri, cfg.register.experiment, run_dir)  # fails before any compute
    ctx = RunContext(run_dir=run_dir, tracking_uri=uri, experiment_id=experiment_id, parent_run_id="")
    cached = dag.all_cached(cfg, ctx, steps, force)
    if cached is None:
        connect_ray(cfg)
    else:
        print("[dag] every step is complete in the run folder: nothing to run, so no Ray is started", flush=True)
    orphans = tracking.close_left_running(uri, experiment_id, run_dir)
    if orphans:
        print(f"[mlflow] marked KILLED {len(orphans)} runs an interrupted driver left RUNNING: {', '.join(orphans)}",
              flush=True)
    parent = tracking.start_run(uri, experiment_id, f"pipeline-{cfg.name}", params=flatten(dataclasses.asdict(cfg)),
                                run_dir=run_dir)
    ctx = dataclasses.replace(ctx, parent_run_id=parent)
    try:
        results = cached if cached is not None else dag.execute(cfg, ctx, steps, force)
    except BaseException:
        tracking.end_run_if_reachable(uri, parent, "FAILED")
        raise
    summary = build_summary(uri, run_dir, results)
    text = json.dumps(summary, indent=2)
    store.write_text(store.join(run_dir, "summary.json"), text)
    with tempfile.TemporaryDirectory(prefix="vaegan-summary-") as tmp:
        (Path(tmp) / "summary.json").write_text(text)
        tracking.log_artifacts(uri, parent, [Path(tmp) / "summary.json"])
    tracking.end_run(uri, parent)
    return summary


def build_summary(uri: str, run_dir: str, results: dict[str, StepResult]) -> dict[str, Any]:
    manifest = results["preprocess"].outputs.manifest
    registration = results["register"].outputs if "register" in results else None
    evaluation = results["evaluate"].outputs if "evaluate" in results else None
    train = results["train"].outputs if "train" in results else None
    tune = results["tune"].outputs if "tune" in results else None
    return {
        "tracking_uri": uri,
        "model_uri": registration and registration.model_uri,
        "model_name": registration and registration.model_name,
        "model_version": registration and registration.model_version,
        "alias_moved": registration and registration.alias_moved,
        "alias_reason": registration and registration.alias_reason,
        "image_shape": manifest["image_shape"],
        "metrics": {k: evaluation.metrics.get(k) for k in SUMMARY_METRICS} if evaluation else {},
        "baseline_vae_metrics": evaluation and evaluation.baseline_vae,
        "feature_net": evaluation and evaluation.feature_net,
        "data_fingerprint": manifest["fingerprint"],
        "data_counts": manifest["counts"],
        "train_faults": train and train.faults,
        "sweep": tune and {"chose": flatten(tune.overrides), "left_as_given": tune.left_as_given},
        "steps": {name: {"status": r.status, "seconds": round(r.seconds, 3), "key": r.key}
                  for name, r in results.items()},
        "run_dir": run_dir,
    }

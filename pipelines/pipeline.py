"""The driver: connect to Ray, open the MLflow parent run, execute the DAG, write ``summary.json``.

``summary.json`` is a contract other tools read: tracking_uri, model_uri, model_name, model_version,
alias_moved, image_shape, metrics, feature_net, data_fingerprint and per-step status/seconds.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import ray

from vaegan.config import ConfigError

from . import dag, tracking
from .config import PipelineConfig, flatten

SUMMARY_METRICS = ("fid", "kid", "precision", "recall", "recon_mse", "elbo", "iwae_nll", "active_units", "elbo_gap")


def connect_ray() -> bool:
    """Join the cluster named by RAY_ADDRESS, else start a local Ray sized to this machine; returns
    whether the cluster is a local one of fixed size (no autoscaler will add nodes)."""
    local = not os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return local
    # Ray Train otherwise prints every worker line twice.
    runtime_env = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    if local:
        ray.init(num_cpus=os.cpu_count(), runtime_env=runtime_env)
    else:
        ray.init(runtime_env=runtime_env)
    return local


def check_fits_local_ray(cfg: PipelineConfig) -> None:
    """A local Ray never grows: refuse a Train run it cannot place now, instead of waiting forever."""
    have = ray.cluster_resources()
    cpus = cfg.train.num_workers * cfg.train.cpus_per_worker
    if cpus > have.get("CPU", 0):
        raise ConfigError(f"config keys 'train.num_workers' x 'train.cpus_per_worker' = {cfg.train.num_workers} x "
                          f"{cfg.train.cpus_per_worker} = {cpus} CPUs, but this machine's Ray has "
                          f"{int(have.get('CPU', 0))}; allowed: at most that many "
                          "(or set RAY_ADDRESS to a bigger cluster)")
    if cfg.train.use_gpu and cfg.train.num_workers > have.get("GPU", 0):
        raise ConfigError(f"config key 'train.num_workers' = {cfg.train.num_workers} GPU workers (train.use_gpu), but "
                          f"this machine's Ray has {int(have.get('GPU', 0))} GPUs; allowed: at most that many, "
                          "or train.use_gpu=false")


def with_absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Resolve the data paths against the driver's working directory: Ray workers run elsewhere."""
    data = dataclasses.replace(cfg.data, data_dir=str(Path(cfg.data.data_dir).resolve()),
                               source=str(Path(cfg.data.source).resolve()) if cfg.data.source else "")
    return dataclasses.replace(cfg, data=data)


def run_pipeline(cfg: PipelineConfig, run_dir: Path, steps: list[str], force: set[str]) -> dict[str, Any]:
    cfg = with_absolute_paths(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    for path in dag.remove_stale_partials(run_dir):
        print(f"[dag] removed {path.name}, left half-written by an interrupted run", flush=True)
    uri = tracking.resolve_tracking_uri(cfg, run_dir)
    experiment_id = tracking.ensure_experiment(uri, cfg.register.experiment, run_dir)  # fails before any compute
    if connect_ray():
        check_fits_local_ray(cfg)
    parent = tracking.start_run(uri, experiment_id, f"pipeline-{cfg.name}", params=flatten(dataclasses.asdict(cfg)))
    ctx = dag.RunContext(run_dir=str(run_dir.resolve()), tracking_uri=uri, experiment_id=experiment_id,
                         parent_run_id=parent)
    try:
        results = dag.execute(cfg, ctx, steps, force)
    except BaseException:
        tracking.end_run(uri, parent, "FAILED")
        raise
    summary = build_summary(uri, results)
    path = write_json_atomic(run_dir / "summary.json", summary)
    tracking.log_artifacts(uri, parent, [path])
    tracking.end_run(uri, parent)
    return summary


def build_summary(uri: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    manifest = results["preprocess"]["outputs"]["manifest"]
    registration = results.get("register", {}).get("outputs", {})
    evaluation = results.get("evaluate", {}).get("outputs", {})
    metrics = evaluation.get("metrics", {})
    return {
        "tracking_uri": uri,
        "model_uri": registration.get("model_uri"),
        "model_name": registration.get("model_name"),
        "model_version": registration.get("model_version"),
        "alias_moved": registration.get("alias_moved"),
        "alias_reason": registration.get("alias_reason"),
        "image_shape": manifest["image_shape"],
        "metrics": {k: metrics.get(k) for k in SUMMARY_METRICS} if metrics else {},
        "baseline_vae_metrics": evaluation.get("baseline_vae"),
        "feature_net": evaluation.get("feature_net"),
        "data_fingerprint": manifest["fingerprint"],
        "data_counts": manifest["counts"],
        "steps": {name: {"status": r["status"], "seconds": round(r["seconds"], 3), "key": r["key"]}
                  for name, r in results.items()},
    }


def write_json_atomic(path: Path, data: dict[str, Any]) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
    return path

"""Ray Train from the driver: one training run of the config over the preprocess step's shards.

``fit`` starts a ``TorchTrainer`` (DDP over ``train.num_workers`` workers, gloo on CPUs, NCCL on GPUs)
whose workers run ``worker.train_loop_per_worker``; rerunning it with the same name resumes from the
latest checkpoint in Ray's storage. The train step, its baseline VAE and every Tune trial call it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.train
from ray.data import RandomSeedConfig
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from vaegan.checkpoint import CHECKPOINT_NAME, load_checkpoint
from vaegan.guard import NonFiniteLossError
from vaegan.imagerows import read_split
from vaegan.inference import GenerativeModel
from vaegan.metrics import posterior_means
from vaegan.prior import fit_gaussian_mixture

from . import store, tracking
from .config import PipelineConfig
from .context import RunContext
from .faults import ledger_path, read_ledger
from .worker import SCORE, TrainJob, train_loop_per_worker

__all__ = ["SCORE", "TrainOutcome", "best_checkpoint_state", "fit", "fit_tracked", "holds_train_split",
           "with_fitted_prior", "worker_resources"]


# The largest train split (raw pixel bytes) held in the object store for the whole run; 70,000 Fashion-MNIST
# images are 55 MB, a million 64 px RGB ones 12 GB.
IN_MEMORY_SPLIT_BYTES = 1 << 30


@dataclasses.dataclass
class TrainOutcome:
    """A finished training run: Ray's result and what rank 0's ledger recorded."""

    result: ray.train.Result
    faults: dict[str, float]  # restarts, steps_redone, recovery_seconds
    mlflow_unsent: int


def worker_resources(cfg: PipelineConfig) -> dict[str, float]:
    """What each Train worker reserves: ``cpus_per_worker`` CPUs (Ray sets OMP_NUM_THREADS, hence torch's
    thread count, from it) and one GPU when ``use_gpu``."""
    return {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}


def fit(cfg: PipelineConfig, data: str, image_shape: list[int], featnet: str, *, name: str,
        storage: str, tracking_uri: str = "", mlflow_run_id: str = "", train_limit: int = 0,
        callbacks: list | None = None, start_from: ray.train.Checkpoint | None = None) -> TrainOutcome:
    """One Ray Train run over the preprocess folder ``data``; rerunning with the same ``name`` and ``storage``
    resumes from its latest checkpoint, and a run without one starts from ``start_from`` when given (a PBT
    donor's checkpoint: ``TrainJob.start_from``). ``data``, ``featnet`` and ``storage`` are paths or URIs."""
    held = held_train_split(store.local_view(data) / "split=train", image_shape, train_limit)
    ledger = ledger_path(storage, name)
    job = TrainJob(config=dataclasses.asdict(cfg), data_dir=data, image_shape=list(image_shape),
                   featnet_path=featnet, ledger_path=ledger, tracking_uri=tracking_uri,
                   mlflow_run_id=mlflow_run_id, mlflow_spool=mlflow_spool(storage, name),
                   images=None if held is None else ray.put(held), start_from=start_from)
    fs, storage_path = store.filesystem(storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=vars(job),  # not asdict(), which deep-copies: the ObjectRef must travel as itself
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep,
                                               checkpoint_score_attribute=SCORE, checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
        datasets=None if held is not None else {"train": streamed_train_split(cfg, store.join(data, "split=train"),
                                                                                 train_limit)},
    )
    result = fit_releasing_controller(trainer)
    record = read_ledger(ledger)
    if record.get("diverged"):
        # Consumed: a rerun (e.g. with lower learning rates) must not be failed by this run's verdict.
        store.delete(ledger)
        raise NonFiniteLossError(record["diverged"])
    return TrainOutcome(result=result, mlflow_unsent=int(record.get("mlflow_unsent", 0)),
                        faults={k: record[k] for k in ("restarts", "steps_redone", "recovery_seconds") if k in record})


def fit_releasing_controller(trainer: TorchTrainer) -> ray.train.Result:
    """``trainer.fit()``, then this process's SIGINT handler as it was before. Called from a main thread, Ray
    Train installs a handler (Ctrl-C aborts the run) whose closure holds the run's controller actor; left in
    place, it kept the finished run's TrainController, its DatasetManager and the train split handed to them
    alive until the process exited or the next run replaced it: processes that woke up beside whatever ran
    next on the same cores (the train step's Ray worker goes on to serve later steps)."""
    before = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        if before is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before)


def mlflow_spool(storage: str, name: str) -> str:
    """Where a run's workers keep the MLflow calls an outage holds back: beside its checkpoints in a local
    storage folder; in the node's temporary folder when storage is object storage, since the spool is a
    folder of files that is appended to and replayed, which object storage does not do."""
    if not store.is_remote(storage):
        return store.join(storage, f"{name}.mlflow-unsent")
    tag = hashlib.sha1(storage.encode()).hexdigest()[:12]
    return str(Path(tempfile.gettempdir(), "vaegan-mlflow-unsent", tag, name))


def held_train_split(split_dir: Path, image_shape: list[int], train_limit: int = 0) -> np.ndarray | None:
    """The train split's first ``train_limit`` rows (all when 0) as uint8 (N, C, H, W), when they fit in
    IN_MEMORY_SPLIT_BYTES; else None. A held split goes to the object store once and each worker samples its
    share of every epoch itself (``vaegan.loop.shard_order``): no Ray Data actors to start per run (8 of a
    1-epoch smoke run's 30 seconds of Train start-up on 2 cores) and no Parquet to re-read each epoch."""
    if not holds_train_split(split_dir, image_shape, train_limit):
        return None
    return read_split(split_dir, image_shape, limit=train_rows(split_dir, train_limit))[0]


def train_rows(split_dir: Path, train_limit: int = 0) -> int:
    """The rows a run trains on: the split's (from the Parquet footers), at most ``train_limit`` when set."""
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(split_dir.glob("*.parquet")))
    return min(rows, train_limit) if train_limit else rows


def holds_train_split(split_dir: Path, image_shape: list[int], train_limit: int = 0) -> bool:
    """Whether a run holds its train split in the object store (``held_train_split``) rather than streaming it
    with Ray Data, whose read tasks then need CPUs of their own while the workers train."""
    return train_rows(split_dir, train_limit) * math.prod(image_shape) <= IN_MEMORY_SPLIT_BYTES


def streamed_train_split(cfg: PipelineConfig, split_dir: str, train_limit: int = 0) -> ray.data.Dataset:
    """A large train split as a Ray Dataset streamed from Parquet, its rows in no fixed order (a limit takes as
    many rows, from any file); each worker iterates its ``get_dataset_shard``, one execution per epoch with its
    blocks in a new order each time (seeded by ``train.seed``), and mixes the rows (``worker.streamed_epoch``)."""
    fs, path = store.filesystem(split_dir)  # read where it lives: each read task fetches its own files
    dataset = ray.data.read_parquet(path, filesystem=fs).select_columns(["image"])  # projected into the read
    if train_limit:
        dataset = dataset.limit(train_limit)
    dataset = dataset.randomize_block_order(seed=RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True))
    if cfg.train.num_workers * cfg.train.cpus_per_worker >= ray.cluster_resources().get("CPU", 0) \
            and not cfg.train.use_gpu:
        # The workers would hold every CPU and Ray Data's read tasks could never run: read it all up front
        # (the object store spills to disk beyond memory) rather than deadlock mid-stream. Its block order is
        # then drawn once; each epoch's rows still mix in the workers' shuffle buffers.
        dataset = dataset.materialize()
    return dataset


def fit_tracked(cfg: PipelineConfig, ctx: RunContext, data: str, image_shape: list[int], featnet: str,
                *, name: str, params: dict[str, Any], train_limit: int = 0, callbacks: list | None = None,
                status_on_error: str | None = "FAILED",
                start_from: ray.train.Checkpoint | None = None) -> tuple[TrainOutcome, str]:
    """``fit`` inside a new MLflow child run of the pipeline's run; returns the outcome and the run id,
    still open for the caller's artifacts. If training raises, the run is marked ``status_on_error``;
    None leaves it to the caller (Tune tears an early-stopped trial down mid-fit, which is no failure)."""
    run_id = tracking.start_run(ctx.tracking_uri, ctx.experiment_id, name, ctx.parent_run_id, params=params,
                                run_dir=ctx.run_dir)
    try:
        outcome = fit(cfg, data, image_shape, featnet, name=name, storage=store.join(ctx.run_dir, "ray"),
                      tracking_uri=ctx.tracking_uri, mlflow_run_id=run_id, train_limit=train_limit,
                      callbacks=callbacks, start_from=start_from)
    except BaseException:
        if status_on_error:
            tracking.end_run_if_reachable(ctx.tracking_uri, run_id, status_on_error)
        raise
    return outcome, run_id


def best_checkpoint_state(result: ray.train.Result) -> dict[str, Any]:
    """The best checkpoint by validation FID (the latest if none was scored), loaded from Ray's storage."""
    checkpoint = result.get_best_checkpoint(metric=SCORE, mode="min") or result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"training run {result.path} finished without a checkpoint: {result.error}")
    with checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / CHECKPOINT_NAME)


def trained_history(result: ray.train.Result) -> list[dict[str, float]]:
    """Every epoch's figures, from the latest checkpoint (the run's last epoch always saves one): the best
    checkpoint's own history stops at the best epoch, and curves and benchmarks want the whole run."""
    with result.checkpoint.as_directory() as folder:
        return json.loads(load_checkpoint(Path(folder) / CHECKPOINT_NAME)["history"])


def with_fitted_prior(state: dict[str, Any], train_images: Any, seed: int) -> dict[str, Any]:
    """``state`` plus ``fitted_prior``: the Gaussian mixture of the training images' posterior means that
    ``sample --prior fitted`` draws from (``vaegan/prior.py``). Fitted on the driver after training, once."""
    latents = posterior_means(GenerativeModel.from_checkpoint(state).enc, train_images)  # in bounded batches
    return {**state, "fitted_prior": fit_gaussian_mixture(latents, seed=seed)}

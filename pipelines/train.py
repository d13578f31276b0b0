"""DAG step 3, train (Ray Train): DDP training of the VAE-GAN over the Parquet shards.

Inputs:  the preprocess step's folder (``split=train`` shards, ``split=val``, manifest), the
         feature net for the per-epoch FID, and the resolved config (tune's best overrides applied).
Outputs: ``checkpoint.pt`` (the best checkpoint by validation FID), ``history.json`` (per-epoch
         metrics), ``samples.png`` and ``reconstructions.png`` of the final epoch.
Run it:  ``vaegan run --config pipelines/configs/smoke.yaml --steps preprocess,train``

Tune trials reuse ``fit`` with a smaller budget, so a trial is a real Ray Train run too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import save_image

from vaegan import metrics
from vaegan.atomic import atomic_file, write_json
from vaegan.checkpoint import (
    CHECKPOINT_NAME,
    checkpoint_payload,
    load_checkpoint,
    save_checkpoint,
)
from vaegan.config import from_dict
from vaegan.evaluate import sample_quality
from vaegan.featnet import load_feature_net
from vaegan.imagerows import decode_rows_float, read_split
from vaegan.inference import GenerativeModel
from vaegan.loop import epoch_log_line, train_epoch
from vaegan.nets import build_nets
from vaegan.step import NonFiniteLossError, VAEGANTrainer

from . import tracking
from .config import PipelineConfig

SCORE = "val/fid"  # lower is better; the one metric that picks checkpoints, trials and champions


@dataclasses.dataclass
class TrainJob:
    """Everything a worker needs, sent across the Ray boundary as a plain dict."""

    config: dict[str, Any]
    data_dir: str
    image_shape: list[int]
    featnet_path: str
    tracking_uri: str = ""
    mlflow_run_id: str = ""
    progress_path: str = ""
    diverged_path: str = ""


# -- worker side -----------------------------------------------------------------------------------


def train_loop_per_worker(job_dict: dict[str, Any]) -> None:
    job = TrainJob(**job_dict)
    cfg = from_dict(PipelineConfig, job.config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    enc, dec, dis = (m.to(device) if m is not None else None for m in build_nets(cfg.model))
    if world > 1:  # [2] wrap each network in its own DDP, as stylegan2-ada does
        enc, dec, dis = (_ddp(m, device) for m in (enc, dec, dis))
    trainer = VAEGANTrainer(cfg.core(), enc, dec, dis)
    start_epoch, history = _resume(trainer)
    progress = FaultLedger(Path(job.progress_path), trainer.step, writer=rank == 0)
    torch.manual_seed(cfg.train.seed + 1000 * rank + start_epoch)  # different noise per rank
    validation = _Validation(job, cfg)
    tracker = _Tracker(job, rank)
    tracker.log_nodes(_gather_node_ids(world))
    tracker.backfill(history)
    if start_epoch > cfg.train.epochs:  # a rerun after the last checkpoint: hand that checkpoint back as the result
        _report(trainer, {**history[-1], "mlflow/unsent": float(tracker.unsent())}, history, start_epoch - 1, rank,
                checkpoint_now=True)
    shard = ray.train.get_dataset_shard("train")  # [1] this worker's stream of the train split
    best = min((h[SCORE] for h in history), default=float("inf"))
    stale = 0
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        # Rows hold raw uint8 bytes (portable Parquet, no Ray tensor extension), so batches come as numpy
        # and become float tensors here.
        batches = (decode_rows_float(b["image"], job.image_shape, device)
                   for b in shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy",
                                               drop_last=True))
        try:
            summary = train_epoch(trainer, batches, after_step=progress.record)
        except NonFiniteLossError as err:
            # Deterministic (every rank sees the same all-reduced norms, and a restart from the checkpoint
            # would diverge the same way): end the run without a FailureConfig retry; the driver raises it.
            if rank == 0:
                with atomic_file(job.diverged_path, "w") as f:
                    f.write(str(err))
            return
        summary["images_per_s"] *= world  # the epoch's global throughput
        summary.update(progress.metrics())
        summary["torch_threads"] = float(torch.get_num_threads())  # Ray sets OMP_NUM_THREADS to the worker's CPUs
        model = GenerativeModel.from_checkpoint(checkpoint_payload(trainer))
        val = validation.run(model)
        summary.update(val)
        summary["epoch"] = float(epoch)
        history.append(summary)
        improved = val[SCORE] < best
        best, stale = (val[SCORE], 0) if improved else (best, stale + 1)
        stop = cfg.train.patience > 0 and stale >= cfg.train.patience
        if rank == 0:
            print(f"[train] {epoch_log_line(epoch, summary, {k: v for k, v in val.items() if k != 'val/kid_std'})}",
                  flush=True)
        tracker.log_epoch(summary, epoch, validation.grids(model) if rank == 0 else [])
        summary["mlflow/unsent"] = float(tracker.unsent())
        checkpoint_now = epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs or stop
        _report(trainer, summary, history, epoch, rank, checkpoint_now)  # [3] report (+ checkpoint)
        if stop:
            if rank == 0:
                print(f"[train] early stop at epoch {epoch}: {SCORE} did not improve for {stale} epochs", flush=True)
            break


def _ddp(module: torch.nn.Module | None, device: torch.device) -> torch.nn.Module | None:
    if module is None:
        return None
    # broadcast_buffers=False: spectral norm's power-iteration vectors are updated in every forward,
    # and re-broadcasting them mid-step would clobber tensors that autograd still needs.
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def _resume(trainer: VAEGANTrainer) -> tuple[int, list[dict[str, float]]]:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 1, []
    with checkpoint.as_directory() as folder:
        state = load_checkpoint(Path(folder) / CHECKPOINT_NAME)
    trainer.load_state_dict(state)
    history = json.loads(state["history"])
    print(f"[train] resumed from epoch {state['epoch']} (step {state['step']})", flush=True)
    return int(state["epoch"]) + 1, history


class FaultLedger:
    """How often this training run was restarted and how many steps it had to redo.

    Checkpoints hold the state at the end of an epoch, so a worker killed mid-epoch loses the steps since;
    only a record written outside the checkpoint after every step can say how many. Rank 0 keeps it in
    ``progress_path`` (beside Ray's storage, so a rerun of the pipeline finds it too), together with the
    running totals, which must survive several restarts between two checkpoints.
    """

    def __init__(self, path: Path, resumed_step: int, writer: bool):
        self.path, self.writer = path, writer
        last = json.loads(path.read_text()) if path.is_file() else None
        if last is None:
            self.totals = {"restarts": 0, "steps_redone": 0, "recovery_seconds": 0.0}
        else:  # a previous attempt of this run got as far as last["step"]: everything since the checkpoint is redone
            self.totals = {"restarts": last["restarts"] + 1,
                           "steps_redone": last["steps_redone"] + max(0, last["step"] - resumed_step),
                           "recovery_seconds": round(time.time() - last["time"], 3)}
            if writer:
                print(f"[train] restart {self.totals['restarts']}: redoing {last['step'] - resumed_step} steps "
                      f"(from step {resumed_step}); {self.totals['recovery_seconds']:.1f}s since the last step",
                      flush=True)
        self.record(resumed_step)

    def record(self, step: int) -> None:
        if self.writer:
            # Every step, so no fsync: surviving a killed process is the point, not a machine crash.
            write_json(self.path, {"step": step, "time": time.time(), **self.totals}, durable=False)

    def metrics(self) -> dict[str, float]:
        return {f"fault/{name}": float(value) for name, value in self.totals.items()}


def _gather_node_ids(world: int) -> list[str]:
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


def _report(trainer: VAEGANTrainer, summary: dict[str, float], history: list[dict[str, float]], epoch: int,
            rank: int, checkpoint_now: bool) -> None:
    """Every rank reports once per epoch; only rank 0 attaches the checkpoint."""
    if checkpoint_now:
        trainer.mark_good()  # a persistent divergence rolls back to this checkpoint, on every rank alike
    if not (checkpoint_now and rank == 0):
        ray.train.report(summary)
        return
    with tempfile.TemporaryDirectory() as folder:
        extra = {"epoch": epoch, "history": json.dumps(history)}
        save_checkpoint(Path(folder) / CHECKPOINT_NAME, trainer, extra=extra)
        ray.train.report(summary, checkpoint=Checkpoint.from_directory(folder))


class _Validation:
    """Per-epoch held-out figures: ELBO on validation images and a small-sample domain FID."""

    def __init__(self, job: TrainJob, cfg: PipelineConfig):
        images, _ = read_split(Path(job.data_dir) / "split=val", job.image_shape, limit=cfg.train.val_images)
        self.images = torch.from_numpy(images).float() / 255.0
        self.featnet = load_feature_net(job.featnet_path)
        self.seed = cfg.train.seed

    def run(self, model: GenerativeModel) -> dict[str, float]:
        generator = torch.Generator().manual_seed(self.seed)
        elbo = metrics.elbo(model.enc, model.dec, self.images, generator=generator).mean().item()
        quality = sample_quality(self.featnet, self.images, model.sample(len(self.images), seed=self.seed))
        return {"val/elbo": elbo, **{f"val/{k}": v for k, v in quality.items()}}

    def grids(self, model: GenerativeModel) -> list[Path]:
        """Sample and reconstruction grids as PNGs in a temporary folder (logged, then deleted)."""
        return save_grids(model, self.images[:32], Path(tempfile.mkdtemp(prefix="vaegan-grids-")), self.seed)


def save_grids(model: GenerativeModel, originals: torch.Tensor, folder: Path, seed: int) -> list[Path]:
    """samples.png (8x8 prior samples) and reconstructions.png (each original beside its reconstruction)."""
    pairs = torch.stack([originals, model.reconstruct(originals)], dim=1).flatten(0, 1)  # (2N, C, H, W)
    save_image(model.sample(64, seed=seed), folder / "samples.png", nrow=8)
    save_image(pairs, folder / "reconstructions.png", nrow=8)
    return [folder / "samples.png", folder / "reconstructions.png"]


def _metrics(summary: dict[str, float], epoch: int) -> list:
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, epoch) for k, v in summary.items()]


class _Tracker:
    """MLflow logging from world rank 0 only, into the run the driver created.

    A tracking server that goes away must not stop training: whatever cannot be sent is kept, in order,
    and sent before the next epoch's figures once the server answers again. What is still unsent when
    training ends is counted in the last report (``mlflow/unsent``), and the driver fails the step with a
    clear error instead of registering a model whose run lacks them.
    """

    def __init__(self, job: TrainJob, rank: int):
        self.enabled = rank == 0 and bool(job.mlflow_run_id)
        self.run_id = job.mlflow_run_id
        self.uri = job.tracking_uri
        self.pending: list[Callable[[], None]] = []
        self.outage_reported = False
        if self.enabled:
            # MLflow retries a dead server for minutes per call by default; training must not wait on it.
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
            self.client = MlflowClient(job.tracking_uri)

    def log_nodes(self, nodes: list[str]) -> None:
        self._send(lambda: self.client.set_tag(self.run_id, "train.node_ids", ",".join(nodes)),
                   lambda: self.client.log_param(self.run_id, "train.num_nodes", len(set(nodes))))

    def log_epoch(self, summary: dict[str, float], epoch: int, pngs: list[Path]) -> None:
        metrics = _metrics(summary, epoch)
        self._send(lambda: self._log_metrics(metrics), *(self._artifact(png, f"epoch_{epoch:03d}") for png in pngs))

    def backfill(self, history: list[dict[str, float]]) -> None:
        """A rerun of the pipeline resumes into a new MLflow run: give it the epochs its checkpoint holds
        (a worker restart resumes into the same run, which has them already)."""
        def send() -> None:
            if "epoch" not in self.client.get_run(self.run_id).data.metrics:
                self._log_metrics([m for summary in history for m in _metrics(summary, int(summary["epoch"]))])
        if history:
            self._send(send)

    def _log_metrics(self, metrics: list) -> None:
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def unsent(self) -> int:
        return len(self.pending)

    def _artifact(self, png: Path, folder: str) -> Callable[[], None]:
        def send() -> None:
            self.client.log_artifact(self.run_id, str(png), artifact_path=folder)
            os.unlink(png)
        return send

    def _send(self, *calls: Callable[[], None]) -> None:
        if not self.enabled:
            return
        self.pending.extend(calls)
        while self.pending:
            try:
                self.pending[0]()
            except (MlflowException, OSError) as err:  # requests' errors are OSErrors; either means "not now"
                if not self.outage_reported:
                    print(f"[train] MLflow at {self.uri} is not answering ({type(err).__name__}); training goes on "
                          "and its figures are sent once it is back", flush=True)
                self.outage_reported = True
                return
            self.pending.pop(0)
        if self.outage_reported:
            print(f"[train] MLflow at {self.uri} is back; buffered figures sent", flush=True)
            self.outage_reported = False


# -- driver side -----------------------------------------------------------------------------------


def worker_resources(cfg: PipelineConfig) -> dict[str, float]:
    """What each Train worker reserves: ``cpus_per_worker`` CPUs (Ray sets OMP_NUM_THREADS, hence torch's
    thread count, from it) and one GPU when ``use_gpu``."""
    return {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}


def progress_path(storage: Path, name: str) -> Path:
    """Where the FaultLedger of training run ``name`` lives (Ray owns the folder named ``name`` itself)."""
    return storage / f"{name}.progress.json"


def fit(cfg: PipelineConfig, data_dir: Path, image_shape: list[int], featnet_path: Path, *, name: str,
        storage: Path, tracking_uri: str = "", mlflow_run_id: str = "", train_limit: int = 0,
        callbacks: list | None = None) -> ray.train.Result:
    """One Ray Train run; rerunning with the same ``name`` and ``storage`` resumes from its latest checkpoint."""
    dataset = ray.data.read_parquet(str(data_dir / "split=train"), columns=["image"])
    if train_limit:
        dataset = dataset.limit(train_limit)
    if cfg.train.num_workers * cfg.train.cpus_per_worker >= ray.cluster_resources().get("CPU", 0) \
            and not cfg.train.use_gpu:
        # The workers would hold every CPU and Ray Data's read tasks could never run: read it all up front
        # (the object store spills to disk beyond memory) rather than deadlock mid-stream.
        dataset = dataset.materialize()
    diverged = storage / f"{name}.diverged"  # why training gave up, written by rank 0 (see NonFiniteLossError)
    diverged.unlink(missing_ok=True)
    job = TrainJob(config=dataclasses.asdict(cfg), data_dir=str(data_dir), image_shape=list(image_shape),
                   featnet_path=str(featnet_path), tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id,
                   progress_path=str(progress_path(storage, name)), diverged_path=str(diverged))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(job),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RunConfig(
            name=name, storage_path=str(storage), callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep,
                                               checkpoint_score_attribute=SCORE, checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if diverged.is_file():
        raise NonFiniteLossError(diverged.read_text())
    return result


def fit_tracked(cfg: PipelineConfig, ctx: Any, data_dir: Path, image_shape: list[int], featnet_path: Path, *,
                name: str, params: dict[str, Any], train_limit: int = 0,
                callbacks: list | None = None, status_on_error: str | None = "FAILED") -> tuple[ray.train.Result, str]:
    """``fit`` inside a new MLflow child run of the pipeline's run; returns the result and the run id,
    still open for the caller's artifacts. If training raises, the run is marked ``status_on_error``;
    None leaves it to the caller (Tune tears an early-stopped trial down mid-fit, which is no failure)."""
    run_id = tracking.start_run(ctx.tracking_uri, ctx.experiment_id, name, ctx.parent_run_id, params=params)
    try:
        result = fit(cfg, data_dir, image_shape, featnet_path, name=name, storage=Path(ctx.run_dir).resolve() / "ray",
                     tracking_uri=ctx.tracking_uri, mlflow_run_id=run_id, train_limit=train_limit,
                     callbacks=callbacks)
    except BaseException:
        if status_on_error:
            tracking.end_run_if_reachable(ctx.tracking_uri, run_id, status_on_error)
        raise
    return result, run_id


def best_checkpoint_state(result: ray.train.Result) -> dict[str, Any]:
    """The best checkpoint by validation FID (the latest if none was scored), loaded from Ray's storage."""
    checkpoint = result.get_best_checkpoint(metric=SCORE, mode="min") or result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"training run {result.path} finished without a checkpoint: {result.error}")
    with checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / CHECKPOINT_NAME)

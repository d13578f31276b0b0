"""The Ray Train worker: one DDP rank of a training run (``train_loop_per_worker``).

Each rank builds the nets from the config, wraps each network in its own DDP, trains on its share of
the train split (held in the object store, or streamed by Ray Data when large), and reports once per
epoch; world rank 0 alone writes the checkpoint, the ledger (``faults.py``) and the MLflow record
(``tracking.BufferedRunLogger``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from torch.nn.parallel import DistributedDataParallel

from vaegan import metrics
from vaegan.checkpoint import CHECKPOINT_NAME, checkpoint_payload, load_checkpoint, save_checkpoint, weights_digest
from vaegan.config import from_dict
from vaegan.data import to_float
from vaegan.evaluate import sample_quality
from vaegan.featnet import load_feature_net
from vaegan.guard import NonFiniteLossError
from vaegan.imagerows import decode_rows_float, read_split
from vaegan.inference import GenerativeModel
from vaegan.loop import epoch_log_line, shard_order, tensor_batches, train_epoch
from vaegan.nets import build_nets
from vaegan.step import VAEGANTrainer

from . import store
from .config import PipelineConfig
from .faults import FaultLedger
from .tracking import BufferedRunLogger

SCORE = "val/fid"  # lower is better; the one metric that picks checkpoints, trials and champions


@dataclasses.dataclass
class TrainJob:
    """Everything a worker needs, sent across the Ray boundary as a plain dict."""

    config: dict[str, Any]
    data_dir: str  # the preprocess step's folder: a path or an object-storage URI (``pipelines/store.py``)
    image_shape: list[int]
    featnet_path: str  # a path or URI
    ledger_path: str  # a path or URI
    tracking_uri: str = ""
    mlflow_run_id: str = ""
    mlflow_spool: str = ""  # where rank 0 keeps what an MLflow outage holds back (BufferedRunLogger)
    images: Any = None  # an ObjectRef to the held train split (uint8 N, C, H, W); None: Ray Data's "train" shard
    # A ray.train.Checkpoint to start from when the run has none of its own: a PBT donor's, or, for the train
    # step after a PBT sweep, the sweep's best model. Its step and history carry on; its learning rates do not.
    start_from: Any = None


def train_loop_per_worker(job_dict: dict[str, Any]) -> None:
    job = TrainJob(**job_dict)
    cfg = from_dict(PipelineConfig, job.config)  # the config crossed the Ray boundary as a dict
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    enc, dec, dis = (m.to(device) if m is not None else None for m in build_nets(cfg.model))
    if world > 1:  # [2] wrap each network in its own DDP, as stylegan2-ada does
        enc, dec, dis = (ddp(m, device) for m in (enc, dec, dis))
    trainer = VAEGANTrainer(cfg.core(), enc, dec, dis)
    start_epoch, history = resume(trainer, job.start_from)
    ledger = FaultLedger(job.ledger_path, trainer.step, writer=rank == 0)
    torch.manual_seed(cfg.train.seed + 1000 * rank + start_epoch)  # different noise per rank
    validation = Validation(job, cfg)
    logger = BufferedRunLogger(job.tracking_uri, job.mlflow_run_id, enabled=rank == 0,
                               spool=Path(job.mlflow_spool) if job.mlflow_spool else None)
    logger.log_nodes(gather_node_ids(world))
    logger.backfill(history)
    if start_epoch > cfg.train.epochs:  # a rerun after the last checkpoint: hand that checkpoint back as the result
        ledger.end_epoch(trainer.step, logger.unsent())
        report(trainer, history[-1], history, start_epoch - 1, rank, checkpoint_now=True)
        return
    batches = TrainBatches(job, cfg, rank, world, device)  # [1] this worker's share of the train split
    best = min((h[SCORE] for h in history), default=float("inf"))
    stale = 0
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        first_step = trainer.step
        try:
            summary = train_epoch(trainer, batches.epoch(epoch), after_step=ledger.record)
        except NonFiniteLossError as err:
            # Deterministic (every rank sees the same all-reduced norms, and a restart from the checkpoint
            # would diverge the same way): end the run without a FailureConfig retry; the driver raises it.
            ledger.give_up(str(err))
            return
        summary["images_per_s"] *= world  # the epoch's global throughput
        summary["step/first"], summary["step/last"] = float(first_step), float(trainer.step)
        summary["ddp/ranks_out_of_sync"] = float(ranks_out_of_sync(trainer, world))
        summary.update(ledger.metrics())
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
        logger.log_epoch(summary, epoch, validation.grids(model) if rank == 0 else [])
        ledger.end_epoch(trainer.step, logger.unsent())
        checkpoint_now = epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs or stop
        if checkpoint_now:  # a persistent divergence rolls back to this state, on every rank alike
            trainer.guard.mark_good(trainer.state_dict())
        report(trainer, summary, history, epoch, rank, checkpoint_now)  # [3] report (+ checkpoint)
        if stop:
            if rank == 0:
                print(f"[train] early stop at epoch {epoch}: {SCORE} did not improve for {stale} epochs", flush=True)
            break


class TrainBatches:
    """This rank's float batches of each epoch: from the held split (``TrainJob.images``), shuffled per epoch
    alike on every rank, each rank its own equal share; else from Ray Data's shard of the streamed split."""

    def __init__(self, job: TrainJob, cfg: PipelineConfig, rank: int, world: int, device: torch.device):
        self.batch_size, self.seed, self.rank, self.world, self.device = (cfg.train.batch_size, cfg.train.seed, rank,
                                                                          world, device)
        self.image_shape = job.image_shape
        self.images = None if job.images is None else held_images(job.images)
        self.shard = ray.train.get_dataset_shard("train") if job.images is None else None

    def epoch(self, epoch: int) -> Iterable[torch.Tensor]:
        if self.images is not None:
            order = shard_order(len(self.images), self.seed, epoch, self.rank, self.world)
            return tensor_batches(self.images, self.batch_size, order, self.device)
        return streamed_epoch(self.shard, self.image_shape, self.batch_size, self.device,
                              seed=int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0]))


# Per worker: the rows a streamed epoch is shuffled within, as bytes (256 MiB is ~340k 28 px grey images,
# ~21k 64 px RGB ones): far more than the few blocks in flight, which alone would leave neighbours together.
SHUFFLE_BUFFER_BYTES = 256 << 20


def streamed_epoch(shard: ray.data.DataIterator, image_shape: list[int], batch_size: int, device: torch.device,
                   seed: int) -> Iterable[torch.Tensor]:
    """One epoch of a streamed shard as float batches, its rows shuffled in a buffer of SHUFFLE_BUFFER_BYTES
    (seeded per epoch and rank), so that no two epochs meet the rows in the same order."""
    buffer_rows = max(batch_size, SHUFFLE_BUFFER_BYTES // math.prod(image_shape))
    # Rows hold raw uint8 bytes (portable Parquet, no Ray tensor extension), so batches come as numpy
    # and become float tensors here.
    return (decode_rows_float(b["image"], image_shape, device)
            for b in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=buffer_rows, local_shuffle_seed=seed))


def held_images(ref: ray.ObjectRef) -> torch.Tensor:
    """The held split as a uint8 tensor over the object store's read-only memory, shared by the node's workers
    rather than copied into each: batches are gathered copies, so nothing ever writes to it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(ray.get(ref))


def ddp(module: torch.nn.Module | None, device: torch.device) -> torch.nn.Module | None:
    if module is None:
        return None
    # broadcast_buffers=False: spectral norm's power-iteration vectors are updated in every forward,
    # and re-broadcasting them mid-step would clobber tensors that autograd still needs.
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def ranks_out_of_sync(trainer: VAEGANTrainer, world: int) -> int:
    """How many ranks end the epoch with weights (every tensor a checkpoint holds) other than rank 0's.

    DDP keeps them equal; anything but 0 is a desync (a missed all-reduce, a per-rank decision) that rank 0's
    checkpoint alone would hide. Every rank calls it, as it is a collective."""
    if world == 1:
        return 0
    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, weights_digest(trainer.state_dict()))
    return sum(digest != digests[0] for digest in digests)


def resume(trainer: VAEGANTrainer, start_from: Checkpoint | None) -> tuple[int, list[dict[str, float]]]:
    """The first epoch to train and the history so far: from the run's own latest checkpoint (a restart), else
    from ``start_from`` (``TrainJob.start_from``), whose learning rates give way to this run's config."""
    own = ray.train.get_checkpoint()
    checkpoint = own or start_from
    if checkpoint is None:
        return 1, []
    with checkpoint.as_directory() as folder:
        state = load_checkpoint(Path(folder) / CHECKPOINT_NAME)
    trainer.load_state_dict(state, config_learning_rates=own is None)
    history = json.loads(state["history"])
    origin = "resumed from" if own else f"started from {checkpoint.path} at"
    print(f"[train] {origin} epoch {state['epoch']} (step {state['step']})", flush=True)
    return int(state["epoch"]) + 1, history


def gather_node_ids(world: int) -> list[str]:
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


def report(trainer: VAEGANTrainer, summary: dict[str, float], history: list[dict[str, float]], epoch: int,
           rank: int, checkpoint_now: bool) -> None:
    """Every rank reports once per epoch; only rank 0 attaches the checkpoint."""
    if not (checkpoint_now and rank == 0):
        ray.train.report(summary)
        return
    with tempfile.TemporaryDirectory() as folder:
        extra = {"epoch": epoch, "history": json.dumps(history)}
        save_checkpoint(Path(folder) / CHECKPOINT_NAME, trainer, extra=extra)
        ray.train.report(summary, checkpoint=Checkpoint.from_directory(folder))


class Validation:
    """Per-epoch held-out figures: ELBO on validation images and a small-sample domain FID."""

    def __init__(self, job: TrainJob, cfg: PipelineConfig):
        # Only the val split: on object storage each worker downloads what it reads, not the whole folder.
        images, _ = read_split(store.local_view(store.join(job.data_dir, "split=val")), job.image_shape,
                               limit=cfg.train.val_images)
        self.images = to_float(torch.from_numpy(images))
        self.featnet = load_feature_net(store.local_view(job.featnet_path))
        self.seed = cfg.train.seed

    def run(self, model: GenerativeModel) -> dict[str, float]:
        generator = torch.Generator().manual_seed(self.seed)
        elbo = metrics.elbo(model.enc, model.dec, self.images, generator=generator).mean().item()
        recon_mse = metrics.reconstruction_mse(model.enc, model.dec, self.images)
        quality = sample_quality(self.featnet, self.images, model.sample(len(self.images), seed=self.seed))
        return {"val/elbo": elbo, "val/recon_mse": recon_mse, **{f"val/{k}": v for k, v in quality.items()}}

    def grids(self, model: GenerativeModel) -> list[Path]:
        """Sample and reconstruction grids as PNGs in a temporary folder (logged, then deleted)."""
        return save_grids(model, self.images[:32], Path(tempfile.mkdtemp(prefix="vaegan-grids-")), self.seed)


def save_grids(model: GenerativeModel, originals: torch.Tensor, folder: Path, seed: int,
               prior: str = "standard") -> list[Path]:
    """samples.png (8x8 samples from ``prior``) and reconstructions.png (each original beside its reconstruction)."""
    from torchvision.utils import save_image  # only rank 0 draws: the other processes skip its 3.5 s import
    pairs = torch.stack([originals, model.reconstruct(originals)], dim=1).flatten(0, 1)  # (2N, C, H, W)
    save_image(model.sample(64, seed=seed, prior=prior), folder / "samples.png", nrow=8)
    save_image(pairs, folder / "reconstructions.png", nrow=8)
    return [folder / "samples.png", folder / "reconstructions.png"]

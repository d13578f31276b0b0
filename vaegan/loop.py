"""A plain PyTorch epoch loop: the single-process way to train, and what Ray workers call per epoch.

Both the Ray Train worker and the bare benchmark loop feed batches through ``train_epoch``,
so the two paths share one definition of an epoch and of its throughput figure.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch.utils.data.distributed import DistributedSampler

from .allocator import keep_step_memory
from .step import VAEGANTrainer


class EpochMeter:
    """Running means of step metrics plus images/s over one epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.images = 0
        self.start = time.perf_counter()
        self.last: dict[str, float] = {}

    def update(self, metrics: dict[str, float], batch_size: int) -> None:
        for name, value in metrics.items():
            self.sums[name] += value
        self.steps += 1
        self.images += batch_size
        self.last = metrics

    def summary(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        means = {name: total / max(self.steps, 1) for name, total in self.sums.items()}
        # Counters are cumulative over the run, so their last value, not their mean, is the figure.
        means.update({name: self.last[name] for name in self.last if name.startswith("guard/")})
        return {**means, "images_per_s": self.images / max(seconds, 1e-9), "epoch_seconds": seconds,
                "steps": float(self.steps)}


def train_epoch(trainer: VAEGANTrainer, batches: Iterable[torch.Tensor],
                after_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """Run ``train_step`` over ``batches`` (float (B, C, H, W) in [0, 1]); returns the epoch summary.
    ``after_step`` is called with the trainer's step count after every step. The first call in a process
    sets its allocator for the steps' churn (``vaegan/allocator.py``)."""
    keep_step_memory()
    meter = EpochMeter()
    for x in batches:
        meter.update(trainer.train_step(x), x.shape[0])
        if after_step is not None:
            after_step(trainer.step)
    return meter.summary()


def epoch_log_line(epoch: int, summary: dict[str, float], extra: dict[str, float] | None = None) -> str:
    """One human-readable line per epoch: the losses that matter, throughput, and validation figures."""
    keys = ["loss/enc/kl", "loss/enc/feature", "loss/dec/pixel", "loss/dec/gan", "loss/dis/total", "loss/vae/total"]
    parts = [f"epoch {epoch}"]
    parts += [f"{k.removeprefix('loss/')}={summary[k]:.3f}" for k in keys if k in summary]
    parts += [f"{k.removesuffix('_fraction')}={summary[k]:.2f}" for k in ("dis_update_fraction",) if k in summary]
    parts.append(f"images/s={summary['images_per_s']:.0f}")
    parts += [f"{k}={v:.4g}" for k, v in (extra or {}).items()]
    return " ".join(parts)


def tensor_batches(images: torch.Tensor, batch_size: int, order: torch.Tensor,
                   device: torch.device) -> Iterable[torch.Tensor]:
    """Float batches in [0, 1] of an in-memory uint8 (N, C, H, W) tensor, taking rows in ``order`` (indices);
    drops the last partial batch."""
    for start in range(0, len(order) - batch_size + 1, batch_size):
        yield images[order[start:start + batch_size]].to(device, torch.float32) / 255.0


def shard_order(rows: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Rank ``rank``'s rows of one epoch, shuffled: torch's DistributedSampler seeded by ``seed`` and ``epoch``,
    so every rank (and a run resumed at this epoch) draws the same permutation, and each rank takes an equal
    share of it (DDP needs the same number of steps on every rank)."""
    sampler = DistributedSampler(range(rows), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def fit(trainer: VAEGANTrainer, images: torch.Tensor, epochs: int, batch_size: int, seed: int = 0,
        log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Train on an in-memory uint8 tensor for ``epochs``; logs one line per epoch; returns the summaries."""
    device = next(trainer.enc.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(images.shape[0], generator=generator)
        summary = train_epoch(trainer, tensor_batches(images, batch_size, order, device))
        log(epoch_log_line(epoch, summary))
        history.append(summary)
    return history

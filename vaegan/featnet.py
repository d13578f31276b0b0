"""The domain feature net behind FID / KID / precision-recall.

Inception-v3 weights cannot be downloaded here, and Inception features are a poor fit for
28 px greyscale anyway, so scores are computed in the penultimate layer of a small CNN
classifier trained on the dataset's own training split (the "domain CNN"). Scores from
different feature nets are not comparable: every score should carry the net's name,
``"domain-cnn@<fingerprint>"``, where the fingerprint identifies the training data.

For unlabelled data there is nothing to train on; a randomly initialised net with a fixed
seed (``"random-cnn@<fingerprint>"``) is used instead. Random conv features still separate
gross differences in image statistics but are much less sensitive to semantic content, so
those scores are weaker and only comparable with other scores from the same random net.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_file

_EVAL_BATCH = 512


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class FeatureNet(nn.Module):
    """Small CNN classifier: images (B, C, H, W) float32 in [0, 1] -> logits (B, num_classes).

    ``features(x)`` returns the (B, feature_dim) penultimate activations used for FID.
    Images larger than 32 px first pass through stride-2 convs down to 32 px, so 64 and
    128 px cost about the same as 32 px; then four conv blocks with 2x max-pooling between
    them (32 -> 16 -> 8 -> 4, or 28 -> 14 -> 7 -> 3), global average pooling and a
    linear + ReLU feature layer.
    All constructor arguments are plain ints, so ``config`` rebuilds the net.
    """

    def __init__(self, channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 feature_dim: int = 128, width: int = 32):
        super().__init__()
        self.config = dict(channels=channels, num_classes=num_classes, image_size=image_size,
                           feature_dim=feature_dim, width=width)
        stem: list[nn.Module] = []
        c, size = channels, image_size
        while size > 32:  # cheap downsampling for 64/128 px
            stem.append(_conv_block(c, width, stride=2))
            c, size = width, size // 2
        self.body = nn.Sequential(
            *stem,
            _conv_block(c, width), nn.MaxPool2d(2),
            _conv_block(width, 2 * width), nn.MaxPool2d(2),
            _conv_block(2 * width, 4 * width), nn.MaxPool2d(2),
            # A last conv on the 3-4 px map widens the receptive field before pooling: +2.5 points
            # of Fashion-MNIST accuracy over pooling the 7 px map, at little cost.
            _conv_block(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(4 * width, feature_dim), nn.ReLU())
        self.classifier = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim), non-negative (post-ReLU)."""
        return self.embed(self.body(x * 2.0 - 1.0))  # centre pixels around 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images -> float32 [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")


def train_feature_net(images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 2,
                      batch_size: int = 128, seed: int = 0, lr: float = 2e-3, feature_dim: int = 128,
                      log: Callable[[str], None] = print) -> FeatureNet:
    """Train a FeatureNet with Adam on CPU; returns it in eval mode.

    images: (N, C, H, W) uint8 in [0, 255] or float in [0, 1], square; labels: (N,) int64 in
    [0, num_classes). The learning rate decays linearly to 0, which gets most of the accuracy
    out of the short schedule. Deterministic for a given seed (on the same machine and threads).
    """
    _check_images(images)
    n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        net = FeatureNet(channels, num_classes, size, feature_dim)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    total_steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / total_steps)
    net.train()
    for epoch in range(epochs):
        start, loss_sum, correct = time.perf_counter(), 0.0, 0
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            x, y = _to_float(images[idx]), labels[idx]
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        log(f"featnet epoch {epoch + 1}/{epochs}: loss {loss_sum / n:.4f}, "
            f"train acc {correct / n:.4f}, {time.perf_counter() - start:.1f}s")
    return net.eval()


@torch.no_grad()
def accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] of ``net`` (put in eval mode) on images (N, C, H, W), labels (N,)."""
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, len(images), _EVAL_BATCH):
        x = _to_float(images[i:i + _EVAL_BATCH]).to(device)
        correct += int((net(x).argmax(1).cpu() == labels[i:i + _EVAL_BATCH]).sum())
    return correct / len(images)


def _raw_array(data: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    return np.ascontiguousarray(data)


def dataset_fingerprint(images: torch.Tensor | np.ndarray,
                        labels: torch.Tensor | np.ndarray | None = None) -> str:
    """First 16 hex chars of the sha256 of the data's dtype, shape and raw bytes (labels too, if given).

    The same data always gives the same fingerprint; one changed pixel or label changes it.
    uint8 and float copies of the same images fingerprint differently.
    """
    digest = hashlib.sha256()
    for arr in (images,) if labels is None else (images, labels):
        arr = _raw_array(arr)
        digest.update(f"{arr.dtype.str}{arr.shape}".encode())
        digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()[:16]


def load_feature_net(path: str | Path, fingerprint: str | None = None) -> FeatureNet:
    """A cached feature net (eval mode), loaded with ``weights_only=True``; checks the fingerprint if given."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if fingerprint is not None and ckpt.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} holds a feature net for data {ckpt.get('fingerprint')}, not {fingerprint}")
    net = FeatureNet(**ckpt["config"])
    net.load_state_dict(ckpt["state_dict"])
    return net.eval()


def feature_net_path(cache_dir: str | Path, fingerprint: str) -> Path:
    return Path(cache_dir) / f"featnet-{fingerprint}.pt"


def load_or_train_feature_net(cache_dir: str | Path, fingerprint: str, images: torch.Tensor,
                              labels: torch.Tensor | None, num_classes: int,
                              test_images: torch.Tensor | None = None,
                              test_labels: torch.Tensor | None = None,
                              log: Callable[[str], None] = print,
                              **train_kwargs) -> tuple[FeatureNet, str]:
    """The feature net for a dataset, made once and cached; returns (net in eval mode, name).

    Loads ``feature_net_path(cache_dir, fingerprint)`` if present. Otherwise, for labelled data,
    trains with ``train_feature_net(images, labels, num_classes, **train_kwargs)``: name
    ``"domain-cnn@<fingerprint>"``; the cache key is the fingerprint only, so changed
    ``train_kwargs`` do not retrain; a given test split's accuracy is logged and stored.
    Unlabelled data (labels is None): an untrained net with a fixed seed, name
    ``"random-cnn@<fingerprint>"`` -- weaker scores, see the module docstring. Either is saved
    atomically, so other processes can load the very same net from the path.
    """
    _check_images(images)
    path = feature_net_path(cache_dir, fingerprint)
    if path.exists():
        log(f"loading feature net from {path}")
        return load_feature_net(path, fingerprint), torch.load(path, weights_only=True)["name"]
    if labels is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train_kwargs.get("seed", 0))
            net = FeatureNet(images.shape[1], num_classes, images.shape[-1],
                             train_kwargs.get("feature_dim", 128)).eval()
        name = f"random-cnn@{fingerprint}"
    else:
        net = train_feature_net(images, labels, num_classes, log=log, **train_kwargs)
        name = f"domain-cnn@{fingerprint}"
    ckpt = {"state_dict": net.state_dict(), "config": dict(net.config), "fingerprint": fingerprint, "name": name}
    if labels is not None and test_images is not None and test_labels is not None:
        ckpt["test_accuracy"] = accuracy(net, test_images, test_labels)
        log(f"feature net {name}: test accuracy {ckpt['test_accuracy']:.4f}")
    with atomic_file(path) as f:
        torch.save(ckpt, f)
    return net, name

"""Encoder, decoder (= generator) and discriminator, generic over 28/32/64/128 px and 1 or 3 channels.

Images enter and leave every public function as float32 in [0, 1], shape (B, C, H, W).
Inside, the nets work on [-1, 1]; the decoder returns *logits* whose sigmoid is the image,
so that the pixel term is an exact Bernoulli log-likelihood (``losses.pixel_nll``).

Depth follows the size: each net halves the resolution until it is odd or 4
(28 -> 14 -> 7; 32 -> 16 -> 8 -> 4; 64 and 128 down to 4), doubling the width each time.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from .config import ModelConfig


def resolution_plan(image_size: int) -> list[int]:
    """The spatial sizes visited from the input down to the bottleneck, e.g. 28 -> [28, 14, 7]."""
    sizes = [image_size]
    while sizes[-1] % 2 == 0 and sizes[-1] > 4:
        sizes.append(sizes[-1] // 2)
    return sizes


def _widths(cfg: ModelConfig) -> list[int]:
    """Channel width at each resolution of ``resolution_plan``; doubles per halving, capped at 8x base."""
    steps = len(resolution_plan(cfg.image_size))
    return [cfg.base_channels * min(2**i, 8) for i in range(steps)]


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: batch-independent, so sampling does not depend on the batch and
    # DDP has no running buffers to broadcast between the several forwards of one step.
    return nn.GroupNorm(min(8, channels), channels)


def _to_signed(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 - 1.0


class Encoder(nn.Module):
    """q(z|x): images (B, C, H, W) in [0, 1] -> (mu, logvar), each (B, latent_dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        widths = _widths(cfg)
        bottleneck = resolution_plan(cfg.image_size)[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, widths[0], 3, 1, 1), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), _norm(c_out), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1] * bottleneck * bottleneck, 2 * cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(_to_signed(x)).flatten(1)  # (B, C_last * S * S)
        mu, logvar = self.head(h).chunk(2, dim=1)  # (B, latent_dim) each
        return mu, logvar


class Decoder(nn.Module):
    """p(x|z) and the generator: z (B, latent_dim) -> pixel logits (B, C, H, W); sigmoid gives [0, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        widths = _widths(cfg)[::-1]
        self.bottleneck = resolution_plan(cfg.image_size)[-1]
        self.width = widths[0]
        self.project = nn.Sequential(nn.Linear(cfg.latent_dim, widths[0] * self.bottleneck**2), nn.ReLU())
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), _norm(c_out), nn.ReLU()]
        layers.append(nn.Conv2d(widths[-1], cfg.channels, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(-1, self.width, self.bottleneck, self.bottleneck)  # (B, C_last, S, S)
        return self.body(h)  # (B, C, H, W) logits

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, C, H, W)."""
        return torch.sigmoid(self.forward(z))


class Discriminator(nn.Module):
    """Images (B, C, H, W) in [0, 1] -> (logits (B,), Dis_l features (B, F)).

    Dis_l is the last convolutional layer's activation, flattened: the learned feature space
    in which Larsen et al. measure reconstruction error.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        sn = spectral_norm if cfg.spectral_norm else (lambda module: module)
        widths = _widths(cfg)
        bottleneck = resolution_plan(cfg.image_size)[-1]
        # No normalisation layers: they would break the per-sample gradient penalties (WGAN-GP, R1).
        layers: list[nn.Module] = [sn(nn.Conv2d(cfg.channels, widths[0], 3, 1, 1)), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [sn(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.feature_dim = widths[-1] * bottleneck * bottleneck
        self.head = sn(nn.Linear(self.feature_dim, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(_to_signed(x)).flatten(1)  # (B, F)
        return self.head(feats).squeeze(1), feats  # (B,), (B, F)


def build_nets(cfg: ModelConfig) -> tuple[Encoder, Decoder, Discriminator | None]:
    """The three networks for ``cfg``; the plain VAE (``kind == "vae"``) has no discriminator."""
    dis = Discriminator(cfg) if cfg.kind == "vaegan" else None
    return Encoder(cfg), Decoder(cfg), dis

"""Sampling, encoding and reconstruction with a trained model, from a checkpoint dict.

Images in and out are float32 (N, C, H, W) in [0, 1]; latents are posterior means (N, latent_dim).
Sampling uses the EMA decoder when the checkpoint has one, and draws z from N(0, I) (``prior="standard"``)
or from the Gaussian mixture fitted to the training set's posterior means (``prior="fitted"``, ``prior.py``)
when the checkpoint carries one.
"""
from __future__ import annotations

from typing import Any

import torch

from .checkpoint import config_of
from .config import PRIORS, VAEGANConfig
from .errors import UserError
from .nets import Decoder, Encoder
from .prior import sample_gaussian_mixture


class PriorError(UserError, ValueError):
    """A sampler that is not one of ``PRIORS``, or ``fitted`` for a model that carries no fitted prior."""


class GenerativeModel:
    """Encoder + decoder of a trained VAE-GAN (or VAE), in eval mode on one device."""

    def __init__(self, cfg: VAEGANConfig, enc: Encoder, dec: Decoder, device: str | torch.device = "cpu",
                 fitted_prior: dict[str, torch.Tensor] | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.enc = enc.to(self.device).eval().requires_grad_(False)
        self.dec = dec.to(self.device).eval().requires_grad_(False)
        self.fitted_prior = fitted_prior  # prior.fit_gaussian_mixture's tensors, or None

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], device: str | torch.device = "cpu") -> "GenerativeModel":
        cfg = config_of(state)
        enc, dec = Encoder(cfg.model), Decoder(cfg.model)
        enc.load_state_dict(state["enc"])
        dec.load_state_dict(state.get("dec_ema", state["dec"]))
        return cls(cfg, enc, dec, device, fitted_prior=state.get("fitted_prior"))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        m = self.cfg.model
        return (m.channels, m.image_size, m.image_size)

    @torch.inference_mode()
    def sample(self, num_samples: int, seed: int = 0, prior: str = "standard") -> torch.Tensor:
        """num_samples images from z drawn from ``prior`` (one of ``PRIORS``); the same seed gives the same images."""
        self.check_prior(prior)
        gen = torch.Generator().manual_seed(seed)
        if prior == "fitted":
            z = sample_gaussian_mixture(self.fitted_prior, num_samples, gen)
        else:
            z = torch.randn(num_samples, self.cfg.model.latent_dim, generator=gen)
        return self.dec.generate(z.to(self.device)).float().cpu()

    def check_prior(self, prior: str) -> None:
        if prior not in PRIORS:
            raise PriorError(f"prior {prior!r} is not one of {list(PRIORS)}")
        if prior == "fitted" and self.fitted_prior is None:
            raise PriorError("prior 'fitted': this model's checkpoint carries no fitted prior (models trained "
                             "before it existed, or outside `vaegan run`); use prior 'standard'")

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior means E[q(z|x)], (N, latent_dim)."""
        mu, _ = self.enc(images.to(self.device, torch.float32))
        return mu.float().cpu()

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec.generate(z.to(self.device, torch.float32)).float().cpu()

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Dec(E[q(z|x)]): deterministic reconstructions in [0, 1]."""
        return self.decode(self.encode(images))

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Images along the straight line between the latents of images a and b (each (C, H, W))."""
        za, zb = self.encode(torch.stack([a, b]))
        weights = torch.linspace(0, 1, steps).unsqueeze(1)  # (steps, 1)
        return self.decode((1 - weights) * za + weights * zb)

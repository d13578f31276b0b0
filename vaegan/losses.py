"""Loss terms of the VAE-GAN (Larsen et al. 2016, "Autoencoding beyond pixels"), as pure functions.

Each returns a scalar tensor averaged over the batch; per-image terms are summed over their
dimensions so that they are log-likelihoods in nats. Nothing here calls ``.backward()``:
``step.py`` decides which network each term trains. Terms are computed in float32 even under
autocast, since sums over thousands of bf16 values lose the small differences that matter.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import LossConfig

BALANCE_EQUILIBRIUM = math.log(2.0)  # the BCE of a discriminator at chance


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in nats per latent dimension, (B, D) -> (B, D), in the inputs' dtype.

    Closed form from Kingma & Welling 2014, appendix B: -1/2 (1 + logvar - mu^2 - exp(logvar)).
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per image in nats, summed over latent dims: (B, D) -> (B,)."""
    return kl_per_dim(mu, logvar).sum(1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float = 0.0) -> torch.Tensor:
    """L_prior = KL(q(z|x) || N(0, I)), closed form, averaged over the batch (``kl_per_dim``).

    mu, logvar: (B, D). With ``free_bits`` > 0 each latent dimension's batch-mean KL is clamped
    from below at that many nats (Kingma et al. 2016), so the encoder is not pushed to switch
    dimensions off entirely (posterior collapse).
    """
    mu, logvar = mu.float(), logvar.float()
    if free_bits > 0:
        return kl_per_dim(mu, logvar).mean(0).clamp(min=free_bits).sum()
    return gaussian_kl(mu, logvar).mean()


def kl_warmup_weight(step: int, warmup_steps: int, max_weight: float) -> float:
    """Linear KL annealing from 0 to ``max_weight`` over ``warmup_steps`` (Bowman et al. 2016)."""
    if warmup_steps <= 0:
        return max_weight
    return max_weight * min(1.0, step / warmup_steps)


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) per image in nats under a Bernoulli decoder: BCE with logits, summed over pixels.

    logits and x (B, C, H, W), x in [0, 1] (soft targets) -> (B,), in the inputs' dtype.
    """
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def pixel_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L_llike^pixel: ``bernoulli_nll`` in float32, averaged over the batch. x in [0, 1]."""
    return bernoulli_nll(logits.float(), x.float()).mean()


def feature_nll(feats_recon: torch.Tensor, feats_real: torch.Tensor) -> torch.Tensor:
    """L_llike^Dis_l: -log N(Dis_l(x) | Dis_l(x~), I) up to a constant, summed over features (Larsen eq. 6)."""
    return 0.5 * (feats_recon.float() - feats_real.float()).pow(2).sum(1).mean()


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The discriminator's share of L_GAN, split into (real term, fake term).

    fake_logits are the discriminator's outputs on reconstructions and prior samples together,
    as Larsen's L_GAN = log D(x) + log(1 - D(Dec(z))) + log(1 - D(Dec(Enc(x)))).
    """
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "bce":
        return F.softplus(-real_logits).mean(), F.softplus(fake_logits).mean()
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean(), F.relu(1.0 + fake_logits).mean()
    if kind == "wgan-gp":
        return -real_logits.mean(), fake_logits.mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; allowed: bce, hinge, wgan-gp")


def generator_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """The decoder's share of L_GAN; non-saturating for ``bce`` (Goodfellow et al. 2014, sec. 3)."""
    fake_logits = fake_logits.float()
    if kind == "bce":
        return F.softplus(-fake_logits).mean()
    if kind in ("hinge", "wgan-gp"):
        return -fake_logits.mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; allowed: bce, hinge, wgan-gp")


def _input_gradient_sq_norm(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """||d D(x) / d x||^2 per sample, (B,); create_graph so the penalty itself can be trained on."""
    (grad,) = torch.autograd.grad(logits.float().sum(), inputs, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1)


def gradient_penalty(interp_logits: torch.Tensor, interp: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: E[(||grad D(x^)|| - 1)^2] at random interpolates x^ of real and fake (Gulrajani et al. 2017)."""
    return (_input_gradient_sq_norm(interp_logits, interp).add(1e-12).sqrt() - 1.0).pow(2).mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1: 0.5 * E[||grad D(x)||^2] on real images (Mescheder et al. 2018); times r1_weight by the caller."""
    return 0.5 * _input_gradient_sq_norm(real_logits, real).mean()


def balance_decision(real_bce: float, fake_bce: float, margin: float) -> tuple[bool, bool]:
    """D/G equilibrium (Larsen et al.'s released code): whether to update (dis, dec) this step.

    A discriminator whose BCE on either side is below ln 2 - margin is winning, so its update
    is skipped; above ln 2 + margin it is losing, so the decoder's update is skipped. If both
    would be skipped, both are updated. ``margin == 0`` disables the mechanism.
    """
    if margin <= 0:
        return True, True
    update_dis = min(real_bce, fake_bce) >= BALANCE_EQUILIBRIUM - margin
    update_dec = max(real_bce, fake_bce) <= BALANCE_EQUILIBRIUM + margin
    if not (update_dis or update_dec):
        return True, True
    return update_dis, update_dec


def encoder_loss(cfg: LossConfig, kl: torch.Tensor, feature: torch.Tensor, pixel: torch.Tensor,
                 kl_weight: float) -> torch.Tensor:
    """L_enc = beta * L_prior + L_llike^Dis_l (+ pixel term)."""
    return kl_weight * kl + cfg.feature_weight * feature + cfg.pixel_weight * pixel


def decoder_loss(cfg: LossConfig, feature: torch.Tensor, pixel: torch.Tensor, gan: torch.Tensor) -> torch.Tensor:
    """L_dec = gamma * L_llike^Dis_l - L_GAN (+ pixel term)."""
    return cfg.gamma * feature + cfg.pixel_weight * pixel + cfg.adversarial_weight * gan

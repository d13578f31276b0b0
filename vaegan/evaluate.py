"""The core metrics of a trained model on held-out images, as one flat dict.

Sample quality is scored in the domain feature net's space (``featnet.py``); likelihood figures
use the Bernoulli pixel decoder (``metrics.py``). Images are float32 (N, C, H, W) in [0, 1].
"""
from __future__ import annotations

import torch

from . import metrics
from .featnet import FeatureNet
from .inference import GenerativeModel


@torch.inference_mode()
def extract_features(net: FeatureNet, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, F) penultimate features."""
    net.eval()
    return torch.cat([net.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def sample_quality(featnet: FeatureNet, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """FID, KID and improved precision/recall between real and generated images."""
    return feature_quality(extract_features(featnet, real), extract_features(featnet, fake))


def feature_quality(real_feats: torch.Tensor, fake_feats: torch.Tensor) -> dict[str, float]:
    """``sample_quality`` from the feature net's features of the real and generated images, (N, F) each."""
    kid, kid_std = metrics.kernel_inception_distance(real_feats, fake_feats, subset_size=min(1000, len(real_feats)))
    precision, recall = metrics.precision_recall(real_feats, fake_feats)
    return {"fid": metrics.frechet_distance(real_feats, fake_feats), "kid": kid, "kid_std": kid_std,
            "precision": precision, "recall": recall}


def likelihood(model: GenerativeModel, images: torch.Tensor, iwae_k: int, seed: int = 0) -> dict[str, float]:
    """ELBO and IWAE bound (nats per image, higher is better), IWAE NLL in nats and bits/dim."""
    generator = torch.Generator().manual_seed(seed)
    elbo = metrics.elbo(model.enc, model.dec, images, generator=generator).mean().item()
    log_px = metrics.iwae_log_likelihood(model.enc, model.dec, images, k=iwae_k, generator=generator).mean().item()
    return {"elbo": elbo, "iwae_nll": -log_px,
            "iwae_bits_per_dim": metrics.nats_to_bits_per_dim(-log_px, images[0].numel())}


def evaluate_model(model: GenerativeModel, featnet: FeatureNet, images: torch.Tensor, *, iwae_k: int,
                   iwae_images: int, seed: int = 0, train_images: torch.Tensor | None = None,
                   prior: str = "standard") -> dict[str, float]:
    """Every core metric: sample quality against held-out ``images`` (as many samples as images, z from
    ``prior``), reconstruction error, active units, and likelihood bounds on the first ``iwae_images`` images.
    A model with a fitted prior also gets ``fid_fitted_prior``, the FID of its samples from that prior.
    With ``train_images``, also the train ELBO and the train/test ELBO gap (overfitting shows as a gap > 0)."""
    real_feats = extract_features(featnet, images)  # once, for both priors' figures
    scores = feature_quality(real_feats, extract_features(featnet, model.sample(len(images), seed=seed, prior=prior)))
    if model.fitted_prior is not None:
        scores["fid_fitted_prior"] = scores["fid"] if prior == "fitted" else metrics.frechet_distance(
            real_feats, extract_features(featnet, model.sample(len(images), seed=seed, prior="fitted")))
    scores["recon_mse"] = metrics.reconstruction_mse(model.enc, model.dec, images)
    scores["active_units"] = float(metrics.active_units(model.enc, images))
    scores.update(likelihood(model, images[:iwae_images], iwae_k, seed))
    if train_images is not None:
        generator = torch.Generator().manual_seed(seed)
        scores["train_elbo"] = metrics.elbo(model.enc, model.dec, train_images, generator=generator).mean().item()
        scores["elbo_gap"] = scores["train_elbo"] - scores["elbo"]
    return scores

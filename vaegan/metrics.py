"""Evaluation metrics for VAE / VAE-GAN models: tensors in, numbers out, no file I/O.

Two families:

* Sample-quality scores on feature vectors (B, F) from a feature net (``vaegan.featnet``):
  Fréchet distance (FID, Heusel et al. 2017), kernel distance (KID, Bińkowski et al. 2018)
  and improved precision / recall (Kynkäänniemi et al. 2019).
* Likelihood-side scores that take the encoder and decoder: per-image ELBO, the IWAE bound
  on log p(x) (Burda et al. 2016), active units and reconstruction error.

Model conventions (``vaegan.nets``): images are float32 (B, C, H, W) in [0, 1];
``encoder(x) -> (mu, logvar)``, each (B, D); ``decoder(z) -> logits`` (B, C, H, W);
p(x|z) is Bernoulli with those logits (x in [0, 1] as soft targets); p(z) = N(0, I).

The model-taking functions run under ``torch.inference_mode()`` (faster than ``no_grad`` for the per-epoch
validation passes: benchmarks/results/step_options.json) and do not change the modules'
train/eval mode (call ``.eval()`` first). Noise is drawn from the optional ``generator``,
which must live on ``x.device``; nothing is moved off or onto a device.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import linalg
from torch import nn

from .losses import bernoulli_nll, gaussian_kl

_LOG_2PI = math.log(2.0 * math.pi)


def _as_float64(feats: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, F) features as a float64 numpy array (CPU copy for tensors)."""
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().numpy()
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"expected features of shape (N, F), got {feats.shape}")
    return feats


# ---------------------------------------------------------------------------------------------
# Sample quality on feature vectors
# ---------------------------------------------------------------------------------------------


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID, Heusel et al. 2017).

    feats_a: (N_a, F), feats_b: (N_b, F), N >= 2 each. Returns
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) >= 0 (up to rounding), in squared
    feature units. Follows pytorch-fid's ``calculate_frechet_distance``, in float64.
    """
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    if min(len(a), len(b)) < 2:
        raise ValueError("need at least 2 samples per set to estimate a covariance")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a = np.atleast_2d(np.cov(a, rowvar=False))
    sigma_b = np.atleast_2d(np.cov(b, rowvar=False))

    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        # Singular product (e.g. fewer samples than feature dims): regularise as pytorch-fid does.
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        # Rounding can leave a tiny imaginary part; a large one means the result is meaningless.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real

    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between equal-size sets x, y (m, d) with k(a, b) = (a.b / d + 1)^3."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    # Unbiased estimator: drop the k(x_i, x_i) diagonal terms from the within-set sums.
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor,
                              num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased polynomial-kernel MMD^2, averaged over random subsets.

    feats_a: (N_a, F), feats_b: (N_b, F). ``subset_size`` is clipped to min(N_a, N_b) (>= 2).
    Each subset draws without replacement from each set. Returns (mean, std) over the subsets;
    the mean is ~0 (it can be slightly negative) when both sets come from the same distribution.
    """
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("need at least 2 samples per set for the unbiased MMD estimate")
    rng = np.random.default_rng(seed)
    mmds = np.array([
        _polynomial_mmd2(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
        for _ in range(num_subsets)
    ])
    return float(mmds.mean()), float(mmds.std())


def _knn_radii(feats: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """(N,) distance from each row of ``feats`` (N, F) to its k-th nearest neighbour, self excluded."""
    radii = []
    for start in range(0, len(feats), batch_size):
        dist = torch.cdist(feats[start:start + batch_size], feats)  # (b, N)
        # The k+1 smallest include the zero self-distance; the last of them is the k-th neighbour.
        radii.append(dist.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(radii)


def _inside_manifold(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor,
                     batch_size: int) -> torch.Tensor:
    """(Q,) bool: query row lies within radii[j] of at least one support row j."""
    inside = []
    for start in range(0, len(query), batch_size):
        dist = torch.cdist(query[start:start + batch_size], support)  # (b, N)
        inside.append((dist <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(inside)


def precision_recall(real_feats: np.ndarray | torch.Tensor, fake_feats: np.ndarray | torch.Tensor,
                     k: int = 3, batch_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), each in [0, 1].

    real_feats: (N_r, F), fake_feats: (N_f, F), both with more than k rows. Each set's manifold is
    the union of balls around its samples with radius = distance to the k-th nearest neighbour.
    Precision: fraction of fake samples inside the real manifold (fidelity).
    Recall: fraction of real samples inside the fake manifold (coverage).
    Distances are computed in float64, ``batch_size`` rows at a time (10k x 10k fits easily).
    """
    real = torch.from_numpy(_as_float64(real_feats))
    fake = torch.from_numpy(_as_float64(fake_feats))
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} samples per set")
    real_radii = _knn_radii(real, k, batch_size)
    fake_radii = _knn_radii(fake, k, batch_size)
    precision = _inside_manifold(fake, real, real_radii, batch_size).double().mean()
    recall = _inside_manifold(real, fake, fake_radii, batch_size).double().mean()
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------------
# Likelihood-side metrics (take the encoder and decoder)
# ---------------------------------------------------------------------------------------------
# The KL and Bernoulli terms are the training loss's own (``losses.gaussian_kl``, ``losses.bernoulli_nll``),
# per image and in the inputs' dtype; ``gaussian_kl`` stays importable from here.


def _standard_normal(shape: tuple[int, ...], like: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


@torch.inference_mode()
def elbo(encoder: nn.Module, decoder: nn.Module, x: torch.Tensor,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image evidence lower bound in nats (Kingma & Welling 2014, eq. 7): x (B, C, H, W) -> (B,).

    ELBO = log p(x|z) - KL(q(z|x) || p(z)), one reparameterised sample z = mu + sigma * eps for the
    reconstruction term, closed-form KL. Always <= 0 for Bernoulli pixels; higher is better.
    """
    mu, logvar = encoder(x)
    z = mu + (0.5 * logvar).exp() * _standard_normal(mu.shape, mu, generator)
    return -bernoulli_nll(decoder(z), x) - gaussian_kl(mu, logvar)


@torch.inference_mode()
def iwae_log_likelihood(encoder: nn.Module, decoder: nn.Module, x: torch.Tensor, k: int = 64,
                        generator: torch.Generator | None = None,
                        max_decode_batch: int = 4096) -> torch.Tensor:
    """Importance-weighted bound on log p(x) in nats (Burda et al. 2016, eq. 8): x (B, C, H, W) -> (B,).

    log p(x) >= log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x),  z_i ~ q(z|x).
    The bound tightens as k grows; k = 1 is an unbiased single-sample estimate of the ELBO.
    The B*k decoder passes run in chunks of at most ``max_decode_batch`` images.
    """
    mu, logvar = encoder(x)  # (B, D) each
    std = (0.5 * logvar).exp()
    batch = x.shape[0]
    per_chunk = max(1, max_decode_batch // batch)  # samples per image decoded together
    log_weights = []
    for start in range(0, k, per_chunk):
        n = min(per_chunk, k - start)
        eps = _standard_normal((n, *mu.shape), mu, generator)  # (n, B, D)
        z = mu + std * eps
        x_rep = x.unsqueeze(0).expand(n, *x.shape).reshape(n * batch, *x.shape[1:])
        log_px_z = -bernoulli_nll(decoder(z.reshape(n * batch, -1)), x_rep).view(n, batch)
        log_pz = -0.5 * (z.pow(2) + _LOG_2PI).sum(dim=-1)  # N(0, I)
        log_qz_x = -0.5 * (eps.pow(2) + logvar + _LOG_2PI).sum(dim=-1)  # N(mu, sigma^2) at z
        log_weights.append(log_px_z + log_pz - log_qz_x)  # (n, B)
    return torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(k)


def nats_to_bits_per_dim(nll_nats: float, num_dims: int) -> float:
    """Negative log-likelihood per image in nats -> bits per dimension (num_dims = C * H * W).

    Pass the NLL (a positive number, e.g. -IWAE bound), not the log-likelihood.
    """
    return nll_nats / (num_dims * math.log(2.0))


@torch.no_grad()
def posterior_means(encoder: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """E_q[z|x] for every image of x (N, C, H, W), encoded ``batch_size`` at a time -> (N, D)."""
    return torch.cat([encoder(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)])


@torch.inference_mode()
def active_units(encoder: nn.Module, x: torch.Tensor, threshold: float = 0.01,
                 batch_size: int = 512) -> int:
    """Number of active latent units (Burda et al. 2016, sec. 5.2): x (N, C, H, W), N >= 2.

    A unit u is active when Cov_x(E_{q(u|x)}[u]) > threshold, i.e. its posterior mean varies
    across the data; collapsed units have a posterior mean that ignores x.
    """
    means = posterior_means(encoder, x, batch_size)  # (N, D)
    return int((means.var(dim=0) > threshold).sum())


@torch.inference_mode()
def reconstruction_mse(encoder: nn.Module, decoder: nn.Module, x: torch.Tensor,
                       batch_size: int = 512) -> float:
    """Mean squared error in [0, 1] pixel space between x (N, C, H, W) and sigmoid(decoder(mu)).

    Uses the posterior mean (no sampling), so it is deterministic; averaged over every pixel.
    """
    total = 0.0
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        recon = torch.sigmoid(decoder(encoder(chunk)[0]))
        total += float((recon - chunk).pow(2).sum())
    return total / x.numel()

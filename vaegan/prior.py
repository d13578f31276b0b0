"""A sampler for the prior hole: a Gaussian mixture fitted after training to the posterior means.

A VAE's aggregate posterior rarely fills N(0, I): regions of the prior that no training image encodes
to ("holes") decode to blurry in-between images. Ghosh et al. 2020 ("From variational to deterministic
autoencoders", ex-post density estimation) fit a simple density to the training set's latent codes
after training and sample from that instead; a 10-component full-covariance Gaussian mixture is their
choice and ours.

The fitted mixture is a dict of plain tensors (``weights`` (K,), ``means`` (K, D), ``scale_tril``
(K, D, D)), so it travels inside a checkpoint loadable with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math

import torch

COMPONENTS = 10
COVARIANCE_FLOOR = 1e-4  # added to every covariance's diagonal: keeps a component that owns few points invertible


def fit_gaussian_mixture(latents: torch.Tensor, components: int = COMPONENTS, iterations: int = 100,
                         seed: int = 0, tolerance: float = 1e-5) -> dict[str, torch.Tensor]:
    """Full-covariance Gaussian mixture on ``latents`` (N, D) by expectation-maximisation, in float64.

    Starts from ``components`` distinct random points as means and the data covariance for every component;
    stops after ``iterations`` or when the mean log-likelihood improves by less than ``tolerance`` nats.
    """
    z = latents.detach().to(torch.float64)
    n, dim = z.shape
    if n < components:
        raise ValueError(f"a {components}-component mixture needs at least {components} latent codes, got {n}")
    generator = torch.Generator().manual_seed(seed)
    means = z[torch.randperm(n, generator=generator)[:components]].clone()
    covariances = torch.cov(z.T).expand(components, dim, dim).clone() + COVARIANCE_FLOOR * torch.eye(dim, dtype=z.dtype)
    weights = torch.full((components,), 1.0 / components, dtype=z.dtype)
    previous = -math.inf
    for _ in range(iterations):
        scale_tril = torch.linalg.cholesky(covariances)
        log_joint = _component_log_prob(z, means, scale_tril) + weights.log()  # (N, K)
        log_likelihood = torch.logsumexp(log_joint, dim=1)  # (N,)
        responsibilities = (log_joint - log_likelihood.unsqueeze(1)).exp()  # (N, K)
        counts = responsibilities.sum(0) + 1e-12  # (K,)
        weights = counts / n
        means = responsibilities.T @ z / counts.unsqueeze(1)
        centred = z.unsqueeze(1) - means.unsqueeze(0)  # (N, K, D)
        covariances = torch.einsum("nk,nki,nkj->kij", responsibilities, centred, centred) / counts.view(-1, 1, 1)
        covariances = covariances + COVARIANCE_FLOOR * torch.eye(dim, dtype=z.dtype)
        current = log_likelihood.mean().item()
        if current - previous < tolerance:
            break
        previous = current
    return {"weights": weights.float(), "means": means.float(),
            "scale_tril": torch.linalg.cholesky(covariances).float()}


def _component_log_prob(z: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """log N(z | means_k, L_k L_k^T) for every point and component: (N, D) -> (N, K)."""
    dist = torch.distributions.MultivariateNormal(means, scale_tril=scale_tril, validate_args=False)
    return dist.log_prob(z.unsqueeze(1))


def sample_gaussian_mixture(mixture: dict[str, torch.Tensor], num: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` latent codes (num, D) from ``mixture``; the same generator state gives the same codes."""
    component = torch.multinomial(mixture["weights"], num, replacement=True, generator=generator)  # (num,)
    eps = torch.randn(num, mixture["means"].shape[1], generator=generator)  # (num, D)
    return mixture["means"][component] + (mixture["scale_tril"][component] @ eps.unsqueeze(2)).squeeze(2)

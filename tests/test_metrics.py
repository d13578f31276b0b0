"""Tests for vaegan.metrics: closed forms, limiting cases and bounds, on tiny CPU tensors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from vaegan import metrics
from vaegan.config import ModelConfig
from vaegan.nets import Decoder, Encoder

LN2 = math.log(2.0)


# --- Fréchet distance ---------------------------------------------------------------------------


def _samples_with_exact_moments(rng: np.random.Generator, n: int, mean: np.ndarray,
                                var: np.ndarray) -> np.ndarray:
    """(n, F) samples whose sample mean is ``mean`` and sample covariance (ddof=1) is diag(var)."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    chol = np.linalg.cholesky(np.cov(z, rowvar=False))
    z = np.linalg.solve(chol, z.T).T  # whitened: sample covariance is exactly I
    return z * np.sqrt(var) + mean


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.2, 3.0, size=6), rng.uniform(0.2, 3.0, size=6)
    a = _samples_with_exact_moments(rng, 200, mu1, s1)
    b = _samples_with_exact_moments(rng, 300, mu2, s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    # Torch input (float32 here) gives the same answer up to float32 rounding of the inputs.
    fd_torch = metrics.frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert fd_torch == pytest.approx(expected, rel=1e-4)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(1).normal(size=(400, 16))
    assert abs(metrics.frechet_distance(feats, feats)) < 1e-8


def test_frechet_distance_is_finite_for_rank_deficient_covariances():
    # Fewer samples than dims: both covariances are singular (the eps-offset path may be needed).
    rng = np.random.default_rng(2)
    fd = metrics.frechet_distance(rng.normal(size=(5, 12)), rng.normal(size=(5, 12)) + 3.0)
    assert math.isfinite(fd) and fd > 12 * 9 * 0.5  # dominated by the mean shift of 3 per dim


# --- KID -------------------------------------------------------------------------------------------


def test_kid_single_full_subset_matches_brute_force_unbiased_mmd():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 3)) + 0.5
    k = lambda u, v: (u @ v / 3 + 1.0) ** 3  # noqa: E731
    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    expected = within / (m * (m - 1)) - 2.0 * across / m**2
    # subset_size >= n: every subset is a permutation of the whole set, and MMD ignores order.
    mean, std = metrics.kernel_inception_distance(x, y, num_subsets=3, subset_size=100)
    assert mean == pytest.approx(expected, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same_mean, same_std = metrics.kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    shift_mean, _ = metrics.kernel_inception_distance(a, b + 1.0, num_subsets=20, subset_size=200)
    assert abs(same_mean) < 0.05
    assert shift_mean > 1.0
    assert shift_mean > 20 * (abs(same_mean) + same_std)


# --- precision / recall ----------------------------------------------------------------------------


def test_precision_recall_identical_sets_is_one_one():
    feats = np.random.default_rng(5).normal(size=(300, 10))
    assert metrics.precision_recall(feats, feats, k=3, batch_size=64) == (1.0, 1.0)


def test_precision_recall_far_apart_sets_is_zero_zero():
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(200, 10)), rng.normal(size=(200, 10)) + 100.0
    assert metrics.precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_half_the_modes_gives_high_precision_half_recall():
    # 2-D features: with ~100 samples per mode the k-NN balls cover a mode well in low dimension.
    rng = np.random.default_rng(7)
    centres = np.array([[0, 0], [50, 0], [0, 50], [50, 50]], float)
    real = np.concatenate([c + rng.normal(size=(100, 2)) for c in centres])
    half = np.concatenate([c + rng.normal(size=(200, 2)) for c in centres[:2]])  # modes 0 and 1 only
    full = np.concatenate([c + rng.normal(size=(100, 2)) for c in centres])
    precision, recall = metrics.precision_recall(torch.from_numpy(real), torch.from_numpy(half), k=3)
    assert precision > 0.9
    assert 0.4 < recall <= 0.5
    assert metrics.precision_recall(real, full, k=3)[1] > 0.9  # covering every mode restores recall
    # Batching is only a memory knob: a different batch size gives the same answer.
    assert metrics.precision_recall(real, half, k=3, batch_size=37) == (precision, recall)


# --- KL, ELBO, IWAE --------------------------------------------------------------------------------


def test_gaussian_kl_hand_computed():
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # Row 0: 1/2 (1 + 1 - 1 - 0) + 1/2 (0 + 2 - 1 - ln 2); row 1 is the prior itself.
    expected = torch.tensor([0.5 + 0.5 * (1.0 - LN2), 0.0])
    torch.testing.assert_close(metrics.gaussian_kl(mu, logvar), expected)


class _PriorEncoder(nn.Module):
    """q(z|x) = N(0, I) = p(z) for every x; the posterior mean ignores x."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, x):
        zeros = x.new_zeros(x.shape[0], self.latent_dim)
        return zeros, zeros


class _ConstantDecoder(nn.Module):
    """Logits of 0 everywhere: every pixel is Bernoulli(1/2), so log p(x|z) = -num_pixels * ln 2."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape

    def forward(self, z):
        return z.new_zeros(z.shape[0], *self.shape)


def test_elbo_and_iwae_exact_when_posterior_is_prior_and_decoder_constant():
    x = torch.rand(3, 1, 4, 4)
    enc, dec = _PriorEncoder(2), _ConstantDecoder((1, 4, 4))
    expected = torch.full((3,), -16 * LN2)
    torch.testing.assert_close(metrics.elbo(enc, dec, x), expected)
    torch.testing.assert_close(metrics.iwae_log_likelihood(enc, dec, x, k=5), expected)


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=28, channels=1, latent_dim=4, base_channels=8)
    return Encoder(cfg).eval(), Decoder(cfg).eval()


def test_iwae_bound_is_at_least_the_elbo(tiny_vae):
    enc, dec = tiny_vae
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    elbo = metrics.elbo(enc, dec, x, generator=gen)
    # max_decode_batch=64 with 8 images: 4 chunks of 8 samples each, exercising the chunk loop.
    iwae = metrics.iwae_log_likelihood(enc, dec, x, k=32, generator=gen, max_decode_batch=64)
    assert iwae.shape == (8,) and torch.isfinite(iwae).all()
    assert iwae.mean() >= elbo.mean()
    assert (iwae <= 0).all()  # a bound on log p(x) of Bernoulli pixels


def test_iwae_with_one_sample_estimates_the_elbo(tiny_vae):
    enc, dec = tiny_vae
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(3)).expand(256, 1, 28, 28)
    elbo = metrics.elbo(enc, dec, x, generator=torch.Generator().manual_seed(4))
    iwae1 = metrics.iwae_log_likelihood(enc, dec, x, k=1, generator=torch.Generator().manual_seed(4))
    # Same noise, so both use the same z; they differ only by the single-sample KL estimate,
    # whose mean is the closed-form KL: the mean difference is within a few standard errors.
    diff = iwae1 - elbo
    assert diff.abs().max() > 0  # really a Monte Carlo KL, not the closed form
    assert diff.mean().abs() < 4 * diff.std() / math.sqrt(len(diff)) + 1e-4


def test_iwae_is_reproducible_with_a_generator(tiny_vae):
    enc, dec = tiny_vae
    x = torch.rand(2, 1, 28, 28)
    a = metrics.iwae_log_likelihood(enc, dec, x, k=4, generator=torch.Generator().manual_seed(5))
    b = metrics.iwae_log_likelihood(enc, dec, x, k=4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_nats_to_bits_per_dim_hand_computed():
    # 1000 nats over 784 pixels: 1000 / 784 / ln 2 = 1.840172... bits per pixel.
    assert metrics.nats_to_bits_per_dim(1000.0, 784) == pytest.approx(1.8401722, rel=1e-6)
    assert metrics.nats_to_bits_per_dim(784 * LN2, 784) == pytest.approx(1.0)


# --- active units, reconstruction ------------------------------------------------------------------


class _SliceEncoder(nn.Module):
    """mu = [3 raw pixels (var 1/12), 2 pixels * 0.01 (var ~1e-5), 1 constant]; logvar = 0."""

    def forward(self, x):
        flat = x.flatten(1)
        mu = torch.cat([flat[:, :3], 0.01 * flat[:, 3:5], flat.new_ones(len(x), 1)], dim=1)
        return mu, torch.zeros_like(mu)


def test_active_units_counts_dims_whose_posterior_mean_varies():
    x = torch.rand(200, 1, 4, 4, generator=torch.Generator().manual_seed(6))
    assert metrics.active_units(_SliceEncoder(), x, batch_size=64) == 3
    assert metrics.active_units(_PriorEncoder(5), x) == 0


def test_reconstruction_mse_of_constant_decoder():
    x = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    mse = metrics.reconstruction_mse(_PriorEncoder(2), _ConstantDecoder((1, 4, 4)), x, batch_size=3)
    assert mse == pytest.approx(float(((x - 0.5) ** 2).mean()), rel=1e-6)

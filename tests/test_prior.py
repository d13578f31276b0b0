"""The fitted prior (Ghosh et al. 2020's ex-post density) and DiffAugment: pure PyTorch, no Ray."""
from __future__ import annotations

import io

import pytest
import torch

from vaegan.augment import diff_augment, draw_params
from vaegan.config import VAEGANConfig
from vaegan.inference import GenerativeModel, PriorError
from vaegan.nets import build_nets
from vaegan.prior import fit_gaussian_mixture, sample_gaussian_mixture


def two_clusters(n: int = 3000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    left = torch.randn(n // 4, 2, generator=gen) * 0.5 + torch.tensor([-5.0, 0.0])
    right = torch.randn(n - n // 4, 2, generator=gen) * torch.tensor([0.5, 2.0]) + torch.tensor([5.0, 1.0])
    return torch.cat([left, right])


def test_the_mixture_finds_the_clusters_their_weights_and_their_shapes():
    mixture = fit_gaussian_mixture(two_clusters(), components=2)
    order = mixture["means"][:, 0].argsort()
    means, weights = mixture["means"][order], mixture["weights"][order]
    covariances = (mixture["scale_tril"] @ mixture["scale_tril"].transpose(1, 2))[order]
    assert torch.allclose(means, torch.tensor([[-5.0, 0.0], [5.0, 1.0]]), atol=0.15)
    assert torch.allclose(weights, torch.tensor([0.25, 0.75]), atol=0.02)
    assert torch.allclose(covariances[1].diagonal(), torch.tensor([0.25, 4.0]), rtol=0.15)


def test_mixture_samples_follow_the_fit_and_repeat_with_the_seed():
    mixture = fit_gaussian_mixture(two_clusters(), components=2)
    a = sample_gaussian_mixture(mixture, 4000, torch.Generator().manual_seed(1))
    b = sample_gaussian_mixture(mixture, 4000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (4000, 2)
    assert (a[:, 0] > 0).float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert (a[:, 0].abs() < 2).float().mean().item() < 0.01  # nothing from the hole between the clusters


def test_too_few_latents_for_the_mixture_is_refused_by_name():
    with pytest.raises(ValueError, match="10-component mixture needs at least 10 latent codes, got 3"):
        fit_gaussian_mixture(torch.zeros(3, 2))


def small_model(fitted: bool) -> GenerativeModel:
    cfg = VAEGANConfig()
    cfg.model.latent_dim, cfg.model.base_channels = 2, 4
    enc, dec, _ = build_nets(cfg.model)
    prior = fit_gaussian_mixture(two_clusters(), components=2) if fitted else None
    return GenerativeModel(cfg, enc, dec, fitted_prior=prior)


def test_the_fitted_prior_travels_as_plain_tensors_and_samples_differ_from_the_standard_prior():
    model = small_model(fitted=True)
    buffer = io.BytesIO()
    torch.save({"fitted_prior": model.fitted_prior}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["fitted_prior"]
    assert all(torch.equal(loaded[k], model.fitted_prior[k]) for k in ("weights", "means", "scale_tril"))
    fitted, standard = model.sample(8, seed=0, prior="fitted"), model.sample(8, seed=0)
    assert fitted.shape == standard.shape == (8, 1, 28, 28) and not torch.equal(fitted, standard)
    assert torch.equal(fitted, model.sample(8, seed=0, prior="fitted"))


@pytest.mark.parametrize(("fitted", "prior", "message"), [
    (True, "gmm", "prior 'gmm' is not one of ['standard', 'fitted']"),
    (False, "fitted", "prior 'fitted': this model's checkpoint carries no fitted prior"),
])
def test_an_unusable_prior_is_one_clear_error(fitted, prior, message):
    with pytest.raises(PriorError) as err:
        small_model(fitted).sample(4, prior=prior)
    assert message in str(err.value)


def test_diffaugment_translates_and_cuts_out_the_same_way_for_the_same_draw():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1.0
    params = torch.tensor([[1, -2, 0, 0]])  # move down 1 and left 2; cut out around the top-left corner
    moved = diff_augment(x, params)
    assert moved[0, 0, 5, 2] == 1.0 and moved.sum() == 1.0
    cut = diff_augment(torch.ones(1, 1, 8, 8), torch.tensor([[0, 0, 4, 4]]))
    assert cut[0, 0, 4, 4] == 0 and cut[0, 0, 0, 0] == 1 and cut.sum() == 64 - 4 * 4

    images = torch.rand(6, 3, 28, 28, requires_grad=True)
    draw = draw_params(6, 28, 28, torch.Generator().manual_seed(0))
    assert torch.equal(diff_augment(images, draw), diff_augment(images, draw))
    diff_augment(images, draw).sum().backward()  # differentiable: the decoder's gradient passes through
    assert images.grad is not None and 0 < images.grad.mean() < 1

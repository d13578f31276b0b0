"""Each loss term against a hand computation."""
import math

import pytest
import torch

from vaegan import losses


def test_kl_matches_closed_form_by_hand():
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2) per dim: row 0 -> 0.5 + 0.5*(1 - ln 2); row 1 -> 2.0
    expected = ((0.5 + 0.5 * (1 - math.log(2.0))) + 2.0) / 2
    assert losses.kl_divergence(mu, logvar).item() == pytest.approx(expected, rel=1e-6)


def test_free_bits_clamp_each_dimension_from_below():
    mu = torch.tensor([[0.1, 3.0]])
    logvar = torch.zeros(1, 2)
    # dim 0: 0.005 nats -> clamped to 0.5; dim 1: 4.5 nats stays.
    assert losses.kl_divergence(mu, logvar, free_bits=0.5).item() == pytest.approx(0.5 + 4.5)


def test_kl_warmup_is_linear_then_flat():
    assert losses.kl_warmup_weight(0, 100, 2.0) == 0.0
    assert losses.kl_warmup_weight(50, 100, 2.0) == pytest.approx(1.0)
    assert losses.kl_warmup_weight(500, 100, 2.0) == 2.0
    assert losses.kl_warmup_weight(0, 0, 2.0) == 2.0


def test_pixel_nll_is_bernoulli_log_likelihood_summed_over_pixels():
    logits = torch.tensor([[[[0.0, 2.0]]]])  # (1, 1, 1, 2)
    x = torch.tensor([[[[1.0, 0.0]]]])
    p = torch.sigmoid(torch.tensor(2.0)).item()
    expected = -math.log(0.5) - math.log(1 - p)
    assert losses.pixel_nll(logits, x).item() == pytest.approx(expected, rel=1e-6)


def test_feature_nll_is_half_squared_error_summed_then_batch_mean():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert losses.feature_nll(a, b).item() == pytest.approx((0.5 * 5 + 0.5 * 9) / 2)


@pytest.mark.parametrize("kind, real, fake, gen", [
    ("bce", math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(2.0))),
    ("hinge", 0.0, max(0.0, 1 - 2.0), 2.0),
    ("wgan-gp", -1.0, -2.0, 2.0),
])
def test_adversarial_losses_by_hand(kind, real, fake, gen):
    real_logits, fake_logits = torch.tensor([1.0]), torch.tensor([-2.0])
    real_term, fake_term = losses.discriminator_loss(kind, real_logits, fake_logits)
    assert real_term.item() == pytest.approx(real, rel=1e-6)
    assert fake_term.item() == pytest.approx(fake, rel=1e-6)
    assert losses.generator_loss(kind, fake_logits).item() == pytest.approx(gen, rel=1e-6)


def test_unknown_adversarial_loss_is_rejected():
    with pytest.raises(ValueError, match="unknown adversarial loss 'lsgan'"):
        losses.generator_loss("lsgan", torch.zeros(1))


def test_penalties_of_a_linear_critic_equal_its_weight_norm():
    w = torch.tensor([3.0, 4.0])  # ||w|| = 5, so ||grad_x w.x|| = 5 everywhere
    x = torch.randn(4, 2, requires_grad=True)
    logits = x @ w
    assert losses.gradient_penalty(logits, x).item() == pytest.approx((5 - 1) ** 2, rel=1e-5)
    assert losses.r1_penalty(x @ w, x).item() == pytest.approx(0.5 * 25, rel=1e-5)


def test_balance_skips_the_winning_side_and_never_both():
    eq = losses.BALANCE_EQUILIBRIUM
    assert losses.balance_decision(eq, eq, 0.35) == (True, True)
    assert losses.balance_decision(0.1, eq, 0.35) == (False, True)  # discriminator winning
    assert losses.balance_decision(eq, 2.0, 0.35) == (True, False)  # discriminator losing
    assert losses.balance_decision(0.1, 2.0, 0.35) == (True, True)  # both would skip -> neither does
    assert losses.balance_decision(0.1, 2.0, 0.0) == (True, True)  # disabled

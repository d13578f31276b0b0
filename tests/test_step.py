"""The three-optimiser step: gradient isolation, the NaN guard, balance, EMA and checkpoints."""
import copy

import pytest
import torch

from vaegan import losses
from vaegan.augment import diff_augment
from vaegan.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vaegan.config import VAEGANConfig
from vaegan.inference import GenerativeModel
from vaegan.nets import build_nets
from vaegan.guard import NonFiniteLossError
from vaegan.step import VAEGANTrainer


def tiny_config(**loss) -> VAEGANConfig:
    cfg = VAEGANConfig()
    cfg.model.latent_dim, cfg.model.base_channels, cfg.model.spectral_norm = 4, 8, False
    cfg.loss.kl_warmup_steps, cfg.loss.pixel_weight, cfg.loss.gamma = 0, 0.5, 0.7
    cfg.loss.adversarial_weight = 1.3
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    cfg.train.grad_clip, cfg.train.ema_decay, cfg.train.balance_margin = 0.0, 0.0, 0.0
    return cfg


def make_trainer(cfg: VAEGANConfig, seed: int = 0) -> VAEGANTrainer:
    torch.manual_seed(seed)
    return VAEGANTrainer(cfg, *build_nets(cfg.model))


def independent_gradients(cfg, enc, dec, dis, x, noise):
    """Each network's gradient of its own loss alone, from fresh copies, with plain autograd."""
    enc, dec, dis = (copy.deepcopy(m).requires_grad_(True) for m in (enc, dec, dis))
    lc, batch = cfg.loss, x.shape[0]
    # DiffAugment: a real image and its reconstruction seen under one draw, a prior sample under its own
    pair, prior = (lambda v: v, lambda v: v) if noise.augment is None else (
        lambda v: diff_augment(v, noise.augment[:batch]), lambda v: diff_augment(v, noise.augment[batch:]))
    mu, logvar = enc(x)
    z = mu + noise.eps * torch.exp(0.5 * logvar)
    rec_logits, prior_logits = dec(z), dec(noise.z_prior)
    real_logits, real_feats = dis(pair(x))
    rec_logits_d, rec_feats = dis(pair(torch.sigmoid(rec_logits)))
    prior_logits_d, _ = dis(prior(torch.sigmoid(prior_logits)))
    feature = losses.feature_nll(rec_feats, real_feats.detach())
    pixel = losses.pixel_nll(rec_logits, x)
    loss_enc = lc.kl_weight * losses.kl_divergence(mu, logvar) + lc.feature_weight * feature + lc.pixel_weight * pixel
    gan = losses.generator_loss(lc.adversarial, torch.cat([rec_logits_d, prior_logits_d]))
    loss_dec = lc.gamma * feature + lc.pixel_weight * pixel + lc.adversarial_weight * gan
    fakes = torch.cat([pair(torch.sigmoid(rec_logits)), prior(torch.sigmoid(prior_logits))]).detach()
    real = x.clone().requires_grad_(True)
    real_logits, _ = dis(pair(real))
    real_term, fake_term = losses.discriminator_loss(lc.adversarial, real_logits, dis(fakes)[0])
    loss_dis = real_term + fake_term
    if lc.adversarial == "wgan-gp":
        interp = (noise.mix * pair(x) + (1 - noise.mix) * fakes[:batch]).requires_grad_(True)
        loss_dis = loss_dis + lc.gp_weight * losses.gradient_penalty(dis(interp)[0], interp)
    if lc.r1_weight > 0:
        loss_dis = loss_dis + lc.r1_weight * losses.r1_penalty(real_logits, real)
    grads = {}
    for name, loss, module in (("enc", loss_enc, enc), ("dec", loss_dec, dec), ("dis", loss_dis, dis)):
        grads[name] = torch.autograd.grad(loss, list(module.parameters()), retain_graph=True)
    # A leaky step: the discriminator's loss on fakes still attached to the decoder, backpropagated with
    # the decoder's (pytorch/examples dcgan's errG/errD pattern without the detach).
    attached_fakes = torch.cat([pair(torch.sigmoid(rec_logits)), prior(torch.sigmoid(prior_logits))])
    leaked = sum(losses.discriminator_loss(lc.adversarial, real_logits, dis(attached_fakes)[0]))
    leaky = torch.autograd.grad(loss_dec + leaked, list(dec.parameters()), retain_graph=True, allow_unused=True)
    return grads, leaky


@pytest.mark.parametrize("adversarial, r1, diffaugment", [("bce", 0.0, False), ("hinge", 2.0, False),
                                                          ("wgan-gp", 0.0, False), ("hinge", 2.0, True),
                                                          ("wgan-gp", 0.0, True)])
def test_each_gradient_equals_its_own_loss_alone(adversarial, r1, diffaugment):
    cfg = tiny_config(adversarial=adversarial, r1_weight=r1, diffaugment=diffaugment)
    trainer = make_trainer(cfg)
    initial = [copy.deepcopy(m) for m in (trainer.enc, trainer.dec, trainer.dis)]
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    noise = trainer.sample_noise(x, torch.Generator().manual_seed(2))
    assert (noise.augment is not None) == diffaugment
    trainer.train_step(x, noise)
    expected, leaky = independent_gradients(cfg, *initial, x, noise)
    for name, module in (("enc", trainer.enc), ("dec", trainer.dec), ("dis", trainer.dis)):
        for param, want in zip(module.parameters(), expected[name]):
            torch.testing.assert_close(param.grad, want, rtol=1e-4, atol=1e-6, msg=f"{name} gradient")
    # The leaky implementation (backward on dec + dis losses before stepping) would differ.
    differs = [not torch.allclose(p.grad, g) for p, g in zip(trainer.dec.parameters(), leaky) if g is not None]
    assert any(differs)


def test_a_step_moves_every_network_and_only_when_allowed():
    cfg = tiny_config()
    trainer = make_trainer(cfg)
    before = [copy.deepcopy(m.state_dict()) for m in (trainer.enc, trainer.dec, trainer.dis)]
    metrics = trainer.train_step(torch.rand(4, 1, 28, 28))
    for old, module in zip(before, (trainer.enc, trainer.dec, trainer.dis)):
        assert any(not torch.equal(old[k], v) for k, v in module.state_dict().items())
    assert {"loss/enc/kl", "loss/dec/gan", "loss/dis/real", "grad_norm/dis"} <= metrics.keys()
    assert all(not p.requires_grad for m in (trainer.enc, trainer.dec, trainer.dis) for p in m.parameters())


def test_nan_guard_skips_counts_and_then_fails_clearly():
    cfg = tiny_config()
    cfg.train.max_bad_steps, cfg.train.max_rollbacks = 3, 0  # rollbacks: tests/test_rollback.py
    trainer = make_trainer(cfg)
    before = copy.deepcopy(trainer.dec.state_dict())
    bad = torch.full((4, 1, 28, 28), float("nan"))
    for expected_count in (1, 2):
        metrics = trainer.train_step(bad)
        assert metrics["guard/nonfinite_skipped"] == expected_count
    assert all(torch.equal(before[k], v) for k, v in trainer.dec.state_dict().items())
    trainer.train_step(torch.rand(4, 1, 28, 28))  # a good step resets the consecutive count
    assert trainer.guard.bad_steps == 0
    for _ in range(2):
        trainer.train_step(bad)
    with pytest.raises(NonFiniteLossError, match="3 consecutive training steps had non-finite gradients"):
        trainer.train_step(bad)


def test_plain_vae_mode_has_no_discriminator_and_trains_on_the_elbo():
    cfg = tiny_config()
    cfg.model.kind = "vae"
    trainer = make_trainer(cfg)
    assert trainer.dis is None
    metrics = trainer.train_step(torch.rand(4, 1, 28, 28))
    assert metrics["loss/vae/total"] == pytest.approx(metrics["loss/enc/kl"] + metrics["loss/dec/pixel"], rel=1e-5)


def test_ema_decoder_lags_the_trained_decoder():
    cfg = tiny_config()
    cfg.train.ema_decay = 0.9
    trainer = make_trainer(cfg)
    for _ in range(3):
        trainer.train_step(torch.rand(4, 1, 28, 28))
    ema, live = trainer.generator.state_dict(), trainer.dec.state_dict()
    assert trainer.generator is not trainer.dec
    assert any(not torch.equal(ema[k], live[k]) for k in live)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    cfg = tiny_config()
    cfg.train.ema_decay = 0.9
    trainer = make_trainer(cfg)
    batches = [torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    trainer.train_step(batches[0])
    path = save_checkpoint(tmp_path / "ckpt.pt", trainer, extra={"epoch": 1})
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and state["epoch"] == 1 and state["config"]["model"]["latent_dim"] == 4
    resumed = make_trainer(cfg, seed=123)
    resumed.load_state_dict(load_checkpoint(path))
    for t in (trainer, resumed):
        t.train_step(batches[1], t.sample_noise(batches[1], torch.Generator().manual_seed(7)))
    for a, b in zip(trainer.state_dict()["dec"].values(), resumed.state_dict()["dec"].values()):
        torch.testing.assert_close(a, b)
    model = GenerativeModel.from_checkpoint(load_checkpoint(path))
    samples = model.sample(5, seed=3)
    assert samples.shape == (5, 1, 28, 28) and 0 <= samples.min() and samples.max() <= 1
    torch.testing.assert_close(samples, model.sample(5, seed=3))
    assert model.encode(batches[0]).shape == (4, 4)
    assert model.reconstruct(batches[0]).shape == batches[0].shape


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_object_in_a_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"config": {}, "enc": _Exploit(str(marker))}, path)
    with pytest.raises(CheckpointError, match="holds objects other than plain weights"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    trainer = make_trainer(tiny_config())
    path = save_checkpoint(tmp_path / "ckpt.pt", trainer)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(path)


def test_each_step_says_which_players_learned_and_an_epoch_averages_it():
    """dis/dec_update_fraction: 1 when that network stepped; the epoch's mean is its update fraction."""
    from vaegan.loop import train_epoch
    cfg = tiny_config()
    cfg.train.balance_margin = 10.0  # every BCE lies inside the margin: the rule steps both players
    trainer = make_trainer(cfg)
    summary = train_epoch(trainer, [torch.rand(4, 1, 28, 28) for _ in range(3)])
    assert summary["dis_update_fraction"] == 1.0 and summary["dec_update_fraction"] == 1.0
    trainer._balance = lambda bce: (False, True)  # the rule holds the discriminator back on every step
    summary = train_epoch(trainer, [torch.rand(4, 1, 28, 28) for _ in range(4)])
    assert summary["dis_update_fraction"] == 0.0 and summary["dec_update_fraction"] == 1.0

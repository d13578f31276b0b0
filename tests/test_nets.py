"""Shapes for every supported size and channel count, and a few real steps on coloured shapes."""
import pytest
import torch

from vaegan.config import VAEGANConfig
from vaegan.data import make_shapes, to_float
from vaegan.loop import fit
from vaegan.nets import build_nets, resolution_plan
from vaegan.step import VAEGANTrainer


@pytest.mark.parametrize("size, plan", [(28, [28, 14, 7]), (32, [32, 16, 8, 4]), (64, [64, 32, 16, 8, 4]),
                                        (128, [128, 64, 32, 16, 8, 4])])
def test_depth_follows_the_image_size(size, plan):
    assert resolution_plan(size) == plan


@pytest.mark.parametrize("size", [28, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_for_every_size_and_channel_count(size, channels):
    cfg = VAEGANConfig()
    cfg.model.image_size, cfg.model.channels, cfg.model.latent_dim, cfg.model.base_channels = size, channels, 6, 4
    enc, dec, dis = build_nets(cfg.model)
    x = torch.rand(3, channels, size, size)
    mu, logvar = enc(x)
    assert mu.shape == logvar.shape == (3, 6)
    assert dec(mu).shape == x.shape
    images = dec.generate(mu)
    assert 0 <= images.min() and images.max() <= 1
    logits, feats = dis(x)
    assert logits.shape == (3,) and feats.shape == (3, dis.feature_dim)


@pytest.mark.parametrize("size", [64, 128])
def test_three_channel_shapes_train_at_high_resolution(size):
    """A few steps on procedurally drawn coloured shapes: losses finite, reconstruction improves."""
    images, _ = make_shapes(64, size, channels=3, seed=0)
    cfg = VAEGANConfig()
    cfg.model.image_size, cfg.model.channels, cfg.model.latent_dim, cfg.model.base_channels = size, 3, 8, 4
    cfg.opt_enc.lr = cfg.opt_dec.lr = 2e-3
    torch.manual_seed(0)
    trainer = VAEGANTrainer(cfg, *build_nets(cfg.model))
    history = fit(trainer, images, epochs=3, batch_size=16, log=lambda line: None)
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert history[-1]["loss/enc/pixel"] < history[0]["loss/enc/pixel"]
    samples = trainer.generator.generate(torch.randn(4, 8))
    assert samples.shape == (4, 3, size, size) and 0 <= samples.min() and samples.max() <= 1
    assert to_float(images).shape == (64, 3, size, size)

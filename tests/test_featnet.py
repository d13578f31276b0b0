"""Tests for vaegan.featnet: shapes, fingerprints, the on-disk cache and a tiny learnable task (CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vaegan import featnet
from vaegan.featnet import FeatureNet


@pytest.mark.parametrize("size", [28, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_feature_net_shapes(size, channels):
    net = FeatureNet(channels=channels, num_classes=5, image_size=size, feature_dim=16).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        logits, feats = net(x), net.features(x)
    assert logits.shape == (2, 5)
    assert feats.shape == (2, 16)
    assert (feats >= 0).all()  # post-ReLU activations


def _halves_dataset(n: int, seed: int, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 1, size, size) noise images; class 1 has a brighter left half, class 0 a brighter right half."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=gen)
    images = torch.randint(0, 140, (n, 1, size, size), generator=gen)
    bright = torch.zeros(n, 1, size, size, dtype=torch.long)
    bright[labels == 1, :, :, : size // 2] = 100
    bright[labels == 0, :, :, size // 2:] = 100
    return (images + bright).to(torch.uint8), labels


def test_fingerprint_is_stable_and_sensitive():
    images, labels = _halves_dataset(8, seed=0)
    fp = featnet.dataset_fingerprint(images, labels)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert featnet.dataset_fingerprint(images.clone(), labels.clone()) == fp
    assert featnet.dataset_fingerprint(images.numpy(), labels.numpy()) == fp  # tensor or array alike

    changed = images.clone()
    changed[3, 0, 5, 7] ^= 1  # one pixel, one bit
    assert featnet.dataset_fingerprint(changed, labels) != fp
    flipped = labels.clone()
    flipped[0] = 1 - flipped[0]
    assert featnet.dataset_fingerprint(images, flipped) != fp
    assert featnet.dataset_fingerprint(images) != fp  # labels are part of the fingerprint
    # Same bytes, other shape: the shape is hashed too.
    assert featnet.dataset_fingerprint(images.view(8, 1, 14, 56)) != featnet.dataset_fingerprint(images)


def test_tiny_learnable_task_reaches_high_accuracy():
    train_x, train_y = _halves_dataset(256, seed=1)
    test_x, test_y = _halves_dataset(200, seed=2)
    net = featnet.train_feature_net(train_x, train_y, num_classes=2, epochs=2, batch_size=32,
                                    log=lambda msg: None)
    assert not net.training
    assert featnet.accuracy(net, test_x, test_y) > 0.9


def test_training_is_deterministic_and_leaves_global_rng_alone():
    images, labels = _halves_dataset(64, seed=3)
    kwargs = dict(num_classes=2, epochs=1, batch_size=16, seed=7, log=lambda msg: None)
    torch.manual_seed(123)
    net_a = featnet.train_feature_net(images, labels, **kwargs)
    after = torch.rand(1)
    torch.manual_seed(123)
    net_b = featnet.train_feature_net(images, labels, **kwargs)
    assert torch.equal(torch.rand(1), after)  # the init seeding did not touch the global generator
    for key, value in net_a.state_dict().items():
        assert torch.equal(value, net_b.state_dict()[key]), key


def test_cache_round_trip(tmp_path):
    images, labels = _halves_dataset(64, seed=4)
    test_x, test_y = _halves_dataset(32, seed=5)
    fp = featnet.dataset_fingerprint(images, labels)
    messages: list[str] = []
    kwargs = dict(epochs=1, batch_size=16, log=messages.append)

    net, name = featnet.load_or_train_feature_net(tmp_path, fp, images, labels, 2,
                                                  test_images=test_x, test_labels=test_y, **kwargs)
    path = tmp_path / f"featnet-{fp}.pt"
    assert name == f"domain-cnn@{fp}"
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    mtime = path.stat().st_mtime_ns
    assert any("epoch 1/1" in m for m in messages)  # it trained

    messages.clear()
    net2, name2 = featnet.load_or_train_feature_net(tmp_path, fp, images, labels, 2, **kwargs)
    assert name2 == name
    assert path.stat().st_mtime_ns == mtime  # loaded, not retrained and rewritten
    assert not any("epoch" in m for m in messages)
    probe = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net2.features(probe), net.features(probe), rtol=0, atol=0)

    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"] == dict(channels=1, num_classes=2, image_size=28, feature_dim=128, width=32)
    assert 0.0 <= ckpt["test_accuracy"] <= 1.0
    assert ckpt["fingerprint"] == fp and ckpt["name"] == name


def test_cached_file_for_other_data_is_refused(tmp_path):
    images, labels = _halves_dataset(32, seed=6)
    fp = featnet.dataset_fingerprint(images, labels)
    featnet.load_or_train_feature_net(tmp_path, fp, images, labels, 2, epochs=1, log=lambda m: None)
    (tmp_path / f"featnet-{fp}.pt").rename(tmp_path / "featnet-0000000000000000.pt")
    with pytest.raises(ValueError, match="not 0000000000000000"):
        featnet.load_or_train_feature_net(tmp_path, "0000000000000000", images, labels, 2)


def test_unlabelled_data_gets_a_fixed_random_net(tmp_path):
    images = torch.rand(6, 3, 32, 32)
    fp = featnet.dataset_fingerprint(images)
    messages: list[str] = []
    net_a, name = featnet.load_or_train_feature_net(tmp_path, fp, images, None, num_classes=1,
                                                    log=messages.append)
    assert name == f"random-cnn@{fp}"
    assert not any("epoch" in m for m in messages)  # nothing trained
    # Saved like a trained net, so other processes score with the very same random weights.
    path = featnet.feature_net_path(tmp_path, fp)
    net_b, name_b = featnet.load_or_train_feature_net(tmp_path, fp, images, None, num_classes=1,
                                                      log=messages.append)
    assert name_b == name
    with torch.no_grad():
        feats_a, feats_b = net_a.features(images), net_b.features(images)
        feats_c = featnet.load_feature_net(path, fp).features(images)
    assert feats_a.shape == (6, 128)
    torch.testing.assert_close(feats_b, feats_a, rtol=0, atol=0)
    torch.testing.assert_close(feats_c, feats_a, rtol=0, atol=0)
    assert not np.allclose(feats_a[0].numpy(), feats_a[1].numpy())  # features depend on the image

    # A fresh cache gives the same random net again: the seed is fixed.
    net_d, _ = featnet.load_or_train_feature_net(tmp_path / "other", fp, images, None, num_classes=1,
                                                 log=messages.append)
    with torch.no_grad():
        torch.testing.assert_close(net_d.features(images), feats_a, rtol=0, atol=0)

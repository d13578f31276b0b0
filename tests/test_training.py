"""A short CPU run on a real Fashion-MNIST subset: the losses move the way they should."""
import torch

from vaegan import metrics
from vaegan.checkpoint import checkpoint_payload
from vaegan.config import VAEGANConfig
from vaegan.data import find_idx_dir, load_idx
from vaegan.inference import GenerativeModel
from vaegan.loop import fit
from vaegan.nets import build_nets
from vaegan.step import VAEGANTrainer


def real_subset(n: int) -> torch.Tensor:
    images, _ = load_idx(find_idx_dir(None, "data", allow_download=False), "train")
    return images[:n]


def test_short_run_on_fashion_mnist_learns():
    images = real_subset(1536)
    cfg = VAEGANConfig()
    cfg.model.latent_dim, cfg.model.base_channels = 16, 8
    cfg.loss.kl_warmup_steps = 50
    cfg.opt_enc.lr = cfg.opt_dec.lr = 1e-3
    torch.manual_seed(0)
    trainer = VAEGANTrainer(cfg, *build_nets(cfg.model))
    lines = []
    history = fit(trainer, images, epochs=3, batch_size=64, log=lines.append)
    first, last = history[0], history[-1]
    assert len(lines) == 3 and "images/s=" in lines[0]
    assert last["loss/enc/pixel"] < 0.8 * first["loss/enc/pixel"]  # reconstructions sharpen
    # Dis_l is measured in the discriminator's own, moving feature space, so it need not fall; it must stay sane.
    assert 0 < last["loss/enc/feature"] < 1e3
    assert first["kl_weight"] < 0.5 < 0.99 < last["kl_weight"] <= cfg.loss.kl_weight  # the warm-up ran its course
    assert 0 < last["loss/enc/kl"] < 200  # the posterior carries information without blowing up
    assert 0.1 < last["loss/dis/real"] < 3 and 0.1 < last["loss/dis/fake"] < 3  # neither side collapsed
    assert last["guard/nonfinite_skipped"] == 0

    model = GenerativeModel.from_checkpoint(checkpoint_payload(trainer))
    samples = model.sample(16, seed=0)
    assert samples.shape == (16, 1, 28, 28) and 0 <= samples.min() and samples.max() <= 1
    held_out = real_subset(1664)[1536:].float() / 255.0
    gen = torch.Generator().manual_seed(0)
    elbo = metrics.elbo(model.enc, model.dec, held_out, generator=gen).mean()
    iwae = metrics.iwae_log_likelihood(model.enc, model.dec, held_out, k=16, generator=gen).mean()
    assert iwae >= elbo
    assert metrics.active_units(model.enc, held_out) > 0
    assert metrics.reconstruction_mse(model.enc, model.dec, held_out) < 0.1


def test_each_rank_gets_an_equal_disjoint_share_reshuffled_every_epoch():
    """vaegan.loop.shard_order, what Ray Train workers sample a held split with: DDP needs the same number of
    steps on every rank, and a resumed run must replay the epoch's order."""
    from vaegan.loop import shard_order
    shares = [shard_order(1061, seed=3, epoch=2, rank=rank, world=2) for rank in range(2)]
    assert [len(s) for s in shares] == [530, 530]
    assert not set(shares[0].tolist()) & set(shares[1].tolist())
    assert set(torch.cat(shares).tolist()) <= set(range(1061))
    assert torch.equal(shard_order(1061, seed=3, epoch=2, rank=1, world=2), shares[1])  # replayable
    one = shard_order(1061, seed=3, epoch=2)
    assert sorted(one.tolist()) == list(range(1061))  # one rank: every row once
    assert not torch.equal(shard_order(1061, seed=3, epoch=3), one)  # a new order each epoch

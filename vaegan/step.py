"""One VAE-GAN training step with three optimisers and gradients isolated per network.

Every network runs its forward passes once per step, at the batch Larsen et al.'s formulation needs
(encoder on B, decoder on B reconstructions and B prior samples, discriminator on B real, B
reconstructed and B prior images), and each loss then runs one backward into its own network's
parameters alone (``backward(inputs=...)``):

    enc <- beta * KL + Dis_l reconstruction (+ pixel)
    dec <- gamma * Dis_l reconstruction + generator GAN loss (+ pixel)
    dis <- discriminator GAN loss (+ R1 / gradient penalty)

``inputs=`` is what isolates the gradients: autograd computes only the parts of the backward that
lead to the named parameters, so the decoder's loss passes through the discriminator as input
gradients without filling its ``.grad``, and the discriminator's loss never reaches the decoder.
That is also the step's FLOP floor (docs/benchmarks.md): no backward work a loss does not need.
A widely used VAE-GAN calls backward on several losses before stepping and so leaks the
discriminator's loss into the decoder's gradient; here that is impossible.

All gradients come from the same parameters before any optimiser steps (Larsen et al.'s
simultaneous update), so a test can recompute each network's gradient from its loss alone.
Networks may be wrapped in DistributedDataParallel: each network's forwards are split so that a
backward only walks the images its loss depends on, and exactly one forward per network per step
readies DDP's all-reduce (``ddp_sync``); the others run under ``no_sync``. Autograd sums the
gradients of all of a network's forwards before it hands them to DDP, so DDP reduces the whole
gradient, once. Nothing here knows about ranks or launchers.

Non-finite steps are the divergence guard's business (``guard.py``): the trainer asks it whether a
step's gradient norms allow an update, and gives it ``restore`` to roll back with.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from . import losses
from .augment import diff_augment
from .augment import draw_params as augment_params
from .config import OptimConfig, VAEGANConfig
from .guard import DivergenceGuard


@dataclass
class StepLosses:
    """What a step's forward passes produce: its metrics, each loss with the networks it trains (in the
    order their backward passes run), and the balance rule's BCE of the discriminator (real, fake)."""

    metrics: dict[str, torch.Tensor]
    backward_plan: list[tuple[torch.Tensor, list[nn.Module]]]
    balance_bce: torch.Tensor | None = None  # (2,); None for the plain VAE


@dataclass
class StepNoise:
    """The randomness of one step, drawn once so every phase (and a test) sees the same values."""

    eps: torch.Tensor  # (B, latent_dim) reparameterisation noise
    z_prior: torch.Tensor  # (B, latent_dim) samples from p(z) = N(0, I)
    mix: torch.Tensor  # (B, 1, 1, 1) real/fake mixing weights for the WGAN-GP interpolates
    augment: torch.Tensor | None = None  # (2B, 4) DiffAugment draws: :B for the (real, rec) pairs, B: for prior samples


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


@contextlib.contextmanager
def ddp_sync(module: nn.Module | None, sync: bool) -> Iterator[None]:
    """Let DDP prepare a gradient all-reduce for this forward only when ``sync`` (no-op on plain modules)."""
    if sync or not isinstance(module, DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield


def mean_across_workers(values: torch.Tensor) -> torch.Tensor:
    """Average a small tensor over DDP workers so every worker takes the same decision."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def warmup_ema(decay: float):
    """An AveragedModel update whose decay ramps up as min(decay, (1 + n) / (10 + n)) over n updates
    (TensorFlow's ExponentialMovingAverage with num_updates): without it, a 0.999 EMA stays close to
    the random initial weights for the first few thousand steps, and early samples are noise."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        torch._foreach_lerp_(ema_params, params, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


def make_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # fused: one kernel over all of a network's parameters (CPU and CUDA) instead of a loop over tensors;
    # a decoder Adam step takes a quarter of the time and the train step gains about 3% on the 2-core CPU
    # (benchmarks/results/step_options.json); more on a GPU, where each tensor would be a kernel launch.
    return torch.optim.Adam(unwrap(module).parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay, fused=True)


class VAEGANTrainer:
    """Owns the optimisers, the decoder EMA and the step counters of one training run.

    ``enc``, ``dec``, ``dis`` may be plain modules or DDP wrappers (``dis`` is None for the
    plain VAE). Batches are float32 images (B, C, H, W) in [0, 1] on the networks' device.
    """

    def __init__(self, cfg: VAEGANConfig, enc: nn.Module, dec: nn.Module, dis: nn.Module | None):
        self.cfg = cfg
        self.enc, self.dec, self.dis = enc, dec, dis
        self.opt_enc = make_optimizer(enc, cfg.opt_enc)
        self.opt_dec = make_optimizer(dec, cfg.opt_dec)
        self.opt_dis = make_optimizer(dis, cfg.opt_dis) if dis is not None else None
        decay = cfg.train.ema_decay
        self.dec_ema = (AveragedModel(unwrap(dec), multi_avg_fn=warmup_ema(decay), use_buffers=True)
                        if decay > 0 else None)
        self.step = 0  # goes back on a rollback
        self.executed_steps = 0  # train_step calls so far; never goes back
        self.counters = {"dis_skipped": 0, "dec_skipped": 0}  # the balance rule's decisions
        self.guard = DivergenceGuard(cfg.train)
        # Each network's parameters, listed once: the ``inputs=`` of its loss's backward.
        self._parameters = {id(m): list(unwrap(m).parameters()) for m in self._networks()}
        for module in self._networks():
            module.requires_grad_(False)
        self.guard.mark_good(self.state_dict())

    def _networks(self) -> list[nn.Module]:
        return [m for m in (self.enc, self.dec, self.dis) if m is not None]

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.opt_enc, self.opt_dec, self.opt_dis) if o is not None]

    @property
    def generator(self) -> nn.Module:
        """The decoder used for sampling: its EMA when enabled."""
        return self.dec_ema.module if self.dec_ema is not None else unwrap(self.dec)

    def sample_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> StepNoise:
        batch, latent = x.shape[0], self.cfg.model.latent_dim

        def draw(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(x.device)

        mix = torch.rand(batch, 1, 1, 1, generator=generator).to(x.device)
        augment = (augment_params(2 * batch, x.shape[2], x.shape[3], generator)
                   if self.cfg.loss.diffaugment and self.dis is not None else None)
        return StepNoise(eps=draw(batch, latent), z_prior=draw(batch, latent), mix=mix, augment=augment)

    def train_step(self, x: torch.Tensor, noise: StepNoise | None = None) -> dict[str, float]:
        """One update of all networks on batch ``x``; returns flat metrics (``loss/enc/kl``, ...)."""
        noise = noise or self.sample_noise(x)
        kl_weight = losses.kl_warmup_weight(self.step, self.cfg.loss.kl_warmup_steps, self.cfg.loss.kl_weight)
        autocast = torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                                  enabled=self.cfg.train.amp and x.device.type == "cuda")
        for module in self._networks():
            module.requires_grad_(True)
        try:
            with autocast:
                step = (self._vae_losses if self.dis is None else self._vaegan_losses)(x, noise, kl_weight)
            self._backward_each(step.backward_plan)
        finally:
            for module in self._networks():
                module.requires_grad_(False)
        update_dis, update_dec = self._balance(step.balance_bce)
        metrics = step.metrics
        metrics["kl_weight"] = torch.tensor(kl_weight)
        self.executed_steps += 1
        self.step += 1  # before the guard, so that a rollback leaves the snapshot's step in place
        metrics.update(self._guard_and_step(update_dis, update_dec))
        values = torch.stack([v.detach().float().cpu() for v in metrics.values()]).tolist()  # one copy, not one per metric
        return dict(zip(metrics, values))

    # -- losses ------------------------------------------------------------------------------

    def _run(self, module: nn.Module, inputs: torch.Tensor, sync: bool):
        """``module(inputs)``; ``sync`` marks the one forward per step that readies DDP's all-reduce."""
        with ddp_sync(module, sync):
            return module(inputs)

    def _encode(self, x: torch.Tensor, noise: StepNoise) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self._run(self.enc, x, sync=True)  # (B, D) each
        return mu, logvar, mu + noise.eps * torch.exp(0.5 * logvar)

    def _vae_losses(self, x: torch.Tensor, noise: StepNoise, kl_weight: float) -> StepLosses:
        """Plain VAE baseline: enc and dec both trained on the negative ELBO with a Bernoulli decoder."""
        mu, logvar, z = self._encode(x, noise)
        kl = losses.kl_divergence(mu, logvar, self.cfg.loss.free_bits)
        pixel = losses.pixel_nll(self._run(self.dec, z, sync=True), x)
        total = kl_weight * kl + pixel
        metrics = {"loss/enc/kl": kl, "loss/dec/pixel": pixel, "loss/vae/total": total}
        return StepLosses(metrics, [(total, [self.enc, self.dec])])

    def _vaegan_losses(self, x: torch.Tensor, noise: StepNoise, kl_weight: float) -> StepLosses:
        """Every forward of the step, each network's loss, and which network each loss trains.

        Reconstructions and prior samples go through the decoder and the discriminator as separate
        batches: the encoder's loss depends on the reconstructions alone, so its backward then walks
        B images instead of 2B (3B in the discriminator).
        """
        cfg = self.cfg.loss
        batch = x.shape[0]
        mu, logvar, z = self._encode(x, noise)
        rec_logits = self._run(self.dec, z, sync=False)  # (B, C, H, W)
        prior_logits = self._run(self.dec, noise.z_prior, sync=True)  # (B, C, H, W)
        real = x.detach().requires_grad_(cfg.r1_weight > 0)
        pair_view, prior_view = self._dis_views(noise, batch)
        rec_seen, real_seen = pair_view(torch.sigmoid(rec_logits)), pair_view(real)
        real_batch = real_seen
        if cfg.adversarial == "wgan-gp":
            interp = (noise.mix * real_seen.detach() + (1 - noise.mix) * rec_seen.detach()).requires_grad_(True)
            real_batch = torch.cat([real_seen, interp])  # (2B, C, H, W): real, then interpolates
        real_logits, real_feats = self._run(self.dis, real_batch, sync=False)  # (B or 2B,), (B or 2B, F)
        rec_dis_logits, rec_feats = self._run(self.dis, rec_seen, sync=False)  # (B,), (B, F)
        prior_dis_logits, _ = self._run(self.dis, prior_view(torch.sigmoid(prior_logits)), sync=True)  # (B,)
        fake_logits = torch.cat([rec_dis_logits, prior_dis_logits])  # (2B,): L_GAN's two fake terms
        real_logits, interp_logits = real_logits[:batch], real_logits[batch:]

        kl = losses.kl_divergence(mu, logvar, cfg.free_bits)
        feature = losses.feature_nll(rec_feats, real_feats[:batch].detach())  # the real features are a fixed target
        pixel = losses.pixel_nll(rec_logits, x)
        gan = losses.generator_loss(cfg.adversarial, fake_logits)
        real_term, fake_term = losses.discriminator_loss(cfg.adversarial, real_logits, fake_logits)
        penalty = torch.zeros((), device=x.device)
        if cfg.adversarial == "wgan-gp":
            penalty = penalty + cfg.gp_weight * losses.gradient_penalty(interp_logits, interp)
        if cfg.r1_weight > 0:
            penalty = penalty + cfg.r1_weight * losses.r1_penalty(real_logits, real)
        enc_total = losses.encoder_loss(cfg, kl, feature, pixel, kl_weight)
        dec_total = losses.decoder_loss(cfg, feature, pixel, gan)
        dis_total = real_term + fake_term + penalty
        metrics = {"loss/enc/kl": kl, "loss/enc/feature": feature, "loss/enc/pixel": pixel, "loss/enc/total": enc_total,
                   "loss/dec/feature": feature, "loss/dec/pixel": pixel, "loss/dec/gan": gan, "loss/dec/total": dec_total,
                   "loss/dis/real": real_term, "loss/dis/fake": fake_term, "loss/dis/penalty": penalty,
                   "loss/dis/total": dis_total}
        bce = torch.stack([nn.functional.softplus(-real_logits.detach().float()).mean(),
                           nn.functional.softplus(fake_logits.detach().float()).mean()])
        return StepLosses(metrics, [(enc_total, [self.enc]), (dec_total, [self.dec]), (dis_total, [self.dis])], bce)

    @staticmethod
    def _dis_views(noise: StepNoise, batch: int):
        """What the discriminator sees of a (real, reconstruction) pair and of a prior sample: the images
        themselves, or with DiffAugment the pair under one shared draw and the prior sample under its own."""
        if noise.augment is None:
            return (lambda images: images), (lambda images: images)
        pair, prior = noise.augment[:batch], noise.augment[batch:]
        return (lambda images: diff_augment(images, pair)), (lambda images: diff_augment(images, prior))

    def _backward_each(self, plan: list[tuple[torch.Tensor, list[nn.Module]]]) -> None:
        """Each loss's gradient into its own networks' parameters only; the graph is kept until the last."""
        for index, (loss, modules) in enumerate(plan):
            params = [p for module in modules for p in self._parameters[id(module)]]
            for param in params:
                param.grad = None
            self._backward(loss, params, retain_graph=index < len(plan) - 1)

    def _backward(self, loss: torch.Tensor, inputs: list[torch.Tensor], retain_graph: bool) -> None:
        loss.backward(inputs=inputs, retain_graph=retain_graph)

    # -- updates -----------------------------------------------------------------------------

    def _balance(self, bce: torch.Tensor | None) -> tuple[bool, bool]:
        """Whether to step (dis, dec), from the discriminator's BCE averaged over workers, so that every
        worker takes the same decision."""
        # The equilibrium is defined on BCE, so it only steers the "bce" objective.
        margin = self.cfg.train.balance_margin if self.cfg.loss.adversarial == "bce" else 0.0
        if bce is None or margin <= 0:
            return True, True
        real_bce, fake_bce = mean_across_workers(bce).tolist()
        return losses.balance_decision(real_bce, fake_bce, margin)

    def _guard_and_step(self, update_dis: bool, update_dec: bool) -> dict[str, torch.Tensor]:
        """Clip, let the guard skip the whole step on non-finite gradients, else step the chosen optimisers.

        Gradients are checked after DDP's all-reduce, so every worker sees the same norms
        and takes the same decision.
        """
        max_norm = self.cfg.train.grad_clip or float("inf")
        named = [("enc", self.enc, self.opt_enc), ("dec", self.dec, self.opt_dec), ("dis", self.dis, self.opt_dis)]
        norms = {f"grad_norm/{name}": nn.utils.clip_grad_norm_(unwrap(module).parameters(), max_norm)
                 for name, module, _ in named if module is not None}
        if not self.guard.allows(norms):
            for opt in self._optimizers():
                opt.zero_grad(set_to_none=True)
            self.guard.skip(self, norms)
            return {**norms, **self._counter_metrics(), **self._updated(dis=False, dec=False)}
        self.opt_enc.step()
        if update_dec:
            self.opt_dec.step()
            if self.dec_ema is not None:
                self.dec_ema.update_parameters(unwrap(self.dec))
        if self.opt_dis is not None and update_dis:
            self.opt_dis.step()
        self.counters["dec_skipped"] += int(not update_dec)
        self.counters["dis_skipped"] += int(self.dis is not None and not update_dis)
        return {**norms, **self._counter_metrics(), **self._updated(dis=update_dis, dec=update_dec)}

    def _updated(self, dis: bool, dec: bool) -> dict[str, torch.Tensor]:
        """1.0 when the network stepped, else 0.0: an epoch's mean is the fraction of its steps on which
        each player of the adversarial game learned (the balance rule or the guard may hold it back)."""
        updated = {"dec_update_fraction": torch.tensor(float(dec))}
        if self.dis is not None:
            updated["dis_update_fraction"] = torch.tensor(float(dis))
        return updated

    def _counter_metrics(self) -> dict[str, torch.Tensor]:
        return {f"guard/{k}": torch.tensor(float(v)) for k, v in self.all_counters().items()}

    def all_counters(self) -> dict[str, int]:
        return {**self.guard.counters, **self.counters}

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain tensors and numbers only, so checkpoints load with ``torch.load(weights_only=True)``."""
        state = {
            "enc": unwrap(self.enc).state_dict(),
            "dec": unwrap(self.dec).state_dict(),
            "opt_enc": self.opt_enc.state_dict(),
            "opt_dec": self.opt_dec.state_dict(),
            "step": self.step,
            "executed_steps": self.executed_steps,
            "counters": self.all_counters(),
        }
        if self.dis is not None:
            state["dis"] = unwrap(self.dis).state_dict()
            state["opt_dis"] = self.opt_dis.state_dict()
        if self.dec_ema is not None:
            state["dec_ema"] = self.dec_ema.module.state_dict()
            state["ema_updates"] = int(self.dec_ema.n_averaged)
        return state

    def load_state_dict(self, state: dict, config_learning_rates: bool = False) -> None:
        """Resume from ``state`` (a checkpoint), which becomes the rollback target. The learning rates are the
        checkpoint's (a rollback may have lowered them), or with ``config_learning_rates`` this trainer's
        config's: a PBT trial that takes over another trial's checkpoint trains on at its own perturbed rates."""
        self.restore(state)
        if config_learning_rates:
            for opt, opt_cfg in zip(self._optimizers(), (self.cfg.opt_enc, self.cfg.opt_dec, self.cfg.opt_dis)):
                for group in opt.param_groups:
                    group["lr"] = opt_cfg.lr
        self.executed_steps = int(state.get("executed_steps", state["step"]))  # checkpoints from before rollbacks
        self.counters.update({k: state["counters"][k] for k in self.counters})
        self.guard.load_counters(state["counters"])
        self.guard.mark_good(self.state_dict())

    def restore(self, state: dict, lr_factor: float = 1.0) -> None:
        """Weights, optimiser states and the step (not the counters); every learning rate times ``lr_factor``
        (the guard's rollback lowers them)."""
        lowered = [[group["lr"] * lr_factor for group in opt.param_groups] for opt in self._optimizers()]
        unwrap(self.enc).load_state_dict(state["enc"])
        unwrap(self.dec).load_state_dict(state["dec"])
        self.opt_enc.load_state_dict(state["opt_enc"])
        self.opt_dec.load_state_dict(state["opt_dec"])
        if self.dis is not None:
            unwrap(self.dis).load_state_dict(state["dis"])
            self.opt_dis.load_state_dict(state["opt_dis"])
        if self.dec_ema is not None and "dec_ema" in state:
            self.dec_ema.module.load_state_dict(state["dec_ema"])
            self.dec_ema.n_averaged.fill_(state["ema_updates"])
        self.step = int(state["step"])
        if lr_factor != 1.0:
            for opt, lrs in zip(self._optimizers(), lowered):
                for group, lr in zip(opt.param_groups, lrs):
                    group["lr"] = lr

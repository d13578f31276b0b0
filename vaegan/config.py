"""Typed configuration for the VAE-GAN library: the one home of every default.

Callers build these from plain dicts with :func:`from_dict`, which rejects unknown keys,
wrong types and out-of-range values with a message that names the key (nanoGPT's
"Unknown config key"; stylegan2-ada's ``UserError``). Across process boundaries send
``dataclasses.asdict(cfg)`` and rebuild with ``from_dict`` on the other side.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .errors import UserError

SUPPORTED_IMAGE_SIZES = (28, 32, 64, 128)
SUPPORTED_CHANNELS = (1, 3)
PRIORS = ("standard", "fitted")  # samplers of z: N(0, I), or the mixture fitted to the training latents (prior.py)


class ConfigError(UserError, ValueError):
    """A user-facing configuration mistake; the message names the key, the value and what is allowed."""


@dataclass
class ModelConfig:
    kind: Literal["vaegan", "vae"] = "vaegan"  # "vae": the plain-VAE baseline, same encoder/decoder
    image_size: int = 28
    channels: int = 1
    latent_dim: int = 32
    base_channels: int = 32  # width of the first conv; doubles per downsampling, capped at 8x
    spectral_norm: bool = True  # Miyato et al. 2018, on every discriminator layer

    def validate(self) -> None:
        _require(self.image_size in SUPPORTED_IMAGE_SIZES, "model.image_size", self.image_size,
                 f"one of {list(SUPPORTED_IMAGE_SIZES)}")
        _require(self.channels in SUPPORTED_CHANNELS, "model.channels", self.channels,
                 f"one of {list(SUPPORTED_CHANNELS)}")
        _require(self.latent_dim > 0, "model.latent_dim", self.latent_dim, "a positive integer")
        _require(self.base_channels > 0, "model.base_channels", self.base_channels, "a positive integer")


@dataclass
class LossConfig:
    gamma: float = 1.0  # Larsen's gamma: weight of the Dis_l reconstruction term in the decoder loss
    kl_weight: float = 1.0  # beta reached at the end of the warm-up
    kl_warmup_steps: int = 2000  # linear KL annealing from 0 (Bowman et al. 2016)
    free_bits: float = 0.0  # nats per latent dimension below which KL is not penalised (Kingma et al. 2016)
    feature_weight: float = 1.0  # weight of the Dis_l term in the encoder loss
    pixel_weight: float = 0.1  # optional Bernoulli pixel log-likelihood term (0 disables it)
    # hinge + the spectral-norm discriminator + DiffAugment: the discriminator learns on every step, where BCE under
    # the balance rule stopped after one epoch (benchmarks/results/balance.json, docs/challenges.md section 5)
    adversarial: Literal["bce", "hinge", "wgan-gp"] = "hinge"
    adversarial_weight: float = 1.0
    gp_weight: float = 10.0  # WGAN-GP gradient penalty (Gulrajani et al. 2017), used when adversarial == "wgan-gp"
    r1_weight: float = 0.0  # R1 penalty on real images (Mescheder et al. 2018); 0 disables it
    diffaugment: bool = True  # translation + cutout on every image the discriminator sees (Zhao et al. 2020)

    def validate(self) -> None:
        for key in ("gamma", "kl_weight", "free_bits", "feature_weight", "pixel_weight",
                    "adversarial_weight", "gp_weight", "r1_weight"):
            value = getattr(self, key)
            _require(value >= 0, f"loss.{key}", value, "a number >= 0")
        _require(self.kl_warmup_steps >= 0, "loss.kl_warmup_steps", self.kl_warmup_steps, "an integer >= 0")


@dataclass
class OptimConfig:
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 0.0

    def validate(self, name: str = "optim") -> None:
        _require(self.lr > 0, f"{name}.lr", self.lr, "a learning rate > 0")
        _require(0 <= self.beta1 < 1, f"{name}.beta1", self.beta1, "a number in [0, 1)")
        _require(0 <= self.beta2 < 1, f"{name}.beta2", self.beta2, "a number in [0, 1)")
        _require(self.weight_decay >= 0, f"{name}.weight_decay", self.weight_decay, "a number >= 0")


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64
    seed: int = 0
    grad_clip: float = 10.0  # max global grad norm per network; 0 disables clipping (the NaN guard still runs)
    ema_decay: float = 0.999  # EMA of decoder weights used for sampling; 0 disables it
    balance_margin: float = 0.35  # loss.adversarial=bce only: D/G equilibrium around ln 2 (Larsen's code); 0: off
    max_bad_steps: int = 20  # consecutive non-finite steps tolerated before a rollback (or failure)
    max_rollbacks: int = 3  # rollbacks to the last good checkpoint allowed before training fails
    rollback_lr_factor: float = 0.5  # each rollback multiplies every optimiser's learning rate by this
    amp: bool = True  # bf16 autocast, CUDA only

    def validate(self) -> None:
        _require(self.epochs > 0, "train.epochs", self.epochs, "a positive integer")
        _require(self.batch_size > 0, "train.batch_size", self.batch_size, "a positive integer")
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "a number >= 0")
        _require(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "a number in [0, 1)")
        _require(self.balance_margin >= 0, "train.balance_margin", self.balance_margin, "a number >= 0")
        _require(self.max_bad_steps > 0, "train.max_bad_steps", self.max_bad_steps, "a positive integer")
        _require(self.max_rollbacks >= 0, "train.max_rollbacks", self.max_rollbacks, "an integer >= 0")
        _require(0 < self.rollback_lr_factor < 1, "train.rollback_lr_factor", self.rollback_lr_factor,
                 "a number in (0, 1)")


@dataclass
class VAEGANConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    opt_enc: OptimConfig = field(default_factory=OptimConfig)
    opt_dec: OptimConfig = field(default_factory=OptimConfig)
    opt_dis: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.loss.validate()
        for name in ("opt_enc", "opt_dec", "opt_dis"):
            getattr(self, name).validate(name)
        self.train.validate()


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from nested ``data``, checking keys and types, then ``validate()``.

    Missing keys take the dataclass defaults; unknown keys and wrong types raise ConfigError.
    """
    obj = _build(cls, data or {}, prefix)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; allowed keys here: {', '.join(names)}")
    kwargs = {name: _coerce(hints[name], data[name], f"{prefix}{name}") for name in names if name in data}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        _require(value in allowed, key, value, f"one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        return _coerce(next(o for o in options if o is not type(None)), value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for '{key}'")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' has invalid value {value!r}; allowed: {allowed}")

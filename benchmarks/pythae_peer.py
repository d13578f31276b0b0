"""The peer: pythae's VAE-GAN (pythae 0.1.2, ``VAEGAN`` + ``CoupledOptimizerAdversarialTrainer``) on our nets.

Runs inside benchmarks/.venv-pythae, which ``common.pythae_python()`` creates on first use (pythae is
never a dependency of the product), with PYTHONPATH at the repository root:

    python benchmarks/pythae_peer.py --data runs/.../preprocess-<key> --config-json '{...}' \
        --epochs 5 --seed 0 [--images N] [--checkpoint pythae.pt] --out result.json

Our Encoder/Decoder/Discriminator (``vaegan.nets``, built from the same config and seed, so with the
same initial weights) plug into pythae's BaseEncoder/BaseDecoder/BaseDiscriminator interfaces; pythae's
own loss (its Dis_l MSE, its BCE GAN terms, its equilibrium margin) and trainer (Adam at our learning
rates and betas, our batch size and epochs) do the training. ``--out`` gets per-epoch seconds and
images/s; ``--checkpoint`` gets the final encoder/decoder in our checkpoint format
(``vaegan/checkpoint.py``), so the pipeline's evaluation and registry score and serve it like ours.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from pythae.data.datasets import BaseDataset
from pythae.models import VAEGAN
from pythae.models import VAEGANConfig as PythaeVAEGANConfig
from pythae.models.base.base_utils import ModelOutput
from pythae.models.nn import BaseDecoder, BaseDiscriminator, BaseEncoder
from pythae.trainers import (
    CoupledOptimizerAdversarialTrainer,
    CoupledOptimizerAdversarialTrainerConfig,
)
from pythae.trainers.training_callbacks import TrainingCallback

from vaegan.allocator import keep_step_memory
from vaegan.imagerows import read_split
from vaegan.checkpoint import save_checkpoint
from vaegan.config import VAEGANConfig, from_dict
from vaegan.nets import Decoder, Discriminator, Encoder, build_nets
from vaegan.step import VAEGANTrainer

PYTHAE_VERSION = importlib.metadata.version("pythae")  # the package has no __version__


class PythaeEncoder(BaseEncoder):
    def __init__(self, net: Encoder):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> ModelOutput:
        mu, logvar = self.net(x)  # (B, latent_dim) each
        return ModelOutput(embedding=mu, log_covariance=logvar)


class PythaeDecoder(BaseDecoder):
    def __init__(self, net: Decoder):
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> ModelOutput:
        return ModelOutput(reconstruction=self.net.generate(z))  # pythae's convention: images in [0, 1]


class PythaeDiscriminator(BaseDiscriminator):
    """pythae's layer 1 is our Dis_l (the last conv's features); its ``embedding`` is the probability
    of "real", which pythae's loss feeds to ``binary_cross_entropy``."""

    depth = 1

    def __init__(self, net: Discriminator):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, output_layer_levels: list[int] | None = None) -> ModelOutput:
        logits, feats = self.net(x)  # (B,), (B, F)
        return ModelOutput(embedding=torch.sigmoid(logits).unsqueeze(1), embedding_layer_1=feats)


class Trainer(CoupledOptimizerAdversarialTrainer):
    """pythae's trainer, except for its final ``save_model``: that cloudpickles the networks, and torch
    refuses to pickle our spectral-norm (parametrized) discriminator. ``export_checkpoint`` saves the
    weights in our format instead. It also records which networks each step updated: pythae runs a
    network's backward only when its equilibrium margin lets that network update."""

    updates: list[tuple[bool, bool, bool]]

    def save_model(self, model, dir_path: str) -> None:
        pass

    def _optimizers_step(self, model_output) -> None:
        self.updates.append((model_output.update_encoder, model_output.update_decoder,
                             model_output.update_discriminator))
        super()._optimizers_step(model_output)


def update_fractions(updates: list[tuple[bool, bool, bool]]) -> dict[str, float]:
    """The fraction of steps on which each network was updated (its backward run)."""
    steps = max(len(updates), 1)
    return {f"{name}_update_fraction": sum(u[i] for u in updates) / steps
            for i, name in enumerate(("enc", "dec", "dis"))}


def all_updates_step_flops(cfg: VAEGANConfig, seed: int, images: torch.Tensor) -> int:
    """FLOPs (matmuls and convolutions) of one pythae step in which all three networks update, on a fresh
    model so that the measured run is untouched: its forward and its three backward passes."""
    model = pythae_model(cfg, seed)
    batch = images[:cfg.train.batch_size]

    def step() -> None:
        out = model({"data": batch})
        out.encoder_loss.backward(retain_graph=True)
        out.decoder_loss.backward(retain_graph=True)
        out.discriminator_loss.backward()

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


class EpochTimer(TrainingCallback):
    """Seconds of each epoch, from its start to pythae's per-epoch log (training only: no eval set)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.epochs: list[dict[str, float]] = []

    def on_epoch_begin(self, training_config, **kwargs) -> None:
        self.start = time.perf_counter()

    def on_log(self, training_config, logs, **kwargs) -> None:
        self.epochs.append({"epoch_seconds": time.perf_counter() - self.start,
                            **{k: float(v) for k, v in logs.items()}})


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the preprocess step's folder (split=train inside)")
    p.add_argument("--config-json", required=True, help="the vaegan.config.VAEGANConfig as JSON")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=0, help="train on the first N images (0: the whole split)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--keep-step-memory", action="store_true",
                   help="set the process's allocator as our training loop does (vaegan/allocator.py) before training")
    p.add_argument("--checkpoint", type=Path, default=None, help="save the trained enc/dec here, our format")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def pythae_model(cfg: VAEGANConfig, seed: int) -> VAEGAN:
    torch.manual_seed(seed)  # the same initial weights as the pipeline's worker (pipelines/worker.py)
    enc, dec, dis = build_nets(cfg.model)
    shape = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    config = PythaeVAEGANConfig(input_dim=shape, latent_dim=cfg.model.latent_dim, reconstruction_layer=1)
    return VAEGAN(config, encoder=PythaeEncoder(enc), decoder=PythaeDecoder(dec), discriminator=PythaeDiscriminator(dis))


def trainer_config(cfg: VAEGANConfig, epochs: int, seed: int, output_dir: str) -> CoupledOptimizerAdversarialTrainerConfig:
    def adam(name: str) -> dict:
        opt = getattr(cfg, name)
        return {"betas": (opt.beta1, opt.beta2), "weight_decay": opt.weight_decay}

    # keep_best_on_train: without an eval set pythae only keeps (and saves) a model in this mode.
    return CoupledOptimizerAdversarialTrainerConfig(
        output_dir=output_dir, num_epochs=epochs, per_device_train_batch_size=cfg.train.batch_size, seed=seed,
        encoder_learning_rate=cfg.opt_enc.lr, decoder_learning_rate=cfg.opt_dec.lr,
        discriminator_learning_rate=cfg.opt_dis.lr, encoder_optimizer_params=adam("opt_enc"),
        decoder_optimizer_params=adam("opt_dec"), discriminator_optimizer_params=adam("opt_dis"),
        keep_best_on_train=True, no_cuda=not torch.cuda.is_available())


def export_checkpoint(model: VAEGAN, cfg: VAEGANConfig, path: Path, history: list[dict[str, float]]) -> None:
    """The final encoder/decoder in our checkpoint format; no EMA (pythae keeps none), so sampling uses
    the trained decoder itself."""
    cfg = replace(cfg, train=replace(cfg.train, ema_decay=0.0))
    trainer = VAEGANTrainer(cfg, model.encoder.net.cpu(), model.decoder.net.cpu(), model.discriminator.net.cpu())
    save_checkpoint(path, trainer, extra={"epoch": len(history), "history": json.dumps(history),
                                          "trained_by": f"pythae {PYTHAE_VERSION} VAEGAN"})


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_step_memory:
        keep_step_memory()
    cfg = from_dict(VAEGANConfig, json.loads(args.config_json))
    images, labels = read_split(args.data / "split=train", [cfg.model.channels, cfg.model.image_size,
                                                            cfg.model.image_size], limit=args.images)
    dataset = BaseDataset(torch.from_numpy(images).float() / 255.0, torch.from_numpy(labels))
    model = pythae_model(cfg, args.seed)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory(prefix="pythae-out-") as output_dir:  # pythae writes its training config there
        trainer = Trainer(model, dataset, training_config=trainer_config(
            cfg, args.epochs, args.seed, output_dir), callbacks=[timer])
        trainer.updates = []
        trainer.train()
    steps_per_epoch = len(trainer.updates) // max(len(timer.epochs), 1)
    history = [{**epoch, "images_per_s": len(dataset) / epoch["epoch_seconds"],
                **update_fractions(trainer.updates[i * steps_per_epoch:(i + 1) * steps_per_epoch])}
               for i, epoch in enumerate(timer.epochs)]
    if args.checkpoint:
        export_checkpoint(trainer.model, cfg, args.checkpoint, history)
    args.out.write_text(json.dumps({"pythae": PYTHAE_VERSION, "images": len(dataset), "epochs": history,
                                    "update_fractions": update_fractions(trainer.updates),
                                    "all_updates_step_flops": all_updates_step_flops(cfg, args.seed, dataset.data),
                                    "torch_threads": torch.get_num_threads(),
                                    "kept_step_memory": args.keep_step_memory,
                                    "checkpoint": str(args.checkpoint) if args.checkpoint else None}, indent=2))


if __name__ == "__main__":
    main()

"""Does the discriminator keep learning? The D/G balance options side by side, bare loop, one run.

Each variant trains the default job's nets (``model.base_channels=16``) with the bare ``vaegan.loop.fit``
(no Ray, no MLflow) on the first ``--train-images`` Fashion-MNIST training images, from the same seed,
then is scored on the test split in the domain feature net's space (the same code as the evaluate step):

  rule_bce          the rule of before: BCE, ``train.balance_margin=0.35`` (Larsen's released code)
  bce_ungated       BCE, the discriminator stepped every step (``train.balance_margin=0``)
  hinge             hinge loss with the spectral-norm discriminator, no gating
  bce_diffaugment   ungated BCE, the discriminator seeing DiffAugment views (``loss.diffaugment=true``)
  hinge_diffaugment hinge + DiffAugment
  (more with --variant NAME=key=value,key=value)

Per variant: ``dis_update_fraction`` and ``dec_update_fraction`` per epoch, then test FID, KID, precision,
recall, recon MSE and active units, and the train seconds. This is a screen for choosing the default (one seed,
part of the data); the quality benchmark (benchmarks/quality.py) is the measurement that counts.

Run from the repository root (no Ray; about 25 minutes on 2 cores):
    .venv/bin/python benchmarks/balance.py
    .venv/bin/python benchmarks/balance.py --quick        # 512 images, 1 epoch, smoke nets
Results: benchmarks/results/balance.json (--quick: balance_quick.json).
"""
from __future__ import annotations

import time
from typing import Any

import common
import torch

from pipelines.config import DataConfig
from vaegan.config import VAEGANConfig, from_dict
from vaegan.data import load_idx
from vaegan.evaluate import evaluate_model
from vaegan.featnet import dataset_fingerprint, load_or_train_feature_net
from vaegan.inference import GenerativeModel
from vaegan.loop import fit
from vaegan.nets import build_nets
from vaegan.step import VAEGANTrainer

VARIANTS = {
    "rule_bce": {},
    "bce_ungated": {"train.balance_margin": 0.0},
    "hinge": {"loss.adversarial": "hinge"},
    "bce_diffaugment": {"train.balance_margin": 0.0, "loss.diffaugment": True},
    "hinge_diffaugment": {"loss.adversarial": "hinge", "loss.diffaugment": True},
}
BASE = {"model.base_channels": 16, "train.balance_margin": 0.35, "loss.adversarial": "bce"}


def parse_args():
    p = common.argument_parser(__doc__)
    p.add_argument("--train-images", type=int, default=30000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=None, help="variant names to run (default: all)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE,...",
                   help="one more variant, e.g. hinge_fb=loss.adversarial=hinge,loss.free_bits=0.1")
    args = p.parse_args()
    if args.quick:
        args.train_images, args.epochs, args.eval_images = 512, 1, 128
    return args


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    import yaml

    name, _, body = text.partition("=")
    pairs = [item.split("=", 1) for item in body.split(",") if item]
    return name, {key: yaml.safe_load(value) for key, value in pairs}


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        section, key = dotted.split(".")
        tree.setdefault(section, {})[key] = value
    return tree


def run_variant(cfg: VAEGANConfig, train: torch.Tensor, test: torch.Tensor, featnet) -> dict[str, Any]:
    torch.manual_seed(cfg.train.seed)
    enc, dec, dis = build_nets(cfg.model)
    trainer = VAEGANTrainer(cfg, enc, dec, dis)
    start = time.perf_counter()
    history = fit(trainer, train, cfg.train.epochs, cfg.train.batch_size, seed=cfg.train.seed)
    seconds = time.perf_counter() - start
    model = GenerativeModel(cfg, enc, trainer.generator)
    scores = evaluate_model(model, featnet, test.float() / 255.0, iwae_k=2, iwae_images=8, seed=cfg.train.seed)
    keep = ("fid", "kid", "precision", "recall", "recon_mse", "active_units")
    return {"metrics": {k: scores[k] for k in keep}, "train_seconds": round(seconds, 1),
            "images_per_s": round(train.shape[0] * cfg.train.epochs / seconds, 1),
            **{key: [round(epoch.get(key, float("nan")), 3) for epoch in history]
               for key in ("dis_update_fraction", "dec_update_fraction", "loss/enc/kl")}}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    variants = {**VARIANTS, **dict(parse_variant(v) for v in args.variant)}
    names = args.only or list(variants)
    idx_dir = DataConfig().find_idx(download=False)
    train_all, labels = load_idx(idx_dir, "train")
    test, _ = load_idx(idx_dir, "test")
    featnet, featnet_name = load_or_train_feature_net(args.work_dir / "featnets", dataset_fingerprint(train_all, labels),
                                                      train_all, labels, 10, epochs=2)
    train, test = train_all[:args.train_images], test[:args.eval_images]
    base = {**BASE, "train.epochs": args.epochs, "train.seed": args.seed}
    if args.quick:
        base["model.base_channels"] = 8
    results = {}
    for name in names:
        overrides = {**base, **variants[name]}
        cfg = from_dict(VAEGANConfig, nested(overrides))
        print(f"[balance] {name}: {overrides}", flush=True)
        results[name] = {"overrides": variants[name], **run_variant(cfg, train, test, featnet)}
        print(f"[balance] {name}: {results[name]}", flush=True)
    common.print_table([(name, f"FID {r['metrics']['fid']:.1f}  dis_update {r['dis_update_fraction']}  "
                               f"active {r['metrics']['active_units']:.0f}  mse {r['metrics']['recon_mse']:.4f}")
                        for name, r in results.items()])
    common.write_result(common.result_path(args, "balance"), {
        "settings": {"train_images": args.train_images, "epochs": args.epochs, "eval_images": args.eval_images,
                     "seed": args.seed, "base": base, "feature_net": featnet_name},
        "variants": results})


if __name__ == "__main__":
    main()

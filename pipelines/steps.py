"""The five DAG steps. Each takes (config, run context, upstream results, output folder, cache key)
and returns a JSON-able dict of outputs; files go into the output folder, named relative to it.

The DAG (``dag.py``) decides whether a step runs at all; these functions only do the work.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import save_image

from vaegan.checkpoint import CHECKPOINT_NAME, load_checkpoint
from vaegan.config import from_dict
from vaegan.evaluate import evaluate_model
from vaegan.featnet import feature_net_path, load_feature_net, load_or_train_feature_net
from vaegan.inference import GenerativeModel

from . import preprocess as preprocess_step
from . import plots, registry, sweep, tracking
from . import train as train_step
from .config import PipelineConfig, flatten, merge


def _pre(ups: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    return Path(ups["preprocess"]["dir"]), ups["preprocess"]["outputs"]["manifest"]


def feature_net(cfg: PipelineConfig, ups: dict[str, Any]) -> tuple[Path, str]:
    return feature_net_for(cfg, *_pre(ups))


def feature_net_for(cfg: PipelineConfig, pre_dir: Path, manifest: dict[str, Any]) -> tuple[Path, str]:
    """The domain feature net for this dataset: trained on its train split once, cached by fingerprint."""
    cache = Path(cfg.data.data_dir) / "featnets"
    fingerprint = manifest["fingerprint"]
    shape = manifest["image_shape"]
    images, labels = preprocess_step.read_split(pre_dir / "split=train", shape)
    labelled = bool(manifest["classes"]) and (labels >= 0).all()
    test_images, test_labels = preprocess_step.read_split(pre_dir / "split=test", shape)
    _, name = load_or_train_feature_net(
        cache, fingerprint, torch.from_numpy(images), torch.from_numpy(labels) if labelled else None,
        num_classes=max(len(manifest["classes"]), 1), test_images=torch.from_numpy(test_images),
        test_labels=torch.from_numpy(test_labels), epochs=cfg.eval.featnet_epochs,
        log=lambda line: print(f"[featnet] {line}", flush=True))
    return feature_net_path(cache, fingerprint), name


def preprocess(cfg: PipelineConfig, ctx, ups, out: Path, key: str) -> dict[str, Any]:
    manifest = preprocess_step.run(cfg.data, cfg.model, out)
    print(f"[preprocess] {manifest['counts']} images of shape {manifest['image_shape']}, "
          f"fingerprint {manifest['fingerprint']}", flush=True)
    return {"manifest": manifest}


def tune(cfg: PipelineConfig, ctx, ups, out: Path, key: str) -> dict[str, Any]:
    if not cfg.tune.enabled:
        return {"enabled": False, "overrides": {}}
    pre_dir, manifest = _pre(ups)
    featnet_path, _ = feature_net(cfg, ups)
    return {"enabled": True, **sweep.run(cfg, ctx, pre_dir, manifest, featnet_path, out, key)}


def tuned_config(cfg: PipelineConfig, ups: dict[str, Any]) -> PipelineConfig:
    """The config with the tune step's best overrides applied."""
    overrides = ups["tune"]["outputs"]["overrides"] if "tune" in ups else {}
    return from_dict(PipelineConfig, merge(dataclasses.asdict(cfg), overrides))


def train(cfg: PipelineConfig, ctx, ups, out: Path, key: str) -> dict[str, Any]:
    cfg = tuned_config(cfg, ups)
    pre_dir, manifest = _pre(ups)
    featnet_path, _ = feature_net(cfg, ups)
    result, run_id = train_step.fit_tracked(cfg, ctx, pre_dir, manifest["image_shape"], featnet_path,
                                            name=f"train-{key}", params=flatten(dataclasses.asdict(cfg)))
    tracking.require_sent(ctx.tracking_uri, run_id, result.metrics or {}, result.path)
    state = train_step.best_checkpoint_state(result)
    torch.save(state, out / CHECKPOINT_NAME)
    history = json.loads(state["history"])
    (out / "history.json").write_text(json.dumps(history, indent=2))
    pngs = write_grids(GenerativeModel.from_checkpoint(state), pre_dir, manifest, out)
    pngs.append(plots.loss_curves(history, out / "loss_curves.png"))
    tracking.log_artifacts(ctx.tracking_uri, run_id, [*pngs, out / "history.json"])
    tracking.end_run(ctx.tracking_uri, run_id)
    return {"checkpoint": CHECKPOINT_NAME, "mlflow_run_id": run_id, "best_epoch": int(state["epoch"]),
            "epochs_run": len(history), "val_fid": history[int(state["epoch"]) - 1].get(train_step.SCORE),
            "faults": {k.removeprefix("fault/"): v for k, v in (result.metrics or {}).items() if k.startswith("fault/")},
            "config": dataclasses.asdict(cfg)}


def write_grids(model: GenerativeModel, pre_dir: Path, manifest: dict, out: Path, seed: int = 0,
                split: str = "test") -> list[Path]:
    """samples.png, reconstructions.png and interpolation.png (a latent walk between two of the split's
    images); the split's first 32 images are the fixed set that gets reconstructed."""
    images, _ = preprocess_step.read_split(pre_dir / f"split={split}", manifest["image_shape"], limit=32)
    originals = torch.from_numpy(images).float() / 255.0
    save_image(model.interpolate(originals[0], originals[1], steps=10), out / "interpolation.png", nrow=10)
    return [*train_step.save_grids(model, originals, out, seed), out / "interpolation.png"]


def score_checkpoint(cfg: PipelineConfig, state: dict, pre_dir: Path, manifest: dict, featnet_path: Path,
                     split: str = "test", seed: int | None = None) -> dict[str, float]:
    """Every core metric on ``cfg.eval.num_images`` images of ``split`` (the ELBO gap against the train split)."""
    def images_of(name: str, limit: int) -> torch.Tensor:
        images, _ = preprocess_step.read_split(pre_dir / f"split={name}", manifest["image_shape"], limit=limit)
        return torch.from_numpy(images).float() / 255.0

    return evaluate_model(GenerativeModel.from_checkpoint(state), load_feature_net(featnet_path),
                          images_of(split, cfg.eval.num_images), iwae_k=cfg.eval.iwae_k,
                          iwae_images=cfg.eval.iwae_images, seed=cfg.train.seed if seed is None else seed,
                          train_images=images_of("train", cfg.eval.iwae_images))


def evaluate(cfg: PipelineConfig, ctx, ups, out: Path, key: str) -> dict[str, Any]:
    pre_dir, manifest = _pre(ups)
    featnet_path, featnet_name = feature_net(cfg, ups)
    train_dir = Path(ups["train"]["dir"])
    trained_cfg = from_dict(PipelineConfig, ups["train"]["outputs"]["config"])
    scores = score_checkpoint(cfg, load_checkpoint(train_dir / CHECKPOINT_NAME), pre_dir, manifest, featnet_path)
    outputs: dict[str, Any] = {"metrics": scores, "feature_net": featnet_name, "num_images": cfg.eval.num_images}
    if cfg.eval.baseline_vae:
        outputs["baseline_vae"] = baseline_vae(trained_cfg, ctx, pre_dir, manifest, featnet_path, key)
    print(f"[evaluate] test metrics ({featnet_name}): "
          + " ".join(f"{k}={v:.4g}" for k, v in scores.items()), flush=True)
    (out / "metrics.json").write_text(json.dumps(outputs, indent=2))
    tracking.log_metrics(ctx.tracking_uri, ctx.parent_run_id, {f"test/{k}": v for k, v in scores.items()})
    tracking.log_artifacts(ctx.tracking_uri, ctx.parent_run_id, [out / "metrics.json"], "evaluate")
    return outputs


def baseline_vae(cfg: PipelineConfig, ctx, pre_dir: Path, manifest: dict, featnet_path: Path,
                 key: str) -> dict[str, float]:
    """The plain VAE with the same encoder/decoder, data and budget, scored the same way."""
    vae_cfg = from_dict(PipelineConfig, merge(dataclasses.asdict(cfg), {"model": {"kind": "vae"}}))
    result, run_id = train_step.fit_tracked(vae_cfg, ctx, pre_dir, manifest["image_shape"], featnet_path,
                                            name=f"baseline-vae-{key}", params=flatten(dataclasses.asdict(vae_cfg)))
    state = train_step.best_checkpoint_state(result)
    scores = score_checkpoint(cfg, state, pre_dir, manifest, featnet_path)
    tracking.log_metrics(ctx.tracking_uri, run_id, {f"test/{k}": v for k, v in scores.items()})
    tracking.end_run(ctx.tracking_uri, run_id)
    return scores


def register(cfg: PipelineConfig, ctx, ups, out: Path, key: str) -> dict[str, Any]:
    _, manifest = _pre(ups)
    train_out = ups["train"]["outputs"]
    return registry.register(cfg.register, ctx.tracking_uri, run_id=train_out["mlflow_run_id"],
                             checkpoint=Path(ups["train"]["dir"]) / train_out["checkpoint"],
                             metrics=ups["evaluate"]["outputs"]["metrics"],
                             feature_net=ups["evaluate"]["outputs"]["feature_net"],
                             fingerprint=manifest["fingerprint"], image_shape=manifest["image_shape"])

"""DAG step 4, evaluate: score the trained checkpoint on the test split; optionally the plain-VAE baseline.

Inputs:  the preprocess step's shards and feature net, the train step's checkpoint and resolved config.
Outputs: ``metrics.json``: the core metrics (domain FID, KID, precision/recall, reconstruction MSE, ELBO,
         IWAE NLL, active units, ELBO gap), the feature net's name, the image count and, with
         ``eval.baseline_vae``, the plain VAE's metrics with the same nets, data and budget.
Run it:  ``vaegan run --config pipelines/configs/smoke.yaml --steps evaluate`` (earlier steps cached)

``score_checkpoint`` is also what ``vaegan evaluate`` (``pipelines/model_eval.py``) scores a registered model with.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .. import tracking
from ..config import EvalConfig, PipelineConfig, flatten
from ..context import RunContext, StepOutputs
from . import preprocess, train


@dataclasses.dataclass
class Inputs:
    preprocess: preprocess.Outputs
    train: train.Outputs


CACHE_KEY = ("eval",)


@dataclasses.dataclass(kw_only=True)
class Outputs(StepOutputs):
    metrics: dict[str, float]
    feature_net: str
    num_images: int
    baseline_vae: dict[str, float] | None = None


def run(cfg: PipelineConfig, ctx: RunContext, inputs: Inputs, out: Path) -> Outputs:
    from vaegan.checkpoint import load_checkpoint  # here, not at the top: the driver imports this module
    data = inputs.preprocess
    featnet, featnet_name = data.feature_net(ctx.featnet_cache(cfg.data.data_dir), cfg.eval)
    state = load_checkpoint(inputs.train.checkpoint_path)
    scores = score_checkpoint(cfg.eval, state, data, featnet, seed=cfg.train.seed)
    outputs = Outputs(metrics=scores, feature_net=featnet_name, num_images=cfg.eval.num_images, folder=str(out))
    if cfg.eval.baseline_vae:
        outputs.baseline_vae = baseline_vae(inputs.train.trained_config(), ctx, data, featnet)
    print(f"[evaluate] test metrics ({featnet_name}): "
          + " ".join(f"{k}={v:.4g}" for k, v in scores.items()), flush=True)
    (out / "metrics.json").write_text(outputs.to_json())
    tracking.log_metrics(ctx.tracking_uri, ctx.parent_run_id, {f"test/{k}": v for k, v in scores.items()})
    tracking.log_artifacts(ctx.tracking_uri, ctx.parent_run_id, [out / "metrics.json"], "evaluate")
    return outputs


def score_checkpoint(cfg: EvalConfig, state: dict[str, Any], data: preprocess.Outputs, featnet: str,
                     seed: int, split: str = "test", prior: str = "standard") -> dict[str, float]:
    """Every core metric on ``cfg.num_images`` images of ``split`` (the ELBO gap against the train split),
    samples drawn from ``prior``; ``featnet`` is the feature net's path or URI."""
    from vaegan.evaluate import evaluate_model
    from vaegan.featnet import load_feature_net
    from vaegan.inference import GenerativeModel
    from .. import store
    return evaluate_model(GenerativeModel.from_checkpoint(state), load_feature_net(store.local_view(featnet)),
                          data.images(split, cfg.num_images), iwae_k=cfg.iwae_k, iwae_images=cfg.iwae_images,
                          seed=seed, train_images=data.images("train", cfg.iwae_images), prior=prior)


def baseline_vae(cfg: PipelineConfig, ctx: RunContext, data: preprocess.Outputs, featnet: str) -> dict[str, float]:
    """The plain VAE with the same encoder/decoder, data and budget, scored the same way."""
    from ..training import best_checkpoint_state, fit_tracked, with_fitted_prior
    vae_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kind="vae"))
    outcome, run_id = fit_tracked(vae_cfg, ctx, data.folder, data.image_shape, featnet,
                                  name=f"baseline-vae-{ctx.step_key}", params=flatten(dataclasses.asdict(vae_cfg)))
    state = with_fitted_prior(best_checkpoint_state(outcome.result), data.images("train"), cfg.train.seed)
    scores = score_checkpoint(cfg.eval, state, data, featnet, seed=cfg.train.seed)
    tracking.log_metrics(ctx.tracking_uri, run_id, {f"test/{k}": v for k, v in scores.items()})
    tracking.end_run(ctx.tracking_uri, run_id)
    return scores

"""DAG step 3, train (Ray Train): DDP training of the VAE-GAN over the Parquet shards.

Inputs:  the preprocess step's shards and feature net (for the per-epoch validation FID), and the tune
         step's best overrides, applied to the config; after a PBT sweep, training continues from the
         winner's model (its weights, optimisers, step and history) up to ``train.epochs``.
Outputs: ``checkpoint.pt`` (the best checkpoint by validation FID), ``history.json`` (every epoch's figures),
         ``samples.png``, ``reconstructions.png``, ``interpolation.png`` and ``loss_curves.png``, all
         logged to the step's MLflow run ``train-<key>``.
Run it:  ``vaegan run --config pipelines/configs/smoke.yaml --steps preprocess,tune,train``
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaegan.config import from_dict

from .. import shards, store, tracking
from ..config import PipelineConfig, check_batch_fits, flatten, merge
from ..context import RunContext, StepOutputs
from . import preprocess, tune

if TYPE_CHECKING:
    from vaegan.inference import GenerativeModel


@dataclasses.dataclass
class Inputs:
    preprocess: preprocess.Outputs
    tune: tune.Outputs


CACHE_KEY = ("model", "loss", "opt_enc", "opt_dec", "opt_dis", "train")


@dataclasses.dataclass(kw_only=True)
class Outputs(StepOutputs):
    checkpoint: str  # file name in the step's folder
    mlflow_run_id: str
    best_epoch: int
    epochs_run: int
    val_fid: float | None
    faults: dict[str, float]  # restarts, steps_redone, recovery_seconds
    config: dict[str, Any]  # the resolved config it trained with (tune's overrides applied)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / self.checkpoint

    def trained_config(self) -> PipelineConfig:
        return from_dict(PipelineConfig, self.config)


def run(cfg: PipelineConfig, ctx: RunContext, inputs: Inputs, out: Path) -> Outputs:
    import torch  # here, not at the top: the driver imports this module (see steps/__init__.py)
    from vaegan.checkpoint import CHECKPOINT_NAME
    from vaegan.inference import GenerativeModel

    from .. import plots
    from ..training import SCORE, best_checkpoint_state, fit_tracked, trained_history, with_fitted_prior
    cfg = from_dict(PipelineConfig, merge(dataclasses.asdict(cfg), inputs.tune.overrides))
    data = inputs.preprocess
    check_batch_fits(cfg, data.train_rows, data.train_rows_source)  # the real count; the driver's may be an estimate
    shards.check_no_empty_split(data.manifest["counts"], cfg.data, shards.MIN_SPLIT_ROWS)  # likewise
    featnet, _ = data.feature_net(ctx.featnet_cache(cfg.data.data_dir), cfg.eval)
    outcome, run_id = fit_tracked(cfg, ctx, data.folder, data.image_shape, featnet,
                                  name=f"train-{ctx.step_key}", params=flatten(dataclasses.asdict(cfg)),
                                  start_from=sweep_model(inputs.tune))
    tracking.require_sent(ctx.tracking_uri, run_id, outcome.mlflow_unsent, outcome.result.path)
    state = with_fitted_prior(best_checkpoint_state(outcome.result), data.images("train"), cfg.train.seed)
    torch.save(state, out / CHECKPOINT_NAME)
    history = trained_history(outcome.result)
    (out / "history.json").write_text(json.dumps(history, indent=2))
    pngs = write_grids(GenerativeModel.from_checkpoint(state), data, out)
    pngs.append(plots.loss_curves(history, out / "loss_curves.png"))
    tracking.log_artifacts(ctx.tracking_uri, run_id, [*pngs, out / "history.json"])
    tracking.end_run(ctx.tracking_uri, run_id)
    best_epoch = int(state["epoch"])
    return Outputs(checkpoint=CHECKPOINT_NAME, mlflow_run_id=run_id, best_epoch=best_epoch, epochs_run=len(history),
                   val_fid=history[best_epoch - 1].get(SCORE), faults=outcome.faults,
                   config=dataclasses.asdict(cfg), folder=str(out))


def sweep_model(sweep: tune.Outputs) -> Any:
    """The PBT winner's checkpoint as a ``ray.train.Checkpoint`` where every Train worker reaches it (the tune
    step's folder, a path or URI), or None after any other sweep. PBT's product is a model trained under a
    schedule, not one config, so the train step continues that model rather than replaying the schedule."""
    if not sweep.checkpoint:
        return None
    from ray.train import Checkpoint
    fs, path = store.filesystem(store.join(sweep.folder, sweep.checkpoint))
    return Checkpoint(path, filesystem=fs)


def write_grids(model: GenerativeModel, data: preprocess.Outputs, out: Path, seed: int = 0,
                split: str = "test", prior: str = "standard") -> list[Path]:
    """samples.png (from ``prior``), reconstructions.png and interpolation.png (a latent walk between two of
    the split's images); the split's first 32 images are the fixed set that gets reconstructed."""
    from torchvision.utils import save_image  # 3.5 s with the torch._dynamo it pulls in: only where it draws

    from ..worker import save_grids
    originals = data.images(split, limit=32)
    save_image(model.interpolate(originals[0], originals[1], steps=10), out / "interpolation.png", nrow=10)
    return [*save_grids(model, originals, out, seed, prior), out / "interpolation.png"]

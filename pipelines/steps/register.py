"""DAG step 5, register (MLflow Model Registry): the trained checkpoint as a pickle-free pyfunc version,
and the alias moved to it only when it beats the current holder (``pipelines/registry.py``).

Inputs:  the preprocess step's fingerprint and image shape, the train step's checkpoint and MLflow run,
         the evaluate step's test metrics.
Outputs: the model name, version and URI, and whether the alias moved (and why). Keyed by the tracking URI
         too: another registry gets its own version (in a run of its own when the train run is not there).
Run it:  ``vaegan run --config pipelines/configs/smoke.yaml`` (the last step of the DAG)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import registry, tracking
from ..config import PipelineConfig
from ..context import RunContext, StepOutputs
from . import evaluate, preprocess, train


@dataclasses.dataclass
class Inputs:
    preprocess: preprocess.Outputs
    train: train.Outputs
    evaluate: evaluate.Outputs


CACHE_KEY = ("register",)


def cache_extra(cfg: PipelineConfig, ctx: RunContext) -> dict[str, str]:
    """The registry written to: a version registered on one tracking server is no answer for another."""
    return {"tracking_uri": ctx.tracking_uri}


@dataclasses.dataclass(kw_only=True)
class Outputs(StepOutputs):
    model_name: str
    model_version: int
    alias: str
    alias_moved: bool
    alias_reason: str
    model_uri: str


def run(cfg: PipelineConfig, ctx: RunContext, inputs: Inputs, out: Path) -> Outputs:
    run_id, own_run = inputs.train.mlflow_run_id, False
    if not tracking.run_exists(ctx.tracking_uri, run_id):
        # The cached train step logged to another tracking server: the model needs a run on this one.
        run_id = tracking.start_run(ctx.tracking_uri, ctx.experiment_id, f"register-{ctx.step_key}", ctx.parent_run_id,
                                    run_dir=ctx.run_dir)
        own_run = True
    try:
        registered = registry.register(
            cfg.register, ctx.tracking_uri, run_id=run_id, checkpoint=inputs.train.checkpoint_path,
            metrics=inputs.evaluate.metrics, feature_net=inputs.evaluate.feature_net,
            fingerprint=inputs.preprocess.manifest["fingerprint"], image_shape=inputs.preprocess.image_shape)
    except BaseException:
        if own_run:
            tracking.end_run_if_reachable(ctx.tracking_uri, run_id, "FAILED")
        raise
    if own_run:
        tracking.end_run(ctx.tracking_uri, run_id)
    return Outputs(**registered, folder=str(out))

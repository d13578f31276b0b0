"""DAG step 5, register (MLflow Model Registry): the trained checkpoint as a pickle-free pyfunc version,
and the alias moved to it only when it beats the current holder (``pipelines/registry.py``).

Inputs:  the preprocess step's fingerprint and image shape, the train step's checkpoint and MLflow run,
         the evaluate step's test metrics.
Outputs: the model name, version and URI, and whether the alias moved (and why).
Run it:  ``vaegan run --config pipelines/configs/smoke.yaml`` (the last step of the DAG)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import registry
from ..config import PipelineConfig
from ..context import RunContext, StepOutputs
from . import evaluate, preprocess, train


@dataclasses.dataclass
class Inputs:
    preprocess: preprocess.Outputs
    train: train.Outputs
    evaluate: evaluate.Outputs


CACHE_KEY = ("register",)


@dataclasses.dataclass(kw_only=True)
class Outputs(StepOutputs):
    model_name: str
    model_version: int
    alias: str
    alias_moved: bool
    alias_reason: str
    model_uri: str


def run(cfg: PipelineConfig, ctx: RunContext, inputs: Inputs, out: Path) -> Outputs:
    registered = registry.register(
        cfg.register, ctx.tracking_uri, run_id=inputs.train.mlflow_run_id, checkpoint=inputs.train.checkpoint_path,
        metrics=inputs.evaluate.metrics, feature_net=inputs.evaluate.feature_net,
        fingerprint=inputs.preprocess.manifest["fingerprint"], image_shape=inputs.preprocess.image_shape)
    return Outputs(**registered, folder=str(out))

"""Step checks that need no Ray: what a step refuses from its upstream outputs before it starts any work."""
from __future__ import annotations

import dataclasses

import pytest

from pipelines.config import PipelineConfig
from pipelines.context import RunContext
from pipelines.steps import preprocess, train, tune
from vaegan.config import ConfigError


def preprocessed(tmp_path, train_rows: int) -> preprocess.Outputs:
    """A preprocess step's outputs as a Parquet source leaves them: the real count, which the driver only estimated."""
    return preprocess.Outputs(manifest={"counts": {"train": train_rows, "val": 3, "test": 3}, "image_shape": [1, 28, 28],
                                        "fingerprint": "f", "classes": []}, folder=str(tmp_path / "preprocess"))


@pytest.mark.parametrize("step", ["train", "tune"])
def test_a_batch_larger_than_a_workers_rows_is_refused_before_training(tmp_path, step):
    """Workers drop their last partial batch: with fewer rows per worker than a batch an epoch would train zero
    steps and say nothing."""
    cfg = PipelineConfig()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=16, num_workers=2),
                              tune=dataclasses.replace(cfg.tune, enabled=step == "tune", train_limit=0))
    ctx = RunContext(run_dir=str(tmp_path), tracking_uri="", experiment_id="", parent_run_id="", step_key="k")
    data = preprocessed(tmp_path, train_rows=31)
    with pytest.raises(ConfigError) as raised:
        if step == "train":
            train.run(cfg, ctx, train.Inputs(preprocess=data, tune=tune.Outputs(enabled=False, overrides={})), tmp_path)
        else:
            tune.run(cfg, ctx, tune.Inputs(preprocess=data), tmp_path)
    assert str(raised.value) == (
        "config key 'train.batch_size' has invalid value 16; allowed: at most 15 (31 training images in the "
        f"preprocessed train split {tmp_path / 'preprocess'}, shared by train.num_workers=2)")

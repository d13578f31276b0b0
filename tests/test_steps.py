"""Step checks that need no Ray: what a step refuses from its upstream outputs before it starts any work."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from PIL import Image

from pipelines import dag, model_eval
from pipelines.config import DataConfig, PipelineConfig
from pipelines.context import RunContext, StepResult
from pipelines.steps import preprocess, train, tune
from vaegan.config import ConfigError
from vaegan.data import IDX_FILES


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


def context(tmp_path, uri: str = "sqlite:///mlflow.db") -> RunContext:
    return RunContext(run_dir=str(tmp_path), tracking_uri=uri, experiment_id="1", parent_run_id="p")


def write_source(kind: str, root: Path) -> tuple[Path, Path]:
    """A small source of ``kind`` at ``root``, and the file of it the test edits."""
    rng = np.random.default_rng(0)
    if kind == "images":
        root.mkdir()
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (28, 28), np.uint8)).save(root / f"{i:03d}.png")
        return root, root / "017.png"
    if kind == "parquet":
        root.mkdir()
        for part in range(2):
            pq.write_table(pa.table({"image": [rng.integers(0, 256, 784, np.uint8).tobytes() for _ in range(20)]}),
                           root / f"part-{part}.parquet")
        return root, root / "part-1.parquet"
    root.mkdir()
    for split, n in (("train", 70), ("test", 12)):
        images, labels = IDX_FILES[split]
        (root / images).write_bytes(b"\x00\x00\x08\x03" + np.array([n, 28, 28], ">u4").tobytes()
                                    + rng.integers(0, 256, n * 784, np.uint8).tobytes())
        (root / labels).write_bytes(b"\x00\x00\x08\x01" + np.array([n], ">u4").tobytes()
                                    + rng.integers(0, 10, n, np.uint8).tobytes())
    return root, root / IDX_FILES["train"][0]


@pytest.mark.parametrize("kind", ["images", "parquet", "idx"])
def test_an_edited_source_file_changes_the_preprocess_key(tmp_path, kind):
    source, edited = write_source(kind, tmp_path / "source")
    cfg = dataclasses.replace(PipelineConfig(), data=DataConfig(source=str(source)))

    def key() -> str:
        return dag.step_key("preprocess", cfg, context(tmp_path), {})

    first = key()
    assert key() == first  # nothing changed: cached
    # One byte changed, size and mtime kept (a copy tool that preserves times): the sampled hash sees it.
    data, stat = bytearray(edited.read_bytes()), edited.stat()
    data[-1] ^= 0xFF
    edited.write_bytes(bytes(data))
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = key()
    assert second != first
    # A file touched (a new mtime) or grown: its stat changes.
    edited.write_bytes(bytes(data) + b"\x00")
    assert key() not in (first, second)


def test_the_register_key_follows_the_tracking_uri(tmp_path):
    cfg = PipelineConfig()
    upstream = {name: StepResult(name, f"{name}-key", "cached", 0.0, None) for name in ("preprocess", "train", "evaluate")}

    def key(uri: str) -> str:
        return dag.step_key("register", cfg, context(tmp_path, uri), upstream)

    assert key("http://registry-a:5000") == key("http://registry-a:5000")
    assert key("http://registry-a:5000") != key("http://registry-b:5000")
    # The other steps' keys do not depend on where MLflow is: training is not redone for another registry.
    assert dag.step_key("train", cfg, context(tmp_path, "http://registry-a:5000"), upstream) == \
        dag.step_key("train", cfg, context(tmp_path, "http://registry-b:5000"), upstream)


def test_a_rerun_after_a_source_edit_preprocesses_again(tmp_path, shared_ray):
    """End to end through the CLI (on the test process's shared Ray): the same command after one source file
    changed runs preprocess again instead of reporting the old shards as cached."""
    source, edited = write_source("images", tmp_path / "source")
    args = ("run", "--config", "pipelines/configs/smoke.yaml", "--steps", "preprocess", "--run-dir", str(tmp_path / "run"),
            "--set", f"data.source={source}", "--set", "data.limit=0", "--set", "train.batch_size=4",
            "--set", "tune.enabled=false")

    def preprocess_status() -> tuple[str, str]:
        done = run_cli(*args, env=shared_ray, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        step = json.loads((tmp_path / "run" / "summary.json").read_text())["steps"]["preprocess"]
        return step["status"], step["key"]

    status, first = preprocess_status()
    assert status == "ran"
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(edited)
    status, second = preprocess_status()
    assert status == "ran" and second != first


def test_evaluate_clears_only_the_folders_it_marked(tmp_path):
    """`vaegan evaluate`'s preprocess folder: its own (marked) is cleared for the new shards, an empty one is
    taken, a user's non-empty one is refused untouched."""
    ours = model_eval.fresh_folder(tmp_path / "ours", "--out's preprocess folder")
    (ours / "split=train").mkdir()
    (ours / "split=train" / "old.parquet").write_bytes(b"old shards")
    assert model_eval.fresh_folder(ours, "--out's preprocess folder") == ours
    assert sorted(p.name for p in ours.iterdir()) == [model_eval.OWNER_MARK]
    (tmp_path / "empty").mkdir()
    assert (model_eval.fresh_folder(tmp_path / "empty", "x") / model_eval.OWNER_MARK).is_file()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("a user's own file\n")
    with pytest.raises(ConfigError, match=r"holds files `vaegan evaluate` did not write \(notes.txt\); allowed: "):
        model_eval.fresh_folder(theirs, "--out's preprocess folder")
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]

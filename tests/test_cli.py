"""The config through the real CLI: --dry-run, typed overrides, the shipped configs. Bad values are rows of
tests/test_bad_input.py."""
import json

import pytest
from conftest import run_cli

from pipelines.config import ConfigError, load_config

SMOKE = "pipelines/configs/smoke.yaml"


def test_dry_run_prints_the_resolved_config():
    done = run_cli("run", "--config", SMOKE, "--set", "train.epochs=3", "--set", "tune.enabled=false", "--dry-run")
    assert done.returncode == 0, done.stderr
    cfg = json.loads(done.stdout)
    assert cfg["train"]["epochs"] == 3 and cfg["tune"]["enabled"] is False and cfg["name"] == "smoke"
    assert cfg["loss"]["adversarial"] == "bce"  # defaults filled in from the dataclasses


def test_overrides_are_typed_like_yaml():
    cfg = load_config(SMOKE, ["loss.gamma=2", "train.use_gpu=true", "register.alias=best"])
    assert cfg.loss.gamma == 2.0 and cfg.train.use_gpu is True and cfg.register.alias == "best"
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(SMOKE, ["train.epochs"])


def test_the_shipped_configs_are_valid():
    for name in ("smoke", "default", "cluster"):
        assert load_config(f"pipelines/configs/{name}.yaml").name == name

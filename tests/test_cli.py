"""The config through the real CLI: --dry-run, typed overrides, the shipped configs. Bad values are rows of
tests/test_bad_input.py."""
import json

import pytest
from conftest import free_port, run_cli

from pipelines.config import ConfigError, load_config

SMOKE = "pipelines/configs/smoke.yaml"


def test_dry_run_prints_the_resolved_config():
    done = run_cli("run", "--config", SMOKE, "--set", "train.epochs=3", "--set", "tune.enabled=false", "--dry-run")
    assert done.returncode == 0, done.stderr
    cfg = json.loads(done.stdout)
    assert cfg["train"]["epochs"] == 3 and cfg["tune"]["enabled"] is False and cfg["name"] == "smoke"
    assert cfg["loss"]["adversarial"] == "hinge"  # defaults filled in from the dataclasses


def test_overrides_are_typed_like_yaml():
    cfg = load_config(SMOKE, ["loss.gamma=2", "train.use_gpu=true", "register.alias=best"])
    assert cfg.loss.gamma == 2.0 and cfg.train.use_gpu is True and cfg.register.alias == "best"
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(SMOKE, ["train.epochs"])


def test_the_shipped_configs_are_valid():
    for name in ("smoke", "default", "cluster"):
        assert load_config(f"pipelines/configs/{name}.yaml").name == name


@pytest.mark.parametrize("verb, out", [("sample", "x.png"), ("evaluate", "evaluation")], ids=["sample", "evaluate"])
def test_a_dead_tracking_server_is_one_line_within_seconds(tmp_path, verb, out):
    """The pull verbs and `vaegan evaluate` bound MLflow's client retries as the pipeline does; unbounded,
    a closed port keeps them waiting about 4 minutes. timeout=15 is the hang guard."""
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    done = run_cli(verb, "--model", "models:/x@champion", "--out", str(tmp_path / out), env=env, timeout=15)
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "models:/x@champion" in errors[0], errors

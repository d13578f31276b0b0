"""Config validation through the real CLI: one clear line, exit code 2, no traceback."""
import json

import pytest
from conftest import run_cli

from pipelines.config import ConfigError, load_config

SMOKE = "pipelines/configs/smoke.yaml"


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key 'train.epoch'"),
    ("train.epochs=zero", "'train.epochs' must be an integer, got 'zero'"),
    ("opt_enc.lr=-0.001", "'opt_enc.lr' has invalid value -0.001; allowed: a learning rate > 0"),
    ("model.image_size=48", "'model.image_size' has invalid value 48"),
    ("model.kind=gan", "'model.kind' has invalid value 'gan'"),
    ("tune.grace_period=5", "'tune.grace_period' has invalid value 5; allowed: an integer in [1, tune.max_epochs=1]"),
    ("data.val_fraction=0.7", "'data.val_fraction' has invalid value 0.7"),
    ("data.source=/nonexistent/images", "data.source' points to '/nonexistent/images', which does not exist"),
    ("train.cpus_per_worker=0", "'train.cpus_per_worker' has invalid value 0; allowed: a positive integer"),
])
def test_bad_config_is_one_clear_line(override, message):
    done = run_cli("run", "--config", SMOKE, "--set", override, "--dry-run")
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_more_workers_than_the_local_ray_has_fails_before_any_work(tmp_path):
    """A local Ray cannot grow, so Train would wait forever: a clear error before preprocess starts."""
    done = run_cli("run", "--config", SMOKE, "--run-dir", str(tmp_path), "--set", "train.num_workers=8",
                   "--set", "register.experiment=cli-test")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "'train.num_workers' x 'train.cpus_per_worker' = 8 x 1 = 8 CPUs" in done.stderr
    assert not list(tmp_path.glob("preprocess-*")), "nothing may run before the check"


def test_missing_config_file_names_it():
    done = run_cli("run", "--config", "pipelines/configs/nope.yaml", "--dry-run")
    assert done.returncode == 2 and "nope.yaml does not exist" in done.stderr and "smoke.yaml" in done.stderr


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

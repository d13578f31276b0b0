"""Config dicts are rebuilt into dataclasses with errors that name the key, the value and what is allowed."""
import dataclasses

import pytest
import yaml

from pipelines.config import CONFIG_DIR, PipelineConfig, flatten, load_config
from vaegan.config import ConfigError, VAEGANConfig, from_dict


def test_round_trip_through_a_plain_dict():
    cfg = from_dict(VAEGANConfig, {"model": {"latent_dim": 8}, "opt_dis": {"lr": 1e-3}})
    assert cfg.model.latent_dim == 8 and cfg.opt_dis.lr == 1e-3
    assert from_dict(VAEGANConfig, dataclasses.asdict(cfg)) == cfg


def test_ints_are_accepted_for_floats():
    assert from_dict(VAEGANConfig, {"loss": {"gamma": 2}}).loss.gamma == 2.0


@pytest.mark.parametrize("data, message", [
    ({"model": {"latent_dims": 8}}, "unknown config key 'model.latent_dims'"),
    ({"modle": {}}, "unknown config key 'modle'"),
    ({"train": {"epochs": "ten"}}, "'train.epochs' must be an integer, got 'ten'"),
    ({"train": {"amp": 1}}, "'train.amp' must be true or false"),
    ({"opt_enc": {"lr": -1e-3}}, "'opt_enc.lr' has invalid value -0.001; allowed: a learning rate > 0"),
    ({"opt_dec": {"lr": 0}}, "'opt_dec.lr' has invalid value 0.0"),
    ({"model": {"image_size": 48}}, r"'model.image_size' has invalid value 48; allowed: one of \[28, 32, 64, 128\]"),
    ({"model": {"channels": 4}}, "'model.channels' has invalid value 4"),
    ({"model": {"kind": "gan"}}, r"'model.kind' has invalid value 'gan'; allowed: one of \['vaegan', 'vae'\]"),
    ({"loss": {"adversarial": "lsgan"}}, "'loss.adversarial' has invalid value 'lsgan'"),
    ({"model": 3}, "model: expected a mapping"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(VAEGANConfig, data)


def test_shipped_configs_hold_only_what_differs_from_the_defaults():
    """One source of truth: a YAML value equal to its default would be a second home for that default."""
    defaults = flatten(dataclasses.asdict(PipelineConfig()))
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        restated = [k for k, v in flatten(yaml.safe_load(path.read_text())).items() if defaults.get(k) == v]
        assert not restated, f"{path.name} restates defaults: {restated}"


def test_yaml_numbers_as_users_write_them(tmp_path):
    """`lr: 1e-3` is a number (PyYAML follows YAML 1.1, which reads it as the string '1e-3'), in a config file
    and in --set alike; quoted, it stays a string and is refused."""
    config = tmp_path / "lr.yaml"
    config.write_text("opt_enc:\n  lr: 1e-3\nopt_dec:\n  lr: 2E-4\nloss:\n  gamma: 1.5e+1\n")
    cfg = load_config(config, ["opt_dis.lr=5e-4", "loss.kl_weight=1e0"])
    assert (cfg.opt_enc.lr, cfg.opt_dec.lr, cfg.opt_dis.lr) == (1e-3, 2e-4, 5e-4)
    assert (cfg.loss.gamma, cfg.loss.kl_weight) == (15.0, 1.0)
    assert load_config(config, ["register.alias=e5"]).register.alias == "e5"  # not a number: no digits before e
    with pytest.raises(ConfigError, match="'opt_enc.lr' must be a number, got '1e-3'"):
        load_config(config, ["opt_enc.lr='1e-3'"])


@pytest.mark.parametrize("key, value", [("alias", "latest"), ("alias", "Latest"), ("alias", "v1"), ("alias", "V23"),
                                        ("alias", "best model"), ("alias", "a.b"), ("alias", "x" * 256),
                                        ("model_name", "a/b"), ("model_name", "a:b"), ("model_name", ".."),
                                        ("model_name", "./a"), ("alias", "champion"), ("alias", "v1-rc"),
                                        ("model_name", "vaegan fashion.v2")])
def test_register_names_follow_mlflows_rules(key, value):
    """The register section refuses exactly what MLflow's registry would refuse after training."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    def mlflow_refuses() -> bool:
        try:
            if key == "alias":
                validation._validate_model_alias_name(value)
                validation._validate_model_alias_name_reserved(value)
            else:
                validation._validate_model_name(value)
        except MlflowException:
            return True
        return False

    try:
        from_dict(PipelineConfig, {"register": {key: value}})
        refused = False
    except ConfigError as err:
        assert f"register.{key}" in str(err)
        refused = True
    assert refused == mlflow_refuses()


@pytest.mark.parametrize("data, message", [
    ({"data": {"download_timeout_s": 0}}, "'data.download_timeout_s' has invalid value 0.0; allowed: seconds > 0"),
    ({"data": {"download": "maybe"}}, "'data.download' must be true or false"),
    ({"train": {"wait_for_autoscaler": 1}}, "'train.wait_for_autoscaler' must be true or false"),
])
def test_bad_pipeline_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(PipelineConfig, data)

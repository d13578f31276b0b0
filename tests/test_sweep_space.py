"""The sweep searches only what the user left open: a key given in the YAML file or with --set keeps its value
unless tune.search_keys lists it (no Ray started here; the smoke DAG in test_pipeline.py checks it end to end)."""
import pytest

from pipelines.config import CONFIG_DIR, load_config
from pipelines.steps import tune as tune_step
from tune.space import left_as_given, search_space, searchable_keys
from vaegan.config import ConfigError

SMOKE = CONFIG_DIR / "smoke.yaml"


def test_keys_given_in_the_yaml_or_with_set_are_recorded():
    cfg = load_config(SMOKE, ["loss.gamma=2", "opt_dis.lr=2e-4"])
    assert {"loss.gamma", "opt_dis.lr", "data.limit", "model.latent_dim"} <= set(cfg.given_keys)
    assert "loss.kl_weight" not in cfg.given_keys and "name" not in cfg.given_keys


def test_a_given_key_is_left_out_of_the_search_unless_listed():
    cfg = load_config(SMOKE, ["loss.gamma=2"])
    kept = left_as_given(cfg.model.kind, cfg.given_keys, cfg.tune.search_keys)
    assert kept == ["loss.gamma"]
    space = search_space(cfg.model.kind, leave=tuple(kept))
    assert "gamma" not in space["loss"] and "kl_weight" in space["loss"] and "lr" in space["opt_dis"]
    listed = load_config(SMOKE, ["loss.gamma=2", "tune.search_keys=[loss.gamma]"])
    assert left_as_given(listed.model.kind, listed.given_keys, listed.tune.search_keys) == []


def test_a_fully_given_section_drops_out_of_the_space():
    space = search_space("vaegan", leave=("opt_dis.lr",))
    assert "opt_dis" not in space and set(searchable_keys("vaegan")) > {"opt_dis.lr", "loss.gamma"}


def test_the_searched_keys_are_part_of_the_tune_key():
    """A key given at its default value changes no config section, but it changes what the sweep searches."""
    open_cfg, given_cfg = load_config(SMOKE), load_config(SMOKE, ["loss.gamma=1.0"])
    assert open_cfg.loss == given_cfg.loss
    assert tune_step.cache_extra(open_cfg, None) != tune_step.cache_extra(given_cfg, None)


@pytest.mark.parametrize("keys, bad", [("[loss.gama]", "loss.gama"), ("[model.latent_dim]", "model.latent_dim")])
def test_search_keys_outside_the_space_are_refused(keys, bad):
    cfg = load_config(SMOKE, [f"tune.search_keys={keys}"])
    with pytest.raises(ConfigError, match=f"'tune.search_keys' has invalid value '{bad}'; allowed: keys the vaegan "
                                          "sweep searches \\(loss.kl_weight, "):
        tune_step.check(cfg)

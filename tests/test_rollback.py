"""Injected non-finite losses: short bursts are skipped, persistent ones roll back with a lower LR, then fail."""
import copy

import pytest
import torch

from hooks.nonfinite import poison
from test_step import make_trainer, tiny_config
from vaegan.checkpoint import load_checkpoint, save_checkpoint
from vaegan.config import ConfigError, VAEGANConfig, from_dict
from vaegan.guard import NonFiniteLossError

BASE_LR = 2e-4
NETWORKS = ("enc", "dec", "dis")


def injecting_trainer(start: int, steps: int, max_bad_steps: int = 3, max_rollbacks: int = 3):
    cfg = tiny_config()
    cfg.train.ema_decay = 0.9  # so that the decoder EMA takes part in the rollback too
    cfg.train.max_bad_steps, cfg.train.max_rollbacks = max_bad_steps, max_rollbacks
    trainer = make_trainer(cfg)
    poison(trainer, start, steps)
    return trainer


def run(trainer, steps: int) -> list[dict[str, float]]:
    gen = torch.Generator().manual_seed(trainer.executed_steps)
    return [trainer.train_step(torch.rand(4, 1, 28, 28, generator=gen)) for _ in range(steps)]


def weights(trainer) -> dict:
    state = trainer.state_dict()
    return copy.deepcopy({name: state[name] for name in (*NETWORKS, "dec_ema")})


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def learning_rates(trainer) -> list[float]:
    return [group["lr"] for opt in trainer._optimizers() for group in opt.param_groups]


def test_a_short_burst_is_skipped_counted_and_training_goes_on():
    trainer = injecting_trainer(start=1, steps=2)
    run(trainer, 1)
    before = weights(trainer)
    skipped = run(trainer, 2)
    assert [m["guard/nonfinite_skipped"] for m in skipped] == [1, 2]
    assert all(m["guard/rollbacks"] == 0 for m in skipped)
    assert_same(weights(trainer), before)
    good = run(trainer, 1)[0]
    assert trainer.guard.bad_steps == 0 and trainer.step == 4 and trainer.all_counters()["rollbacks"] == 0
    assert all(torch.isfinite(torch.tensor(v)) for v in good.values())
    assert any(not torch.equal(before["dec"][k], v) for k, v in trainer.state_dict()["dec"].items())


def test_a_long_burst_rolls_back_once_with_a_lower_lr_and_training_recovers():
    trainer = injecting_trainer(start=3, steps=3)
    run(trainer, 3)
    trainer.guard.mark_good(trainer.state_dict())  # what the training loop does when it writes a checkpoint
    good = copy.deepcopy(trainer.state_dict())
    metrics = run(trainer, 3)  # the third consecutive bad step rolls back
    assert metrics[-1]["guard/rollbacks"] == 1 and metrics[-1]["guard/nonfinite_skipped"] == 3
    assert trainer.step == good["step"] == 3 and trainer.executed_steps == 6
    assert_same(weights(trainer), {name: good[name] for name in (*NETWORKS, "dec_ema")})
    assert learning_rates(trainer) == pytest.approx([BASE_LR * 0.5] * 3)
    after = run(trainer, 3)  # the injection window lies behind the executed-step count now
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in after)
    assert trainer.step == 6 and trainer.all_counters()["nonfinite_skipped"] == 3 and trainer.all_counters()["rollbacks"] == 1

    # A second burst after real updates: the snapshot was not disturbed by them, and the LR drops again.
    poison(trainer, trainer.executed_steps, 3)
    run(trainer, 3)
    assert trainer.all_counters()["rollbacks"] == 2 and trainer.step == 3
    state = trainer.state_dict()
    for name in ("opt_enc", "opt_dec", "opt_dis"):
        assert_same(state[name]["state"], good[name]["state"])
    assert learning_rates(trainer) == pytest.approx([BASE_LR * 0.25] * 3)


def test_persistent_divergence_fails_after_max_rollbacks():
    trainer = injecting_trainer(start=0, steps=10**9, max_bad_steps=2, max_rollbacks=2)
    with pytest.raises(NonFiniteLossError, match=r"after 2 rollbacks.*train\.max_rollbacks=2") as err:
        run(trainer, 100)
    assert "train.max_bad_steps=2" in str(err.value)
    assert trainer.all_counters()["rollbacks"] == 2 and trainer.executed_steps == 2 * 3
    assert learning_rates(trainer) == pytest.approx([BASE_LR * 0.25] * 3)


def test_the_state_after_a_rollback_survives_a_weights_only_checkpoint(tmp_path):
    trainer = injecting_trainer(start=0, steps=3)
    run(trainer, 4)
    path = save_checkpoint(tmp_path / "ckpt.pt", trainer)
    state = torch.load(path, weights_only=True)
    assert state["counters"]["rollbacks"] == 1 and state["counters"]["nonfinite_skipped"] == 3
    assert state["executed_steps"] == 4 and state["step"] == 1
    resumed = make_trainer(trainer.cfg, seed=5)
    resumed.load_state_dict(load_checkpoint(path))
    assert learning_rates(resumed) == pytest.approx([BASE_LR * 0.5] * 3)
    assert resumed.all_counters() == trainer.all_counters() and resumed.executed_steps == 4
    # The resumed state is the new rollback target, lowered LR included.
    assert resumed.guard.good_state["opt_dec"]["param_groups"][0]["lr"] == pytest.approx(BASE_LR * 0.5)


@pytest.mark.parametrize("train, message", [
    ({"max_rollbacks": -1}, "'train.max_rollbacks' has invalid value -1; allowed: an integer >= 0"),
    ({"rollback_lr_factor": 1}, r"'train.rollback_lr_factor' has invalid value 1.0; allowed: a number in \(0, 1\)"),
    ({"rollback_lr_factor": 0}, "'train.rollback_lr_factor' has invalid value 0.0"),
    ({"max_rollbacks": 1.5}, "'train.max_rollbacks' must be an integer"),
])
def test_bad_rollback_settings_name_the_key(train, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(VAEGANConfig, {"train": train})


def test_rollback_settings_are_read_from_a_dict():
    train = from_dict(VAEGANConfig, {"train": {"max_rollbacks": 0, "rollback_lr_factor": 0.1}}).train
    assert (train.max_rollbacks, train.rollback_lr_factor) == (0, 0.1)


def test_a_checkpoint_from_before_the_injection_keys_were_retired_still_loads(tmp_path):
    """Models registered before NaN injection left the product config carry its two keys: they still load."""
    from vaegan.checkpoint import config_of
    trainer = make_trainer(tiny_config())
    path = save_checkpoint(tmp_path / "old.pt", trainer)
    state = load_checkpoint(path)
    state["config"]["train"].update(inject_nonfinite_from=-1, inject_nonfinite_steps=0)
    assert config_of(state) == trainer.cfg


def test_a_checkpoint_taken_over_by_another_config_trains_on_at_that_configs_learning_rates():
    """PBT: a trial that takes over a donor's checkpoint keeps its weights, optimiser moments and step, at the
    learning rates of its own (perturbed) config; a plain resume keeps the checkpoint's (lowered ones too)."""
    donor = make_trainer(tiny_config())
    run(donor, 2)
    state = donor.state_dict()
    perturbed = tiny_config()
    perturbed.opt_enc.lr, perturbed.opt_dec.lr, perturbed.opt_dis.lr = 1e-3, 2e-3, 3e-3
    taker = make_trainer(perturbed)
    taker.load_state_dict(copy.deepcopy(state), config_learning_rates=True)
    assert learning_rates(taker) == [1e-3, 2e-3, 3e-3] and taker.step == donor.step == 2
    for name in NETWORKS:  # tiny_config has no decoder EMA
        assert_same(taker.state_dict()[name], state[name])
    assert_same(taker.opt_dec.state_dict()["state"], donor.opt_dec.state_dict()["state"])
    resumed = make_trainer(perturbed)
    resumed.load_state_dict(copy.deepcopy(state))
    assert learning_rates(resumed) == learning_rates(donor)

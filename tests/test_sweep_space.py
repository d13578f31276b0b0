"""The sweep searches only what the user left open: a key given in the YAML file or with --set keeps its value
unless tune.search_keys lists it (no Ray started here; the smoke DAG in test_pipeline.py checks it end to end)."""
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from pipelines.config import CONFIG_DIR, load_config
from pipelines.steps import tune as tune_step
from tune.halving import SuccessiveHalving, milestones
from tune.objectives import pareto_front, pick
from tune.search import mutations
from tune.space import grid_points, left_as_given, search_space, searchable_keys
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


@pytest.mark.parametrize("overrides, resources, streamed, expected", [
    ([], {"CPU": 2}, False, 2),  # a held split: two 1-CPU trials side by side on 2 cores
    ([], {"CPU": 2}, True, 1),  # streamed: one CPU stays free for Ray Data's read tasks
    (["train.cpus_per_worker=2"], {"CPU": 2}, False, 1),
    (["train.num_workers=2"], {"CPU": 8}, True, 3),
    (["tune.max_concurrent=1"], {"CPU": 16}, False, 1),  # the user's cap
    (["train.num_workers=4"], {"CPU": 2}, False, 1),  # never 0: the run's check_fits refuses what cannot fit
    (["train.use_gpu=true", "train.num_workers=2"], {"CPU": 2, "GPU": 4}, False, 2),
])
def test_trials_at_once_fit_the_cluster(overrides, resources, streamed, expected):
    from tune.sweep import max_concurrent_trials
    assert max_concurrent_trials(load_config(SMOKE, overrides), resources, streamed) == expected


def test_a_pbt_population_larger_than_fits_is_warned_about_with_the_keys_that_fix_it():
    from tune.sweep import waves_warning
    warning = waves_warning(6, 2)
    assert "tune.num_samples=6" in warning and "waves of 2" in warning and "at most 2" in warning


def test_trials_train_with_their_own_epochs_and_cpus():
    from tune.sweep import trial_train_keys
    assert trial_train_keys(load_config(SMOKE, ["tune.max_epochs=3"])) == {"epochs": 3}  # train.cpus_per_worker's
    assert trial_train_keys(load_config(SMOKE, ["tune.cpus_per_worker=1", "train.cpus_per_worker=2"])) == {
        "epochs": 1, "cpus_per_worker": 1}


ROWS = [{"trial": "a", "val/fid": 10.0, "val/recon_mse": 0.05, "val/precision": 0.6},
        {"trial": "b", "val/fid": 12.0, "val/recon_mse": 0.03, "val/precision": 0.7},
        {"trial": "c", "val/fid": 11.0, "val/recon_mse": 0.06, "val/precision": 0.5},  # a is better on both
        {"trial": "d", "val/fid": 9.0, "val/recon_mse": 0.09, "val/precision": 0.4},
        {"trial": "e", "val/fid": float("nan"), "val/recon_mse": 0.01, "val/precision": 0.9}]  # no score: out


def test_the_pareto_front_keeps_exactly_the_non_dominated_trials():
    assert [r["trial"] for r in pareto_front(ROWS, ["val/fid", "val/recon_mse"])] == ["a", "b", "d"]
    # precision is higher-is-better: b (0.7) now dominates a on it but not on fid, so all three stay
    assert [r["trial"] for r in pareto_front(ROWS, ["val/fid", "val/precision"])] == ["a", "b", "d"]
    assert [r["trial"] for r in pareto_front(ROWS, ["val/recon_mse", "val/precision"])] == ["e"]  # fid unasked


@pytest.mark.parametrize(("tolerance", "winner"), [(1.25, "b"), (2.0, "a"), (3.5, "d")])
def test_the_winner_is_the_best_fid_whose_recon_mse_is_within_the_tolerance_of_the_best(tolerance, winner):
    """The front's best recon MSE is b's 0.03: within 1.25x only b qualifies, within 2x a too, within 3.5x d."""
    assert pick(ROWS, ["val/fid", "val/recon_mse"], tolerance)["trial"] == winner


def test_one_objective_picks_the_best_and_no_score_picks_nothing():
    assert pick(ROWS, ["val/fid"], 1.25)["trial"] == "d"
    assert pick(ROWS, ["val/precision"], 1.25)["trial"] == "e"  # e has no fid, but precision is all this asks
    assert pick([{"trial": "x", "val/fid": float("nan")}], ["val/fid"], 1.25) is None


def test_pbt_moves_a_choice_between_its_categories_and_scales_or_resamples_a_range():
    space = search_space("vaegan")
    moves = mutations(space)
    assert moves["loss"]["r1_weight"] == [0.0, 1.0, 10.0]
    assert moves["opt_dec"]["lr"] is space["opt_dec"]["lr"]


def test_a_grid_holds_every_combination_once_in_an_order_its_seed_fixes():
    grid = grid_points("vaegan", ("loss.gamma", "opt_dec.lr"), points=3, seed=0)
    combinations = [(point["loss"]["gamma"], point["opt_dec"]["lr"]) for point in grid]
    assert len(set(combinations)) == len(combinations) == 9
    assert grid == grid_points("vaegan", ("loss.gamma", "opt_dec.lr"), points=3, seed=0)
    other = grid_points("vaegan", ("loss.gamma", "opt_dec.lr"), points=3, seed=1)
    assert other != grid and sorted(map(str, other)) == sorted(map(str, grid))
    assert combinations != sorted(combinations)  # not the product order, whose best decoder rates come last


class FakeTrial:
    """What the scheduler reads of a Tune trial: its status."""

    def __init__(self):
        self.status = Trial.PENDING


class FakeController:
    """What the scheduler asks of Tune: to stop a trial (Tune then tells the scheduler it left)."""

    def __init__(self, scheduler):
        self.scheduler, self.stopped = scheduler, []

    def stop_trial(self, trial):
        self.stopped.append(trial)
        trial.status = Trial.TERMINATED
        self.scheduler.on_trial_remove(self, trial)


def test_successive_halving_waits_for_every_trial_at_a_rung_then_resumes_the_best_half_as_slots_free():
    sha = SuccessiveHalving(metric="val/fid", mode="min", time_attr="epoch", max_t=4, grace_period=1,
                            reduction_factor=2, slots=2)
    assert milestones(8, 1, 2) == [1, 2, 4, 8] and milestones(4, 1, 3) == [1, 3, 4] and milestones(2, 2, 2) == [2]
    created = []
    sha.search_finished = lambda: len(created) == 3
    tune = FakeController(sha)

    def start(trial):
        created.append(trial)
        sha.on_trial_add(tune, trial)
        trial.status = Trial.RUNNING

    def report(trial, epoch, fid):
        action = sha.on_trial_result(tune, trial, {"epoch": epoch, "val/fid": fid})
        if action == TrialScheduler.PAUSE:
            trial.status = Trial.PAUSED
        return action

    first, second, third = FakeTrial(), FakeTrial(), FakeTrial()
    start(first), start(second)
    assert sha.free_slots() == 0  # the search creates no third trial yet
    assert report(first, 1, 5.0) == TrialScheduler.PAUSE and sha.free_slots() == 1  # a paused trial holds none
    start(third)
    assert report(second, 1, 3.0) == report(third, 1, 4.0) == TrialScheduler.PAUSE
    # Every trial reached epoch 1: the best ceil(3 / 2) = 2 go on, best first, and the worst stops.
    assert sha.choose_trial_to_run(tune) is second
    second.status = Trial.PENDING  # what Tune does with the trial it is handed
    assert tune.stopped == [first]
    assert sha.choose_trial_to_run(tune) is third
    third.status = Trial.RUNNING
    assert sha.choose_trial_to_run(tune) is None  # both slots taken
    second.status = Trial.RUNNING
    assert report(second, 2, 2.0) == TrialScheduler.PAUSE and report(third, 2, 1.0) == TrialScheduler.PAUSE
    assert sha.choose_trial_to_run(tune) is third and tune.stopped == [first, second]
    third.status = Trial.RUNNING
    assert report(third, 3, 0.9) == TrialScheduler.CONTINUE  # the last rung is max_t: no pause before it
    assert report(third, 4, 0.8) == TrialScheduler.STOP

"""The hyperparameter search space: loss weights and the three learning rates.

Returns override dicts nested like ``PipelineConfig`` (``{"loss": {"gamma": ...}, "opt_enc": {"lr": ...}}``)
and nothing else; the pipeline's tune step merges a trial's overrides into the config.
Log-uniform ranges are centred on the library defaults, so the default config is a typical draw.
"""
from __future__ import annotations

import itertools
import math
import random
from typing import Any

from ray import tune
from ray.tune.search.sample import Categorical, Domain

# The parameters a grid sweeps by default: those that most move the validation FID in short runs.
GRID_KEYS = {"vaegan": ("loss.gamma", "opt_dec.lr", "opt_dis.lr"), "vae": ("loss.kl_weight", "opt_enc.lr", "opt_dec.lr")}


def search_space(kind: str = "vaegan", leave: tuple[str, ...] = ()) -> dict[str, Any]:
    """Ray Tune search space for a model ``kind`` ("vaegan" or the plain "vae"), without the keys in
    ``leave`` ("section.name"): those keep their config values."""
    space: dict[str, Any] = {
        "loss": {"kl_weight": tune.loguniform(0.5, 2.0)},
        "opt_enc": {"lr": tune.loguniform(1e-4, 1e-3)},
        "opt_dec": {"lr": tune.loguniform(1e-4, 1e-3)},
    }
    if kind == "vaegan":
        space["loss"].update({
            "gamma": tune.loguniform(0.3, 3.0),  # Dis_l weight in the decoder loss (Larsen's gamma)
            "adversarial_weight": tune.loguniform(0.3, 3.0),
            "r1_weight": tune.choice([0.0, 1.0, 10.0]),  # penalty weight
        })
        space["opt_dis"] = {"lr": tune.loguniform(5e-5, 5e-4)}
    for key in leave:
        section, name = key.split(".")
        space[section].pop(name, None)
    return {section: values for section, values in space.items() if values}


def searchable_keys(kind: str = "vaegan") -> list[str]:
    """Every key ``search_space(kind)`` searches, in the --set form ("loss.gamma")."""
    return [f"{section}.{name}" for section, values in search_space(kind).items() for name in values]


def left_as_given(kind: str, given_keys: list[str], search_keys: list[str]) -> list[str]:
    """The searchable keys a user gave (YAML or --set) and did not list in ``tune.search_keys``: the sweep
    must not replace a value the user chose."""
    return [key for key in searchable_keys(kind) if key in given_keys and key not in search_keys]



def grid_points(kind: str = "vaegan", keys: tuple[str, ...] | None = None, points: int = 2,
                seed: int = 0) -> list[dict[str, Any]]:
    """Every point of a grid over ``keys`` ("section.name", default ``GRID_KEYS[kind]``) of
    ``search_space(kind)``, as nested override dicts in an order shuffled by ``seed``: the sweep's
    ``points`` (one trial each, over ``search_space(kind, leave=<the other keys>)``).

    Each log-uniform range contributes ``points`` values, the log-centres of equal log-width bins, so
    the grid covers the same ranges as the random space; a choice contributes its categories.
    Shuffled, because ASHA judges a trial only against the trials that reached its rung before it: in
    product order a grid brings the best values of its slowest key last, and each of those beats
    everything before it at every rung (measured: docs/benchmarks.md, section 4). Random draws arrive in
    random order, and so does this grid.
    """
    space = search_space(kind)
    keys = keys or GRID_KEYS[kind]
    values = [_grid_points(space[section][name], points) for section, name in (key.split(".") for key in keys)]
    grid = []
    for combination in itertools.product(*values):
        point: dict[str, Any] = {}
        for key, value in zip(keys, combination):
            section, name = key.split(".")
            point.setdefault(section, {})[name] = value
        grid.append(point)
    random.Random(seed).shuffle(grid)
    return grid


def _grid_points(domain: Domain, points: int) -> list[float]:
    if isinstance(domain, Categorical):
        return list(domain.categories)
    low, high = math.log(domain.lower), math.log(domain.upper)
    return [float(f"{math.exp(low + (i + 0.5) * (high - low) / points):.3g}") for i in range(points)]

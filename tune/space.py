"""The hyperparameter search space: loss weights and the three learning rates.

Returns override dicts nested like ``PipelineConfig`` (``{"loss": {"gamma": ...}, "opt_enc": {"lr": ...}}``)
and nothing else; the pipeline's tune step merges a trial's overrides into the config.
Log-uniform ranges are centred on the library defaults, so the default config is a typical draw.
"""
from __future__ import annotations

from typing import Any

from ray import tune


def search_space(kind: str = "vaegan") -> dict[str, Any]:
    """Ray Tune search space for a model ``kind`` ("vaegan" or the plain "vae")."""
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
    return space


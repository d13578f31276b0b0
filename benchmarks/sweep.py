"""ASHA vs a grid run to completion, over the same points of the search space, through the product's sweep.

  grid  ``tune.space.grid_space``: ``--points`` values of each of ``--keys`` (default: the kind's three
        ``GRID_KEYS``, 2 x 2 x 2 = 8 points), every point trained for ``--max-epochs`` (default 16). It goes through ``tune.sweep.run``
        with ``tune.grace_period = max_epochs``: ASHA then has a single rung, at max_t, and stops no
        trial early, so this is the grid run to completion with everything else identical.
  asha  the same points through ``tune.sweep.run`` with ASHA (``--grace-period``, ``--reduction-factor``).

Each trial is a real Ray Train run (``pipelines.training.fit``) of the config with the point's overrides and
the same seed, so a point trains alike in both sweeps; only ASHA's stopping differs. "best" is the lowest
validation domain FID (``val/fid``) a trial last reported (Tune's best result, as the tune step uses);
"compute" is trial-epochs (Tune's ``training_iteration`` summed over trials).

Run from the repository root, under the shared Ray lock:
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/sweep.py            # 8 points x 16 epochs, ~13 min
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/sweep.py --quick    # smoke nets and data, 1 point, ASHA only
Results: benchmarks/results/sweep.json (--quick: sweep_quick.json; --out to change).
"""
from __future__ import annotations

import csv
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import common


def parse_args():
    p = common.argument_parser(__doc__)
    p.add_argument("--config", default=None, help="pipeline config (default pipelines/configs/default.yaml; "
                                                  "--quick: smoke.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--keys", default=None, help="comma-separated section.name keys of the grid (default "
                                                "tune.space.GRID_KEYS[model.kind]; --quick: opt_dec.lr)")
    p.add_argument("--points", type=int, default=None, help="values per key (default 2; --quick 1: a check of the layout)")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs of a completed trial (default 16; --quick 2)")
    p.add_argument("--grace-period", type=int, default=None,
                   help="ASHA's first rung, in epochs (default 2: an epoch of 960 images is 15 steps, after one of "
                        "which every point scores alike; --quick 1)")
    p.add_argument("--reduction-factor", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=None,
                   help="training images per trial epoch (default 960; --quick 256)")
    p.add_argument("--val-images", type=int, default=None, help="validation images for val/fid (default 256; --quick 64)")
    args = p.parse_args()
    args.config = args.config or f"pipelines/configs/{'smoke' if args.quick else 'default'}.yaml"
    args.keys = tuple(args.keys.split(",")) if args.keys else (("opt_dec.lr",) if args.quick else None)
    args.points = args.points or (1 if args.quick else 2)
    args.max_epochs = args.max_epochs or (2 if args.quick else 16)
    args.grace_period = args.grace_period or (1 if args.quick else 2)
    args.train_limit = args.train_limit or (256 if args.quick else 960)
    args.val_images = args.val_images or (64 if args.quick else 256)
    args.out = common.result_path(args, "sweep")
    return args


def tracking_context(scratch: Path):
    """A throwaway MLflow store and parent run for the trials (the sweep logs every trial as a child run)."""
    from pipelines import tracking
    from pipelines.context import RunContext
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    experiment_id = tracking.ensure_experiment(uri, "sweep-benchmark", scratch)
    parent = tracking.start_run(uri, experiment_id, "sweep-benchmark")
    return RunContext(run_dir=str(scratch), tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent)


def run_sweep(name: str, cfg, ctx, data: common.PreparedData, param_space: dict, out: Path) -> dict[str, Any]:
    """One sweep through the product's ``tune.sweep.run``; its outcome plus the per-trial table."""
    from dataclasses import replace

    from tune import sweep
    out.mkdir(parents=True)
    start = time.perf_counter()
    outcome = sweep.run(cfg, replace(ctx, step_key=name), str(data.dir), data.image_shape, data.featnet_path, out,
                        param_space=param_space)
    seconds = time.perf_counter() - start
    with open(out / "trials.csv", newline="") as f:
        # The "trial" column holds only the experiment's id prefix, the same for every trial: left out.
        trials = [{k: _number(v) for k, v in row.items() if k != "trial" and (k != "error" or v)}
                  for row in csv.DictReader(f)]
    return {"best_val_fid": round(outcome.best_score, 4), "best_overrides": outcome.overrides,
            "trial_epochs": outcome.trial_epochs, "trials": outcome.trials, "seconds": round(seconds, 1),
            "per_trial": trials}


def _number(text: str) -> Any:
    """A CSV cell as the number it holds (int, then float), else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def with_tune(cfg, args, grace_period: int):
    return replace(cfg, tune=replace(cfg.tune, num_samples=1, max_epochs=args.max_epochs, grace_period=grace_period,
                                     reduction_factor=args.reduction_factor, train_limit=args.train_limit))


def main() -> None:
    args = parse_args()
    from tune.space import GRID_KEYS, grid_space
    cfg = common.load_pipeline_config(args.config, ["train.patience=0", f"train.val_images={args.val_images}",
                                                    *args.overrides])
    # 8 points x 16 epochs by default: successive halving pays only when there are rungs to stop trials at and
    # trials to stop (with 4 x 4 ASHA spent 81% of the grid's trial-epochs); ~13 minutes on 2 cores.
    space = grid_space(cfg.model.kind, args.keys or GRID_KEYS[cfg.model.kind], args.points)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="sweep-", dir=args.work_dir)).resolve()
    try:
        with common.pipeline_ray():
            data = common.prepare_data(cfg, args.work_dir / "data")
            ctx = tracking_context(scratch)
            # grace_period == max_epochs: one rung at max_t, so no trial stops early (the grid to completion).
            # --quick has one point, which ASHA runs to completion too: the grid would repeat that trial.
            grid = ({"skipped": "--quick"} if args.quick else
                    run_sweep("grid", with_tune(cfg, args, args.max_epochs), ctx, data, space, scratch / "grid"))
            asha = run_sweep("asha", with_tune(cfg, args, args.grace_period), ctx, data, space, scratch / "asha")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ran = "best_val_fid" in grid
    result = {
        "ratios": {"asha_best_gap": common.ratio(asha["best_val_fid"] - grid["best_val_fid"], grid["best_val_fid"])
                   if ran else None,
                   "asha_compute_fraction": common.ratio(asha["trial_epochs"], grid.get("trial_epochs")),
                   "asha_time_fraction": common.ratio(asha["seconds"], grid.get("seconds"))},
        "grid": grid, "asha": asha, "asha_found_grid_best": asha["best_overrides"] == grid["best_overrides"] if ran else grid,
        "setup": {"config": args.config, "overrides": args.overrides, "space": space, "max_epochs": args.max_epochs,
                  "grace_period": args.grace_period, "reduction_factor": args.reduction_factor,
                  "train_limit": args.train_limit, "val_images": args.val_images, "kind": cfg.model.kind,
                  "base_channels": cfg.model.base_channels, "batch_size": cfg.train.batch_size,
                  "metric": "val/fid (lower is better)", "feature_net": data.featnet_name},
    }
    common.print_table([(f"{name} {key}", sweep.get(key, sweep.get("skipped"))) for name, sweep in (("grid", grid), ("asha", asha))
                        for key in ("best_val_fid", "trial_epochs", "seconds")] + list(result["ratios"].items()))
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()

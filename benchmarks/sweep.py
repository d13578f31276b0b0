"""What a sweep costs and what it buys: ASHA and synchronous successive halving vs a grid run to completion,
PBT vs ASHA at equal trial-epochs, and the main job's sweep against the untuned default config.

  grid  ``tune.space.grid_points``: ``--points`` values of each of ``--keys`` (default: the kind's three
        ``GRID_KEYS``, 3 x 3 x 3 = 27 points) in an order shuffled by the config's ``tune.seed``, every point
        trained for ``--max-epochs`` (default 8). It goes through ``tune.sweep.run`` with
        ``tune.grace_period = max_epochs``: ASHA then has a single rung, at max_t, and stops no trial early, so
        this is the grid run to completion with everything else identical.
  asha  the same points, in the same order, through ``tune.sweep.run`` with ASHA (``--grace-period``,
        ``--reduction-factor``). ``asha_replay`` then replays Ray's ASHA rule over the grid's per-epoch
        history: in this run's order (a check of the replay against the real ASHA), in the grid's product order,
        and in ``--replay-orders`` random orders, so that one run's order is not the whole story.
  sha   the same points through ``tune.sweep.run`` with ``tune.scheduler=sha`` (synchronous successive halving,
        the same rungs): every trial pauses at a rung until all have reached it, so its cost is the same in any
        order.
  pbt   ``tune.scheduler=pbt`` over the same keys' ranges (``tune.space.search_space``), a population of
        round(ASHA's trial-epochs / max_epochs) trials run for max_epochs, perturbed every
        ``--perturbation-interval`` epochs: the same compute as ASHA, spent on a population that exploits its
        best members instead of stopping its worst.
  tuned_vs_default
        the main job's sweep (``pipelines/configs/default.yaml``'s ``tune`` section) run through ``vaegan run``
        on the quality benchmark's config and first seed, its winner then trained with each of that benchmark's
        seeds, against the untuned default: the ``vaegan`` runs of ``--default-from`` (quality.json: the same
        config, seeds and 5-epoch budget with the sweep off). Test domain FID of the registered models.

Each grid, ASHA, SHA and PBT trial is a real Ray Train run (``pipelines.training.fit``) of the config with the point's
overrides and the same seed, so a point trains alike in the grid and ASHA; only ASHA's stopping differs. "best" is
the lowest validation domain FID (``val/fid``) a trial last reported (Tune's best result, as the tune step uses);
"best_test_fid" scores that trial's last model on the test split (``--test-images``) with the evaluate step's
code; "compute" is trial-epochs (Tune's ``training_iteration`` summed over trials).

Run from the repository root, under the shared Ray lock:
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/sweep.py            # 2 h 28 min on 2 AMD cores
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/sweep.py --quick    # smoke nets and data, 1 point, ASHA only
``--reuse grid,tuned_vs_default`` keeps those parts of the result file being replaced (same setup, checked)
and runs the rest: the searches that changed, without the hour the grid and the tuned runs take.
Results: benchmarks/results/sweep.json (--quick: sweep_quick.json; --out to change), and each search's report
(trials table, per-epoch ``history.csv``, ``trials.png``, PBT's ``pbt.png``) in ``sweep_reports/<search>/`` beside it.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import common
import quality

MAIN_JOB_CONFIG = "pipelines/configs/default.yaml"
REUSABLE = ("grid", "tuned_vs_default")  # the parts --reuse can keep (the others depend on ASHA's run)
# The setup keys a reused grid must share with this run (its point order may differ: every grid point runs).
GRID_SETUP = ("config", "overrides", "max_epochs", "train_limit", "val_images", "test_images", "kind",
              "base_channels", "batch_size", "metric", "feature_net")


def parse_args():
    p = common.argument_parser(__doc__)
    p.add_argument("--config", default=None, help="pipeline config (default pipelines/configs/default.yaml; "
                                                  "--quick: smoke.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--keys", default=None, help="comma-separated section.name keys of the grid (default "
                                                "tune.space.GRID_KEYS[model.kind]; --quick: opt_dec.lr)")
    p.add_argument("--points", type=int, default=None, help="values per key (default 3; --quick 1: a check of the layout)")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs of a completed trial (default 8; --quick 2)")
    p.add_argument("--grace-period", type=int, default=1,
                   help="ASHA's first rung, in epochs (default 1: an epoch of 960 images is 15 steps, after which "
                        "every point scores alike, so this rung stops trials at random; with 27 points, and a "
                        "reduction factor of 2, the good ones survive it)")
    p.add_argument("--reduction-factor", type=int, default=2)
    p.add_argument("--perturbation-interval", type=int, default=2, help="PBT's epochs between exploits (default 2)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="training images per trial epoch (default 960; --quick 256)")
    p.add_argument("--val-images", type=int, default=None, help="validation images for val/fid (default 256; --quick 64)")
    p.add_argument("--test-images", type=int, default=None,
                   help="test images for the winners' best_test_fid (default 2000; --quick the config's eval.num_images)")
    p.add_argument("--sha", action=argparse.BooleanOptionalAction, default=None,
                   help="run the synchronous successive halving search (default: yes; --quick: no, "
                        "tests/test_sweeps.py runs it through the CLI; one point would only pause and resume)")
    p.add_argument("--pbt", action=argparse.BooleanOptionalAction, default=None, help="run the PBT search (default: "
                                                                                      "yes; --quick: no)")
    p.add_argument("--tuned-vs-default", action=argparse.BooleanOptionalAction, default=None,
                   help="run the main job's sweep against the untuned default (default: yes; --quick: no)")
    p.add_argument("--reuse", default="", help=f"comma-separated parts ({', '.join(REUSABLE)}) to keep from the "
                                                "existing --out file instead of running them again")
    p.add_argument("--replay-orders", type=int, default=1000, help="random orders asha_replay replays (default 1000)")
    p.add_argument("--default-from", type=Path, default=common.RESULTS / "quality.json",
                   help="the quality benchmark result whose vaegan runs are the untuned default (default "
                        "benchmarks/results/quality.json)")
    args = p.parse_args()
    args.config = args.config or f"pipelines/configs/{'smoke' if args.quick else 'default'}.yaml"
    args.keys = tuple(args.keys.split(",")) if args.keys else (("opt_dec.lr",) if args.quick else None)
    args.points = args.points or (1 if args.quick else 3)
    args.max_epochs = args.max_epochs or (2 if args.quick else 8)
    args.train_limit = args.train_limit or (256 if args.quick else 960)
    args.val_images = args.val_images or (64 if args.quick else 256)
    args.test_images = args.test_images or (0 if args.quick else 2000)
    args.sha = (not args.quick) if args.sha is None else args.sha
    args.pbt = (not args.quick) if args.pbt is None else args.pbt
    args.tuned_vs_default = (not args.quick) if args.tuned_vs_default is None else args.tuned_vs_default
    args.out = common.result_path(args, "sweep")
    args.reuse = tuple(part for part in args.reuse.split(",") if part)
    unknown = [part for part in args.reuse if part not in REUSABLE]
    if unknown:
        p.error(f"--reuse {','.join(unknown)}: allowed: {', '.join(REUSABLE)}")
    return args


def tracking_context(scratch: Path):
    """A throwaway MLflow store and parent run for the trials (the sweep logs every trial as a child run)."""
    from pipelines import tracking
    from pipelines.context import RunContext
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    experiment_id = tracking.ensure_experiment(uri, "sweep-benchmark", scratch)
    parent = tracking.start_run(uri, experiment_id, "sweep-benchmark")
    return RunContext(run_dir=str(scratch), tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent)


# -- the searches ---------------------------------------------------------------------------------------


def run_sweep(name: str, cfg, ctx, data: common.PreparedData, param_space: dict, out: Path,
              reports: Path, points: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One sweep through the product's ``tune.sweep.run``; its outcome, its winner's test FID and the per-trial
    table. The sweep's report (trials table, per-epoch history.csv, trials.png, pbt.png) is kept in
    ``reports / name``."""
    from tune import sweep
    out.mkdir(parents=True)
    start = time.perf_counter()
    outcome = sweep.run(cfg, replace(ctx, step_key=name), str(data.dir), data.image_shape, data.featnet_path, out,
                        param_space=param_space, points=points, keep_best=True)
    seconds = time.perf_counter() - start
    (reports / name).mkdir(parents=True, exist_ok=True)
    for report in outcome.report:
        shutil.copy2(out / report, reports / name / report)
    with open(out / "trials.csv", newline="") as f:
        # The "trial" column holds only the experiment's id prefix, the same for every trial: left out.
        trials = [{k: _number(v) for k, v in row.items() if k != "trial" and (k != "error" or v)}
                  for row in csv.DictReader(f)]
    return {"best_val_fid": round(outcome.best_score, 4),
            "best_test_fid": round(score_test_fid(cfg, data, out / outcome.checkpoint), 4),
            "best_overrides": outcome.overrides, "trial_epochs": outcome.trial_epochs, "trials": outcome.trials,
            "concurrent_trials": outcome.concurrent_trials, "seconds": round(seconds, 1), "per_trial": trials}


def score_test_fid(cfg, data: common.PreparedData, model_dir: Path) -> float:
    """The domain FID on ``cfg.eval.num_images`` test images of the model saved in ``model_dir``, scored by the
    evaluate step's code (outside the search's clock)."""
    from pipelines.steps.evaluate import score_checkpoint
    from vaegan.checkpoint import CHECKPOINT_NAME, load_checkpoint
    state = load_checkpoint(model_dir / CHECKPOINT_NAME)
    return score_checkpoint(cfg.eval, state, data.outputs, data.featnet_path, seed=cfg.train.seed)["fid"]


def _number(text: str) -> Any:
    """A CSV cell as the number it holds (int, then float), else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def with_tune(cfg, args, grace_period: int, **tune_keys):
    """``cfg`` with the search's ``tune`` keys: one trial per sample, each at most ``--max-epochs``."""
    return replace(cfg, tune=replace(cfg.tune, **{"num_samples": 1, "max_epochs": args.max_epochs,
                                                  "grace_period": grace_period, "reduction_factor": args.reduction_factor,
                                                  "train_limit": args.train_limit, **tune_keys}))


def keys_space(kind: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The search ranges of ``keys`` alone: every other key keeps its config value."""
    from tune.space import search_space, searchable_keys
    return search_space(kind, leave=tuple(k for k in searchable_keys(kind) if k not in keys))


def pbt_config(cfg, args, asha_trial_epochs: int):
    """PBT's config: a population spending ASHA's trial-epochs."""
    population = max(2, round(asha_trial_epochs / args.max_epochs))
    return with_tune(cfg, args, args.max_epochs, scheduler="pbt", num_samples=population,
                     perturbation_interval=args.perturbation_interval)


# -- the main job's sweep against the untuned default ---------------------------------------------------


def main_job_tune_overrides() -> list[str]:
    """The ``tune`` keys README's main job sets (its YAML), as --set overrides, with the sweep switched on."""
    from pipelines.config import flatten
    main_job = common.load_pipeline_config(MAIN_JOB_CONFIG, [])
    values = flatten(asdict(main_job))
    return ["tune.enabled=true", *(f"{key}={values[key]}" for key in main_job.given_keys if key.startswith("tune."))]


def tuned_vs_default(args) -> dict[str, Any]:
    """Sweep once (the first seed), train the winner with every seed of ``--default-from``, and set the test
    FIDs against that file's untuned ``vaegan`` runs (same config, seeds and budget)."""
    default = json.loads(args.default_from.read_text())
    if "runs" not in default.get("vaegan", {}):
        raise SystemExit(f"{args.default_from} has no vaegan runs to compare with: give --default-from a "
                         "benchmarks/quality.py result that trained the VAE-GAN (--kinds vaegan)")
    setup, default_runs = default["setup"], default["vaegan"]["runs"]
    seeds = [run["seed"] for run in default_runs]
    run_args = SimpleNamespace(run_dir=(args.work_dir / "tuned-vs-default").resolve(), overrides=setup["overrides"])
    run_args.run_dir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{run_args.run_dir / 'mlflow.db'}"
    sweep_overrides = main_job_tune_overrides()
    runs = [quality.pipeline_run(run_args, "vaegan_tuned", "vaegan", seeds[0], uri, tuple(sweep_overrides))]
    summary = json.loads((run_args.run_dir / "summary.json").read_text())
    if summary["feature_net"] != setup["feature_net"]:
        raise RuntimeError(f"the tuned run's feature net {summary['feature_net']} is not {args.default_from}'s "
                           f"{setup['feature_net']}: their FIDs do not compare")
    sweep = sweep_figures(run_args.run_dir, summary)
    winner = tuple(f"{key}={value}" for key, value in sweep["chose"].items())
    runs += [quality.pipeline_run(run_args, "vaegan_tuned", "vaegan", seed, uri, winner) for seed in seeds[1:]]
    tuned_fids, default_fids = [run["metrics"]["fid"] for run in runs], [run["metrics"]["fid"] for run in default_runs]
    return {"seeds": seeds, "config": setup["config"], "train_epochs": setup["epochs"],
            "sweep_overrides": sweep_overrides, "sweep": sweep,
            "default": {"source": f"{shown(args.default_from)}: vaegan", "fid": quality.spread(default_fids)},
            "tuned": {"fid": quality.spread(tuned_fids),
                      "runs": [{"seed": seed, "fid": run["metrics"]["fid"], "model_uri": run["model_uri"]}
                               for seed, run in zip(seeds, runs)]},
            "tracking_uri": uri}


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (as the committed results name files)."""
    path = path.resolve()
    return str(path.relative_to(common.REPO)) if path.is_relative_to(common.REPO) else str(path)


def sweep_figures(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """What the run's tune step chose and spent."""
    from pipelines.context import read_outputs
    from pipelines.steps import tune
    step = summary["steps"]["tune"]
    outputs = read_outputs(tune.Outputs, str(run_dir / f"tune-{step['key']}"))
    return {"chose": summary["sweep"]["chose"], "trials": outputs.trials, "trial_epochs": outputs.trial_epochs,
            "seconds": step["seconds"], "best_val_fid": outputs.best_score}


# -- the run --------------------------------------------------------------------------------------------


def searches(args, reused: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """The grid (or ``reused``'s), ASHA, SHA and PBT blocks, ASHA's replay and the setup, on a Ray of their own
    and a scratch folder."""
    from tune.space import GRID_KEYS, grid_points
    cfg = common.load_pipeline_config(args.config, ["train.patience=0", f"train.val_images={args.val_images}",
                                                    *([f"eval.num_images={args.test_images}"] if args.test_images else []),
                                                    *args.overrides])
    # 27 points x 8 epochs by default: asynchronous successive halving pays only when there are rungs to stop
    # trials at and many trials to stop. ASHA promotes every trial that beats the half of those before it at a
    # rung, so the first trials always pass, and so does every new best: the points arrive shuffled
    # (grid_points), as random draws do (docs/benchmarks.md, section 4, measures the orders).
    keys = args.keys or GRID_KEYS[cfg.model.kind]
    points = grid_points(cfg.model.kind, keys, args.points, seed=cfg.tune.seed)
    space = keys_space(cfg.model.kind, keys)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="sweep-", dir=args.work_dir)).resolve()
    reports = args.out.with_name(f"{args.out.stem}_reports")  # benchmarks/results/sweep_reports/<search>/
    try:
        with common.pipeline_ray():
            data = common.prepare_data(cfg, args.work_dir / "data")
            ctx = tracking_context(scratch)
            setup = {"config": args.config, "overrides": args.overrides, "grid_keys": list(keys),
                     "grid_points": points, "grid_order_seed": cfg.tune.seed, "max_epochs": args.max_epochs,
                     "grace_period": args.grace_period, "reduction_factor": args.reduction_factor,
                     "perturbation_interval": args.perturbation_interval, "train_limit": args.train_limit,
                     "val_images": args.val_images, "test_images": cfg.eval.num_images, "kind": cfg.model.kind,
                     "base_channels": cfg.model.base_channels, "batch_size": cfg.train.batch_size,
                     "metric": "val/fid (lower is better)", "feature_net": data.featnet_name}
            # grace_period == max_epochs: one rung at max_t, so no trial stops early (the grid to completion).
            # --quick has one point, which ASHA runs to completion too: the grid would repeat that trial.
            if args.quick:
                grid = {"skipped": "--quick"}
            elif "grid" in reused:
                grid = reused_grid(reused, setup, keys)
            else:
                grid = run_sweep("grid", with_tune(cfg, args, args.max_epochs, num_samples=len(points)), ctx, data,
                                 space, scratch / "grid", reports, points)
            asha = run_sweep("asha", with_tune(cfg, args, args.grace_period, num_samples=len(points)), ctx, data,
                             space, scratch / "asha", reports, points)
            if args.sha:
                sha = run_sweep("sha", with_tune(cfg, args, args.grace_period, num_samples=len(points),
                                                 scheduler="sha"), ctx, data, space, scratch / "sha", reports, points)
            else:
                sha = skipped(args, "--no-sha")
            if args.pbt:
                pbt = run_sweep("pbt", pbt_config(cfg, args, asha["trial_epochs"]), ctx, data, space,
                                scratch / "pbt", reports)
            else:
                pbt = skipped(args, "--no-pbt")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    replayed = {"skipped": "--quick"} if args.quick else replay_asha(args, reports / "grid" / "history.csv", keys,
                                                                      points, asha["concurrent_trials"])
    return grid, asha, sha, replayed, pbt, setup


def reused_grid(reused: dict[str, Any], setup: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The earlier result's grid, once its setup and points are this run's (in any order: every point ran)."""
    from pipelines.config import flatten
    earlier = reused["setup"]
    differ = [key for key in GRID_SETUP if earlier.get(key) != setup[key]]
    ran = sorted(tuple(row[key] for key in keys) for row in reused["grid"]["per_trial"])
    wanted = sorted(tuple(flatten(point)[key] for key in keys) for point in setup["grid_points"])
    if differ or ran != wanted:
        raise SystemExit(f"--reuse grid: the grid in the existing result was run with another setup "
                         f"({', '.join(differ) or 'its points'} differ): run it again (drop grid from --reuse)")
    return reused["grid"]


def replay_asha(args, history_csv: Path, keys: tuple[str, ...], points: list[dict[str, Any]],
                slots: int) -> dict[str, Any]:
    """Ray's ASHA rule replayed over the grid's history in this run's order, the grid's product order and
    ``--replay-orders`` random ones (``asha_replay``)."""
    import itertools

    import asha_replay
    from pipelines.config import flatten
    histories = asha_replay.read_histories(history_csv, keys, "val/fid")
    this_order = [tuple(flatten(point)[key] for key in keys) for point in points]
    product_order = list(itertools.product(*(sorted({point[i] for point in this_order}) for i in range(len(keys)))))
    return asha_replay.summary(histories, {"this_order": this_order, "product_order": product_order},
                               args.replay_orders, seed=0, max_t=args.max_epochs, grace_period=args.grace_period,
                               reduction_factor=args.reduction_factor, slots=slots)


def reusable(args) -> dict[str, Any]:
    """The parts of the existing result that ``--reuse`` keeps (with its setup, to check), each marked with the
    command that measured it."""
    if not args.reuse:
        return {}
    if not args.out.is_file():
        raise SystemExit(f"--reuse {','.join(args.reuse)}: {args.out} does not exist; run those parts")
    earlier = json.loads(args.out.read_text())
    kept = {}
    for part in args.reuse:
        block = earlier.get(part, {})
        if "skipped" in block or not block:
            raise SystemExit(f"--reuse {part}: {args.out} has no {part} to keep ({block.get('skipped', 'absent')})")
        kept[part] = {**block, "measured_by": block.get("measured_by", earlier["command"])}
    return {**kept, "setup": earlier["setup"]}


def against_grid(name: str, search: dict[str, Any], grid: dict[str, Any]) -> dict[str, float | None]:
    """``name``'s best val FID gap to the grid's, and its share of the grid's trial-epochs and seconds."""
    ran = "best_val_fid" in grid and "best_val_fid" in search
    return {f"{name}_best_gap": common.ratio(search["best_val_fid"] - grid["best_val_fid"], grid["best_val_fid"])
            if ran else None,
            f"{name}_compute_fraction": common.ratio(search.get("trial_epochs"), grid.get("trial_epochs")),
            # Seconds compare only within one run: a reused grid's were measured by another.
            f"{name}_time_fraction": None if "measured_by" in grid else common.ratio(search.get("seconds"),
                                                                                     grid.get("seconds"))}


def skipped(args, flag: str) -> dict[str, str]:
    """The block of a part that did not run: --quick leaves it out, else ``flag`` did."""
    return {"skipped": "--quick" if args.quick else flag}


def found_grid_best(search: dict[str, Any], grid: dict[str, Any]) -> bool | dict[str, str]:
    """Whether ``search``'s winner is the grid's; where either was skipped, the skipped block says why."""
    for block in (grid, search):
        if "skipped" in block:
            return block
    return search["best_overrides"] == grid["best_overrides"]


def main() -> None:
    args = parse_args()
    reused = reusable(args)
    # First, so that a bad --default-from, or any failure of this longest part, stops the run before the searches.
    if "tuned_vs_default" in reused:
        tuned = reused["tuned_vs_default"]
    else:
        tuned = (tuned_vs_default(args) if args.tuned_vs_default else
                 skipped(args, "--no-tuned-vs-default"))
    grid, asha, sha, replayed, pbt, setup = searches(args, reused)
    result = {
        "ratios": {**against_grid("asha", asha, grid), **against_grid("sha", sha, grid),
                   "pbt_over_asha_fid": common.ratio(pbt.get("best_test_fid"), asha["best_test_fid"]),
                   "pbt_over_asha_trial_epochs": common.ratio(pbt.get("trial_epochs"), asha["trial_epochs"]),
                   "tuned_over_default_fid": common.ratio(tuned["tuned"]["fid"]["mean"], tuned["default"]["fid"]["mean"])
                   if "tuned" in tuned else None},
        "grid": grid, "asha": asha, "asha_found_grid_best": found_grid_best(asha, grid),
        "asha_replay": replayed, "sha": sha,
        "sha_found_grid_best": found_grid_best(sha, grid),
        "pbt": pbt, "tuned_vs_default": tuned, "setup": setup,
    }
    common.print_table([(f"{name} {key}", sweep.get(key, sweep.get("skipped")))
                        for name, sweep in (("grid", grid), ("asha", asha), ("sha", sha), ("pbt", pbt))
                        for key in ("best_val_fid", "best_test_fid", "trial_epochs", "seconds")]
                       + list(result["ratios"].items()))
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()

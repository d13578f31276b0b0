"""Sample and likelihood quality: plain VAE vs VAE-GAN vs pythae's VAE-GAN, same nets, data, budget and seeds.

  vae, vaegan     the product's own pipeline, ``vaegan run --config benchmarks/configs/quality.yaml`` with
                  ``--set model.kind=<kind> --set train.seed=<seed>``: preprocess (full Fashion-MNIST),
                  train, evaluate, register under ``bench-quality-<kind>``.
  vae_equal_time  the plain VAE again, trained for the VAE-GAN's wall-clock seconds instead of its epochs: per
                  seed, ``train.epochs`` = round(VAE-GAN training seconds / the VAE's seconds per epoch), both
                  read from the runs' history.json (the honest comparison for a user with a fixed budget).
  pythae_vaegan   pythae's VAE-GAN trainer on the same nets, data split, epochs, batch size and seed
                  (benchmarks/pythae_peer.py, in benchmarks/.venv-pythae); its final encoder/decoder are
                  saved in our checkpoint format, scored by the evaluate step's own code
                  (``pipelines.steps.evaluate.score_checkpoint`` -> ``vaegan.evaluate.evaluate_model``, same
                  feature net) and registered with ``pipelines.registry`` under ``bench-quality-pythae-vaegan``.

Per system: test-split domain FID, KID, precision, recall, recon MSE, IWAE NLL (nats), active units and
the train - test ELBO gap (and, for the pipeline's models, ``fid_fitted_prior``: the FID of samples drawn from
the Gaussian mixture fitted to the training latents), as mean, sample std and per-seed values; the fraction of
steps on which the discriminator was updated, per epoch (``dis_update_fraction``); the ``models:/<name>@champion`` URI
(the alias holds the seed with the best test FID) and each seed's version URI. Everything lives in one
run folder with its own MLflow store (``tracking_uri``), so any model can be pulled or re-scored later.

Run from the repository root; every ``vaegan run`` starts Ray, so hold the shared Ray lock:
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/quality.py --seeds 0 1 2   # ~2 h 10 min on 2 cores
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/quality.py --quick         # 1,500 images, 1 epoch, vae only
Results: benchmarks/results/quality.json (--quick: quality_quick.json; --out to change).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import common

CONFIG = common.BENCHMARKS / "configs" / "quality.yaml"
METRICS = ("fid", "kid", "precision", "recall", "recon_mse", "iwae_nll", "active_units", "elbo_gap")
FITTED_PRIOR_METRIC = "fid_fitted_prior"  # only models that carry a fitted prior: the pipeline's, not pythae's
PIPELINE_KINDS = ("vae", "vaegan")
QUICK = ["data.limit=1500", "train.epochs=1", "model.base_channels=8", "train.val_images=64", "eval.num_images=128",
         "eval.iwae_k=8", "eval.iwae_images=32", "eval.featnet_epochs=1"]


def parse_args():
    p = common.argument_parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="train.seed values (default 0 1 2; --quick 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="more config overrides for every system, e.g. train.epochs=3")
    p.add_argument("--kinds", nargs="+", choices=PIPELINE_KINDS, default=None,
                   help="the product's pipelines to run (default vae vaegan; --quick vae: the only kind the tests "
                        "register nowhere else)")
    p.add_argument("--pythae", action=argparse.BooleanOptionalAction, default=None,
                   help="train and score the pythae peer (default: yes; --quick: no)")
    args = p.parse_args()
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.pythae = (not args.quick) if args.pythae is None else args.pythae
    args.kinds = args.kinds or (["vae"] if args.quick else list(PIPELINE_KINDS))
    args.overrides = [*(QUICK if args.quick else []), *args.overrides]
    args.run_dir = (args.work_dir / ("quality-quick" if args.quick else "quality")).resolve()
    args.out = common.result_path(args, "quality")
    return args


def model_name(system: str) -> str:
    return f"bench-quality-{system.replace('_', '-')}"


# -- the systems ----------------------------------------------------------------------------------------


def pipeline_run(args, system: str, kind: str, seed: int, tracking_uri: str,
                 extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One ``vaegan run`` of the benchmark config (``extra`` overrides last); returns its figures."""
    overrides = [f"model.kind={kind}", f"train.seed={seed}", f"register.model_name={model_name(system)}",
                 f"register.tracking_uri={tracking_uri}", *args.overrides, *extra]
    command = [str(Path(sys.executable).parent / "vaegan"), "run", "--config", str(CONFIG), "--run-dir", str(args.run_dir),
               *[part for o in overrides for part in ("--set", o)]]
    print(f"[quality] {system} seed {seed}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, cwd=common.REPO)
    summary = json.loads((args.run_dir / "summary.json").read_text())
    history = json.loads((args.run_dir / f"train-{summary['steps']['train']['key']}" / "history.json").read_text())
    metrics = [*METRICS, *([FITTED_PRIOR_METRIC] if FITTED_PRIOR_METRIC in summary["metrics"] else [])]
    return {"metrics": {k: summary["metrics"][k] for k in metrics},
            "model_uri": f"models:/{summary['model_name']}/{summary['model_version']}",
            "train_step_seconds": summary["steps"]["train"]["seconds"],  # Ray Train start, epochs, validation
            **epoch_figures(history), "preprocess_dir": f"preprocess-{summary['steps']['preprocess']['key']}"}


def epoch_figures(epochs: list[dict[str, float]]) -> dict[str, Any]:
    """Epochs run, their training seconds, and the discriminator's update fraction per epoch (None: no discriminator)."""
    fractions = [e.get("dis_update_fraction") for e in epochs]
    return {"epochs": len(epochs), "epochs_seconds": round(sum(e["epoch_seconds"] for e in epochs), 1),
            "dis_update_fraction": None if None in fractions else [round(f, 4) for f in fractions]}


def equal_time_epochs(vae: dict[str, Any], vaegan: dict[str, Any]) -> int:
    """The plain VAE's epochs that fill the VAE-GAN's training seconds (same seed), to the nearest epoch."""
    return max(1, round(vaegan["epochs_seconds"] / (vae["epochs_seconds"] / vae["epochs"])))


def pythae_run(cfg, data: common.PreparedData, seed: int, tracking_uri: str, run_dir: Path) -> dict[str, Any]:
    """Train the pythae peer, score it with the evaluate step's code, register it; returns its figures."""
    from pipelines import registry, tracking
    from pipelines.config import flatten
    from pipelines.steps.evaluate import score_checkpoint
    from vaegan.checkpoint import CHECKPOINT_NAME, load_checkpoint
    checkpoint = run_dir / "pythae" / f"seed-{seed}" / CHECKPOINT_NAME
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    print(f"[quality] pythae_vaegan seed {seed}", flush=True)
    trained = common.run_pythae(["--data", str(data.dir), "--config-json", json.dumps(dataclasses.asdict(cfg.core())),
                                 "--epochs", str(cfg.train.epochs), "--seed", str(seed), "--checkpoint", str(checkpoint)])
    scores = score_checkpoint(cfg.eval, load_checkpoint(checkpoint), data.outputs, data.featnet_path, seed=cfg.train.seed)
    experiment_id = tracking.ensure_experiment(tracking_uri, cfg.register.experiment, run_dir)
    run_id = tracking.start_run(tracking_uri, experiment_id, f"pythae-vaegan-seed-{seed}",
                                params={**flatten(dataclasses.asdict(cfg)), "trainer": f"pythae {trained['pythae']}"})
    tracking.log_metrics(tracking_uri, run_id, {f"test/{k}": v for k, v in scores.items()})
    registered = registry.register(dataclasses.replace(cfg.register, model_name=model_name("pythae_vaegan")),
                                   tracking_uri, run_id=run_id, checkpoint=checkpoint, metrics=scores,
                                   feature_net=data.featnet_name, fingerprint=data.manifest["fingerprint"],
                                   image_shape=data.image_shape)
    tracking.end_run(tracking_uri, run_id)
    return {"metrics": {k: scores[k] for k in METRICS},
            "model_uri": f"models:/{registered['model_name']}/{registered['model_version']}",
            **epoch_figures(trained["epochs"])}


# -- aggregation ----------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample std and the per-seed values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def system_block(system: str, seeds: list[int], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample std and per-seed values of every metric all seeds report, the discriminator's update
    fraction per epoch (mean over seeds) and at its worst epoch, and the registered models' URIs."""
    metrics = [k for k in runs[0]["metrics"] if all(k in run["metrics"] for run in runs)]
    fractions = [run["dis_update_fraction"] for run in runs]
    return {"metrics": {k: spread([run["metrics"][k] for run in runs]) for k in metrics},
            "dis_update_fraction": None if None in fractions else {
                "per_epoch": [round(statistics.fmean(epoch), 4) for epoch in zip(*fractions)],
                "worst_epoch": min(min(run) for run in fractions)},
            "model_uri": f"models:/{model_name(system)}@champion",
            "runs": [{"seed": seed, **run} for seed, run in zip(seeds, runs)]}


def mean_of(systems: dict[str, Any], system: str, metric: str = "fid") -> float | None:
    """A system's mean over seeds of one metric; None when the system was skipped or lacks it."""
    return systems.get(system, {}).get("metrics", {}).get(metric, {}).get("mean")


def metric_ratio(systems: dict[str, Any], numerator: str, denominator: str, metric: str = "fid") -> float | None:
    return common.ratio(mean_of(systems, numerator, metric), mean_of(systems, denominator, metric))


def pipeline_systems(args, tracking_uri: str) -> tuple[dict[str, Any], str]:
    """The product's systems (``--kinds``, then ``vae_equal_time`` when both ran); returns their blocks and the
    preprocess folder they share."""
    runs: dict[str, list[dict[str, Any]]] = {
        kind: [pipeline_run(args, kind, kind, seed, tracking_uri) for seed in args.seeds] for kind in args.kinds}
    if set(PIPELINE_KINDS) <= runs.keys():
        runs["vae_equal_time"] = [
            pipeline_run(args, "vae_equal_time", "vae", seed, tracking_uri,
                         (f"train.epochs={equal_time_epochs(vae, vaegan)}",))
            for seed, vae, vaegan in zip(args.seeds, runs["vae"], runs["vaegan"])]

    def skipped(system: str) -> dict[str, str]:
        return {"skipped": "--quick" if args.quick else
                "not in --kinds" if system in PIPELINE_KINDS else "needs --kinds vae vaegan"}

    blocks = {system: system_block(system, args.seeds, runs[system]) if system in runs else skipped(system)
              for system in (*PIPELINE_KINDS, "vae_equal_time")}
    return blocks, next(iter(runs.values()))[-1]["preprocess_dir"]


def main() -> None:
    args = parse_args()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{args.run_dir / 'mlflow.db'}"
    systems, preprocess_dir = pipeline_systems(args, tracking_uri)
    cfg = common.load_pipeline_config(CONFIG, [*args.overrides, "model.kind=vaegan"])
    data = common.load_prepared(cfg, args.run_dir / preprocess_dir)
    if args.pythae:
        runs = [pythae_run(common.load_pipeline_config(CONFIG, [*args.overrides, "model.kind=vaegan", f"train.seed={seed}"]),
                           data, seed, tracking_uri, args.run_dir) for seed in args.seeds]
        systems["pythae_vaegan"] = system_block("pythae_vaegan", args.seeds, runs)
    else:
        systems["pythae_vaegan"] = {"skipped": "--quick" if args.quick else "--no-pythae"}
    result = {
        "ratios": {"vaegan_over_vae_fid": metric_ratio(systems, "vaegan", "vae"),
                   "vaegan_over_vae_equal_time_fid": metric_ratio(systems, "vaegan", "vae_equal_time"),
                   "vaegan_over_pythae_fid": metric_ratio(systems, "vaegan", "pythae_vaegan"),
                   "pythae_vaegan_over_vaegan_fid": metric_ratio(systems, "pythae_vaegan", "vaegan"),
                   "vaegan_over_vae_recon_mse": metric_ratio(systems, "vaegan", "vae", "recon_mse"),
                   "vaegan_fitted_over_standard_prior_fid": common.ratio(mean_of(systems, "vaegan", FITTED_PRIOR_METRIC),
                                                                         mean_of(systems, "vaegan"))},
        **systems, "tracking_uri": tracking_uri, "run_dir": str(args.run_dir),
        "setup": {"config": str(CONFIG.relative_to(common.REPO)), "overrides": args.overrides, "seeds": args.seeds,
                  "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "base_channels": cfg.model.base_channels,
                  "latent_dim": cfg.model.latent_dim, "data_counts": data.manifest["counts"],
                  "eval_images": cfg.eval.num_images, "iwae_k": cfg.eval.iwae_k, "feature_net": data.featnet_name,
                  "metrics_split": "test", "pythae_weights": "final epoch (pythae keeps no validation-selected model)",
                  "pipeline_weights": "best epoch by val/fid (the train step's checkpoint choice)",
                  "equal_time": "vae_equal_time: train.epochs = round(VAE-GAN epochs_seconds / VAE seconds per epoch), "
                                "per seed; epochs_seconds counts training only, not validation"},
    }
    common.print_table([(f"{system} {k}", f"{block['metrics'][k]['mean']:.4g} ± {block['metrics'][k]['std']:.2g}")
                        for system, block in systems.items() if "metrics" in block
                        for k in ("fid", FITTED_PRIOR_METRIC, "iwae_nll") if k in block["metrics"]]
                       + list(result["ratios"].items()))
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()

"""The ``vaegan`` command.

    vaegan run --config pipelines/configs/default.yaml [--set key=value ...] [--steps a,b] [--force STEP]
               [--run-dir DIR] [--dry-run] [--debug]
    vaegan sweep --config FILE [--set key=value ...] [--run-dir DIR]
    vaegan evaluate --model MODEL_URI [--data RUN_DIR_OR_SOURCE] [--split test] [--n 10000] [--out DIR] [--log]
    vaegan sample      --model models:/NAME@ALIAS --num 64 --seed 0 --out grid.png [--npy samples.npy]
    vaegan encode      --model MODEL_URI --input PATH --out latents.npy
    vaegan reconstruct --model MODEL_URI --input PATH --out recon.png [--npy recon.npy]
    vaegan interpolate --model MODEL_URI --input A [--input B] --steps 8 --out strip.png

The pull verbs need only MLFLOW_TRACKING_URI; PATH is an image, a folder of images, a .npy or a
pipeline Parquet split. User mistakes (bad config, missing data, unreachable tracking server,
unknown model, unreadable input) end with one line on stderr and exit code 2; ``--debug`` shows
the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from vaegan.config import PRIORS
from vaegan.errors import UserError

from .config import MIN_EVAL_IMAGES, load_config
from .steps import STEPS

SEED_MAX = 2**63 - 1  # torch's and numpy's generators take 0..2**64-1; MLflow's long params stop at 2**63-1


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end like every user error: one ``error:`` line on stderr and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _steps(text: str) -> list[str]:
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise argparse.ArgumentTypeError(f"unknown step {unknown[0] if unknown else text!r}; allowed: {', '.join(STEPS)}")
    return steps


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="vaegan", description="Train VAE-GANs on Ray; pull them from MLflow.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run", help="execute the pipeline DAG (preprocess, tune, train, evaluate, register)")
    run.add_argument("--config", required=True, help="YAML config, e.g. pipelines/configs/smoke.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    run.add_argument("--steps", type=_steps, default=list(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    run.add_argument("--force", type=_steps, action="append", default=[], metavar="STEP",
                     help="rerun STEP and everything after it even if cached")
    run.add_argument("--run-dir", help="run folder: a path, or s3://BUCKET/PREFIX or gs://… on object storage "
                     "(default runs/<config name>)")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sweep = verbs.add_parser("sweep", help="preprocess + the Tune sweep of a config; writes the sweep report")
    sweep.add_argument("--config", required=True, help="YAML config; its tune section is the budget")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sweep.add_argument("--run-dir", help="run folder, a path or an s3:// or gs:// URI (default runs/<config name>)")
    sweep.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add_evaluate_verb(verbs)
    add_pull_verbs(verbs)
    return parser


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (no upper bound when None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; allowed: {allowed}")
        return value
    return parse


_positive = _int_in(1)
_seed = _int_in(0, SEED_MAX)


def add_evaluate_verb(verbs) -> None:
    evaluate = verbs.add_parser("evaluate", help="score a registered model: metrics.json and PNGs")
    evaluate.add_argument("--model", required=True, help="MLflow model URI, e.g. models:/vaegan-fashion-mnist@champion")
    evaluate.add_argument("--data", default="", help="run folder, preprocess folder, or a source to preprocess "
                          "(IDX folder, image folder, Parquet); default: Fashion-MNIST")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--n", type=_int_in(MIN_EVAL_IMAGES), default=10000,
                          help=f"images scored (and samples drawn), at least {MIN_EVAL_IMAGES}")
    evaluate.add_argument("--seed", type=_seed, default=0, help=f"0..{SEED_MAX}")
    evaluate.add_argument("--prior", choices=PRIORS, default="standard",
                          help="sampler of the sample figures: N(0, I), or the mixture fitted to the training "
                          "set's latents (fid_fitted_prior is reported either way when the model has one)")
    evaluate.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder")
    evaluate.add_argument("--log", action="store_true", help="also log metrics and files to the model's MLflow run")
    evaluate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_pull_verbs(verbs) -> None:
    """sample / encode / reconstruct / interpolate: a registered model, pulled from MLflow."""
    def verb(name: str, help_text: str, takes_input: bool) -> argparse.ArgumentParser:
        parser = verbs.add_parser(name, help=help_text)
        parser.add_argument("--model", required=True, help="MLflow model URI, e.g. models:/vaegan-fashion-mnist@champion")
        if takes_input:
            parser.add_argument("--input", required=True, action="append", type=Path,
                                help="image file, folder of images, .npy, or a pipeline Parquet split; a .npy is "
                                "(H, W), (N, H, W) grey or (N, C, H, W) (3-D arrays that read as one (H, W, C) or "
                                "(C, H, W) image are refused); transparent pixels are composited on white")
            parser.add_argument("--limit", type=_positive, default=None, help="use only the first N input images")
        parser.add_argument("--out", required=True, type=Path,
                            help=f"output file ({'.npy latents' if name == 'encode' else '.png grid or .npy array'})")
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return parser

    sample = verb("sample", "generate images from the prior", takes_input=False)
    sample.add_argument("--num", type=_positive, default=64, help="number of images")
    sample.add_argument("--seed", type=_seed, default=0, help=f"0..{SEED_MAX}")
    sample.add_argument("--prior", choices=PRIORS, default="standard",
                        help="z from N(0, I), or from the Gaussian mixture fitted to the training set's latents")
    sample.add_argument("--npy", type=Path, help="also write the images as a float32 .npy array")
    verb("encode", "images -> posterior means (N, latent_dim) .npy", takes_input=True)
    reconstruct = verb("reconstruct", "images -> reconstructions", takes_input=True)
    reconstruct.add_argument("--npy", type=Path, help="also write the reconstructions as a float32 .npy array")
    interpolate = verb("interpolate", "decode the line between two images' latents as a PNG strip (exactly two "
                       "input images)", takes_input=True)
    interpolate.add_argument("--steps", type=_int_in(2), default=8, help="images in the strip (2..256)")


def cmd_run(args: argparse.Namespace) -> int:
    forced = {step for group in args.force for step in group}
    outside = sorted(forced - set(args.steps), key=STEPS.index)
    if outside:  # a forced step not run would be ignored, or fail after Ray starts
        from vaegan.config import ConfigError
        raise ConfigError(f"--force {outside[0]} names a step outside --steps {','.join(args.steps)}; allowed: "
                          f"one of {', '.join(args.steps)}, or add it to --steps")
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    from .pipeline import run_pipeline
    from .store import join
    summary = run_pipeline(cfg, args.run_dir or str(Path("runs") / cfg.name), args.steps, forced)
    print(json.dumps(summary, indent=2))
    print(f"summary: {join(summary['run_dir'], 'summary.json')}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, [*args.overrides, "tune.enabled=true"])
    from .pipeline import run_pipeline
    from .store import join
    summary = run_pipeline(cfg, args.run_dir or str(Path("runs") / cfg.name), ["preprocess", "tune"], set())
    tune_dir = join(summary["run_dir"], f"tune-{summary['steps']['tune']['key']}")
    print(json.dumps(summary["steps"], indent=2))
    from .context import read_outputs
    from .steps import tune
    report = read_outputs(tune.Outputs, tune_dir).report  # trials.*, history.csv, and pareto.* or pbt.png
    print(f"sweep report: {' '.join(join(tune_dir, name) for name in sorted(report, key=lambda n: n != 'trials.md'))}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .model_eval import EvaluateRequest, evaluate
    report = evaluate(EvaluateRequest(model_uri=args.model, out=args.out, data=args.data, split=args.split,
                                      num_images=args.n, seed=args.seed, prior=args.prior, log=args.log))
    print(json.dumps(report, indent=2))
    print(f"metrics: {args.out / 'metrics.json'}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    import numpy as np

    from deploy import pull
    # The output names first: a wrong one ends here, before the model is downloaded or anything is computed.
    pull.check_out(args.out, (".npy",) if args.verb == "encode" else (".png", ".npy"))
    if getattr(args, "npy", None):
        pull.check_out(args.npy, (".npy",), "--npy")
    model = pull.load_model(args.model)
    shape = pull.image_shape(model)
    if args.verb == "sample":
        images = pull.predict(model, None, mode="sample", num_samples=args.num, seed=args.seed,
                              prior=args.prior)
    else:
        inputs = np.concatenate([pull.read_images(path, shape, args.limit or 0) for path in args.input])
        if args.verb == "encode":
            _save(args.out, pull.predict(model, inputs, mode="encode"))
            print(f"latents: {args.out}")
            return 0
        if args.verb == "interpolate" and len(inputs) != 2:
            raise pull.PullError(f"vaegan interpolate: --input {' '.join(map(str, args.input))} holds {len(inputs)} "
                                 "images; allowed: exactly two (two --input images, or one input of two; --limit N "
                                 "keeps the first N of each input)")
        params = {"mode": "interpolate", "steps": args.steps} if args.verb == "interpolate" else {"mode": "reconstruct"}
        images = pull.predict(model, inputs, **params)
    nrow = len(images) if args.verb == "interpolate" else 8
    print(f"{args.verb}: {pull.write_images(images, args.out, nrow)} {tuple(images.shape)}")
    if getattr(args, "npy", None):
        _save(args.npy, images)
    return 0


def _save(path: Path, array) -> None:
    import numpy as np
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


class TrackingServerDown(UserError):
    """The tracking server in MLFLOW_TRACKING_URI does not answer at all."""


def check_tracking_server(model_uri: str, timeout: float = 5.0) -> None:
    """Fail at once, naming the server, when the http(s) MLFLOW_TRACKING_URI refuses connections, does not
    resolve or does not answer within ``timeout`` seconds. Any HTTP answer (even an error) means it is there;
    MLflow's own calls then say what is wrong. Stdlib only: this runs before torch and MLflow are imported."""
    import socket
    import urllib.error
    import urllib.parse
    import urllib.request
    configured = os.environ.get("MLFLOW_TRACKING_URI", "")
    parts = urllib.parse.urlsplit(configured)
    if parts.scheme not in ("http", "https"):
        return
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")  # no credentials
    try:
        urllib.request.urlopen(f"{bare}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except OSError as err:  # URLError is one; its reason is the socket's error
        reason = getattr(err, "reason", err)
        if isinstance(reason, (ConnectionError, TimeoutError, socket.gaierror)):
            raise TrackingServerDown(f"MLflow tracking server {bare} (MLFLOW_TRACKING_URI) does not answer "
                                     f"({reason}), so model {model_uri!r} cannot be loaded; allowed: "
                                     "MLFLOW_TRACKING_URI naming a running server") from err


def _user_error(err: BaseException) -> BaseException | None:
    """The user-facing error (a ``vaegan.errors.UserError``) inside ``err`` (Ray wraps a task's exception), if it
    is one. The base lives in a module of its own that imports nothing, so `vaegan --help` and a config mistake
    never wait seconds for torch or MLflow."""
    cause = getattr(err, "cause", None)
    if cause is not None:  # before isinstance: Ray's wrapper also subclasses the cause, but reads as a traceback
        return _user_error(cause)
    for failure in getattr(err, "worker_failures", {}).values():  # Ray Train: each failed worker's own error
        if _user_error(failure) is not None:
            return _user_error(failure)
    return err if isinstance(err, UserError) else None


def _interrupt(signum, frame) -> None:
    # `ray job stop` and schedulers send SIGTERM: unwind like Ctrl-C so the MLflow run is closed as failed.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    # With tqdm installed (Ray's progress bars need it) MLflow draws a bar on stderr for every model it
    # downloads or uploads: noise around the pull verbs' one-line errors, for models of a few MB.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    ray_was_up = _ray_is_up()
    try:
        if args.verb not in ("run", "sweep"):  # the pipeline's own client bounds its retries; these call MLflow directly
            check_tracking_server(args.model)  # before seconds of importing torch and MLflow
            from .tracking import bounded_retries
            bounded_retries()  # MLflow's default retries keep the caller of a dead server waiting ~4 minutes
        command = {"run": cmd_run, "sweep": cmd_sweep, "evaluate": cmd_evaluate}.get(args.verb, cmd_pull)
        return command(args)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume from the finished steps", file=sys.stderr)
        return 130
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None or args.debug:
            raise
        lines = [line.strip() for line in str(user_error).splitlines() if line.strip()]  # YAML's errors span lines
        if _ray_is_up() and not ray_was_up:
            # This call started or joined Ray, which forwards its workers' output here until it shuts down, and a
            # progress bar's last write ends with no newline: stop the forwarding, then give the error a line of
            # its own (in one CI run, no stderr line of a bad image folder's run began with "error: ").
            sys.modules["ray"].shutdown()
            print(file=sys.stderr)
        print(f"error: {'; '.join(lines)}", file=sys.stderr)
        return 2


def _ray_is_up() -> bool:
    """Whether this process is connected to Ray, without importing it (most verbs never do)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


if __name__ == "__main__":
    sys.exit(main())

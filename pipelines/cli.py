"""The ``vaegan`` command.

    vaegan run --config pipelines/configs/default.yaml [--set key=value ...] [--steps a,b] [--force STEP]
               [--run-dir DIR] [--dry-run] [--debug]

User mistakes (bad config, missing data, unreachable tracking server) end with one line on stderr
and exit code 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from vaegan.checkpoint import CheckpointError
from vaegan.config import ConfigError
from vaegan.data import DatasetError, DatasetNotFoundError
from vaegan.step import NonFiniteLossError

from .config import STEPS, load_config

USER_ERRORS = (ConfigError, DatasetError, DatasetNotFoundError, CheckpointError, NonFiniteLossError)


def _steps(text: str) -> list[str]:
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise argparse.ArgumentTypeError(f"unknown step {unknown[0] if unknown else text!r}; allowed: {', '.join(STEPS)}")
    return steps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaegan", description="Train VAE-GANs on Ray; pull them from MLflow.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run", help="execute the pipeline DAG (preprocess, tune, train, evaluate, register)")
    run.add_argument("--config", required=True, help="YAML config, e.g. pipelines/configs/smoke.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    run.add_argument("--steps", type=_steps, default=list(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    run.add_argument("--force", type=_steps, action="append", default=[], metavar="STEP",
                     help="rerun STEP and everything after it even if cached")
    run.add_argument("--run-dir", type=Path, help="run folder (default runs/<config name>)")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    run.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    from .pipeline import run_pipeline
    run_dir = args.run_dir or Path("runs") / cfg.name
    forced = {step for group in args.force for step in group}
    summary = run_pipeline(cfg, run_dir, args.steps, forced)
    print(json.dumps(summary, indent=2))
    print(f"summary: {run_dir / 'summary.json'}")
    return 0


def _user_error(err: BaseException) -> BaseException | None:
    """The user-facing error inside ``err`` (Ray wraps a task's exception), if it is one."""
    cause = getattr(err, "cause", None)
    if isinstance(err, USER_ERRORS):
        return err
    if cause is not None:
        return _user_error(cause)
    from .preprocess import PreprocessError
    from .tracking import TrackingError
    return err if isinstance(err, (TrackingError, PreprocessError)) else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run}[args.verb](args)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None or args.debug:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

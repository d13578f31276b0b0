"""Torch processes that share the cores: the train step alone, and two processes stepping at once.

The test suite keeps both cores busy (two test processes, each starting the CLI, Ray workers and servers),
and so does a user who runs two things on a small machine. torch's OpenMP threads spin for a while when they
wait for each other; with more threads than free cores they spin on the cores the other process needs.
Each setting below runs the same train-step loop (the config's nets and batch, no Ray) in ``processes`` fresh
processes started together, and records each one's seconds for the same number of steps:

  alone_2_threads        one process, OMP_NUM_THREADS=2 (torch's default on 2 cores): the reference
  two_at_once_2_threads  two processes, 2 threads each
  two_at_once_passive    two processes, 2 threads each, OMP_WAIT_POLICY=PASSIVE (no spinning)
  alone_1_thread         one process, OMP_NUM_THREADS=1
  two_at_once_1_thread   two processes, OMP_NUM_THREADS=1 each              what tests/conftest.py sets

``ratios`` gives each setting's step time (the slower process's) over ``alone_2_threads``'s.

Run from the repository root on an idle machine (no Ray; 5.5 min on 2 cores, most of it the 2-thread pair):
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/contention.py
    .venv/bin/python benchmarks/contention.py --quick     # 2 steps after 1: the layout, for the tests
Results: benchmarks/results/contention.json (--quick: contention_quick.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import common

SETTINGS = {  # name: (processes at once, environment added)
    "alone_2_threads": (1, {"OMP_NUM_THREADS": "2"}),
    "two_at_once_2_threads": (2, {"OMP_NUM_THREADS": "2"}),
    "two_at_once_passive": (2, {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}),
    "alone_1_thread": (1, {"OMP_NUM_THREADS": "1"}),
    "two_at_once_1_thread": (2, {"OMP_NUM_THREADS": "1"}),
}
WARMUP_STEPS = 5  # --quick: 1


def parse_args():
    p = common.argument_parser(__doc__)
    p.add_argument("--config", default="pipelines/configs/smoke.yaml", help="whose nets and batch (default smoke)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per process (default 150; --quick 2)")
    p.add_argument("--step-process", action="store_true", help=argparse.SUPPRESS)  # one loop, run by main
    args = p.parse_args()
    args.steps = args.steps or (2 if args.quick else 150)
    args.out = common.result_path(args, "contention")
    return args


def step_loop(config: str, steps: int, warmup: int) -> dict[str, Any]:
    """In a process of its own: ``steps`` train steps after a warm-up; its wall and CPU seconds."""
    import torch

    from vaegan.nets import build_nets
    from vaegan.step import VAEGANTrainer
    from pipelines.config import load_config  # not common.load_pipeline_config, which imports Ray: 3 s a process
    cfg = load_config(config, []).core()
    torch.manual_seed(cfg.train.seed)
    trainer = VAEGANTrainer(cfg, *build_nets(cfg.model))
    x = torch.rand(cfg.train.batch_size, cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    for _ in range(warmup):
        trainer.train_step(x)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step(x)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "torch_threads": torch.get_num_threads()}


def run_setting(args, processes: int, env: dict[str, str]) -> dict[str, Any]:
    """``processes`` step loops started together, with ``env`` added to each one's environment."""
    command = [sys.executable, __file__, "--step-process", "--config", args.config, "--steps", str(args.steps),
               *(["--quick"] if args.quick else [])]
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    procs = [subprocess.Popen(command, env={**base, **env}, stdout=subprocess.PIPE, text=True, cwd=common.REPO)
             for _ in range(processes)]
    loops = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a step process failed (exit {proc.returncode}): {command}")
        loops.append(json.loads(out.splitlines()[-1]))
    slowest = max(loop["seconds"] for loop in loops)
    return {"processes": processes, "env": env, "torch_threads": loops[0]["torch_threads"], "steps": args.steps,
            "seconds_per_process": [round(loop["seconds"], 2) for loop in loops],
            "cpu_seconds_per_process": [round(loop["cpu_seconds"], 2) for loop in loops],
            "ms_per_step": round(1000 * slowest / args.steps, 2)}


def main() -> None:
    args = parse_args()
    if args.step_process:
        print(json.dumps(step_loop(args.config, args.steps, 1 if args.quick else WARMUP_STEPS)), flush=True)
        return
    settings = {}
    for name, (processes, env) in SETTINGS.items():
        settings[name] = run_setting(args, processes, env)
        print(f"[contention] {name}: {settings[name]['ms_per_step']} ms/step, "
              f"{settings[name]['seconds_per_process']} s per process", flush=True)
    reference = settings["alone_2_threads"]["ms_per_step"]
    ratios = {f"{name}_over_alone_2_threads": common.ratio(s["ms_per_step"], reference)
              for name, s in settings.items() if name != "alone_2_threads"}
    from pipelines.config import load_config
    cfg = load_config(args.config, []).core()
    result = {"ratios": ratios, "settings": settings,
              "setup": {"config": args.config, "batch_size": cfg.train.batch_size, "kind": cfg.model.kind,
                        "base_channels": cfg.model.base_channels, "latent_dim": cfg.model.latent_dim,
                        "warmup_steps": 1 if args.quick else WARMUP_STEPS, "steps": args.steps}}
    common.print_table([(k, v) for k, v in ratios.items()])
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()

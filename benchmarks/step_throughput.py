"""Train-step throughput (images/s) of ``VAEGANTrainer`` for model.kind vaegan and vae.

Feeds a fixed in-memory batch tensor (no data loading) through ``train_step`` and times
``--steps`` steps after ``--warmup`` steps, synchronising CUDA around the timed region.
``--ddp`` wraps enc/dec/dis in DistributedDataParallel over a world of one process (nccl on
CUDA, gloo on CPU), as ``pipelines/train.py`` does, so the ``ddp_sync``/``no_sync`` path runs.

Run it from the repository root (prefix PYTHONPATH=. where the package is not installed):
    python benchmarks/step_throughput.py --device cuda --amp --ddp
    python benchmarks/step_throughput.py --device cpu --quick
Results go to benchmarks/results/step_throughput_<device>.json (``--out`` to change;
``--append`` keeps the results already in that file, so several invocations share one file).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vaegan.config import ModelConfig, TrainConfig, VAEGANConfig
from vaegan.nets import build_nets
from vaegan.step import VAEGANTrainer

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast (cfg.train.amp; only takes effect on CUDA)")
    p.add_argument("--ddp", action="store_true", help="wrap the nets in DDP over a world of size 1")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 1 warm-up, tiny nets and batch")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--append", action="store_true", help="keep the results already in --out")
    args = p.parse_args()
    if args.quick:
        args.image_size, args.base_channels, args.batch_size, args.steps, args.warmup = 28, 8, 8, 3, 1
    args.out = args.out or RESULTS / f"step_throughput_{args.device}.json"
    return args


def init_ddp(device: torch.device) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def wrap(module: torch.nn.Module | None, device: torch.device) -> torch.nn.Module | None:
    """Same wrapping as pipelines/train.py's ``_ddp``."""
    if module is None:
        return None
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(kind: str, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = VAEGANConfig(model=ModelConfig(kind=kind, image_size=args.image_size, channels=args.channels,
                                         base_channels=args.base_channels),
                       train=TrainConfig(batch_size=args.batch_size, amp=args.amp))
    cfg.validate()
    torch.manual_seed(0)
    nets = [m.to(device) if m is not None else None for m in build_nets(cfg.model)]
    if args.ddp:
        nets = [wrap(m, device) for m in nets]
    trainer = VAEGANTrainer(cfg, *nets)
    shape = (args.batch_size, args.channels, args.image_size, args.image_size)
    data = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0)).to(device)  # (4, B, C, H, W) in [0, 1]
    for i in range(args.warmup):
        trainer.train_step(data[i % len(data)])
    sync(device)
    start = time.perf_counter()
    for i in range(args.steps):
        metrics = trainer.train_step(data[i % len(data)])
    sync(device)
    seconds = time.perf_counter() - start
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    return {"kind": kind, "amp": bool(args.amp and device.type == "cuda"), "ddp": args.ddp,
            "images_per_s": round(args.steps * args.batch_size / seconds, 1),
            "step_ms": round(1000 * seconds / args.steps, 2),
            "image_size": args.image_size, "channels": args.channels, "base_channels": args.base_channels,
            "batch_size": args.batch_size, "steps": args.steps,
            "nonfinite_skipped": trainer.counters["nonfinite_skipped"], "nonfinite_metrics": bad,
            "last_losses": {k: round(v, 4) for k, v in metrics.items() if k.startswith("loss/")}}


def machine(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                         if line.startswith("model name")), name)
    return {"device": device.type, "device_name": name, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__}


def main() -> None:
    args = parse_args()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if args.ddp:
        init_ddp(device)
    try:
        results = [bench(kind, args, device) for kind in ("vaegan", "vae")]
    finally:
        if args.ddp:
            dist.destroy_process_group()
    print(f"{'kind':<7} {'px':>3} {'C':>2} {'base':>4} {'batch':>5} {'amp':>5} {'ddp':>5} "
          f"{'images/s':>10} {'step ms':>9} {'nan-skips':>9}")
    for r in results:
        print(f"{r['kind']:<7} {r['image_size']:>3} {r['channels']:>2} {r['base_channels']:>4} {r['batch_size']:>5} "
              f"{str(r['amp']):>5} {str(r['ddp']):>5} {r['images_per_s']:>10.1f} {r['step_ms']:>9.2f} "
              f"{r['nonfinite_skipped']:>9}")
    if args.append and args.out.exists():
        results = json.loads(args.out.read_text())["results"] + results
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"machine": machine(device), "config": config, "results": results,
              "nonfinite_skipped": sum(r["nonfinite_skipped"] for r in results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

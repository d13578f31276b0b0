"""Train-step throughput (images/s) of one VAE-GAN config, four ways in one run:

  bare            ``VAEGANTrainer`` steps in a plain PyTorch loop over an in-memory uint8 tensor
                  (``vaegan.loop.fit``), at torch's default thread count and again at the Ray Train
                  worker's (Ray sets a worker's OMP_NUM_THREADS to its CPUs: 1);
  ray_train_1w    the product's ``pipelines.training.fit`` (its ``train_loop_per_worker`` reading Ray Data
                  shards of the Parquet train split that the product's preprocess step wrote), tracking off;
  ray_train_2w    the same with 2 workers, each network in its own DDP over gloo (NCCL with --device cuda);
  pythae          pythae's VAE-GAN trainer with the same nets (benchmarks/pythae_peer.py, own virtualenv), as
                  shipped; then again as ``pythae_same_allocator``, with the malloc thresholds our loop sets
                  (``vaegan/allocator.py``), which any PyTorch loop on glibc could set as well.
  bare_vae        the bare loop again with ``model.kind=vae``: a plain VAE step on the same encoder and decoder.
  bare_ray_up     with ``bare``: the bare loop in this process while the Ray of the Ray Train parts is still up
                  and idle (its raylet, GCS, dashboard and agents), once the machine has gone quiet after those
                  runs (``settled_after_s``), before Ray shuts down: what Ray's own idle processes take from a
                  2-thread loop on the same cores, apart from anything Ray Train does (``ray_actors_alive``:
                  the actors still up as it ends; no Train run's controller is among them).

Beside the images/s, the step's FLOPs against its floor and the machine's fp32 GFLOP/s (a 2048^3 matmul
and the step's costliest convolution) come from benchmarks/flops.py, measured in the same run, so that
``fraction_of_peak`` (the step's achieved GFLOP/s over each) compares figures taken minutes apart.

Every ``images_per_s`` is steady state: images over seconds of the epochs after the first, from the
per-epoch figure each loop reports (``vaegan.loop.EpochMeter``; pythae: its epoch time), so start-up
is excluded; Ray's ``wall_seconds`` includes it (worker group start, Ray Data, per-epoch validation
and checkpoints). The nets, batch size and data are the config's (default: the main job's).
All parts run in turn ``--rounds`` times (default 3); each part's ``images_per_s`` is the median over its
rounds (each round's figure in ``rounds_images_per_s``); each ratio is the median of the ratios of the
parts' figures within one round (``ratios_by_round``), so it need not equal the ratio of two medians.

Run from the repository root, under the shared Ray lock:
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/throughput.py            # about 10 min on 2 cores
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/throughput.py --quick    # smoke config, tests
    .venv/bin/python benchmarks/throughput.py --device cuda --parts bare --ddp      # the bare step on a GPU
Results: benchmarks/results/throughput.json (--quick: throughput_quick.json; --out to change).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import common
import flops
import torch
import torch.distributed as dist

PARTS = ("bare", "ray_train_1w", "ray_train_2w", "pythae", "bare_vae")
# The result's blocks in print and JSON order: the parts, with the runs some of them add beside them.
BLOCKS = ("bare", "bare_at_worker_threads", "bare_ray_up", "ray_train_1w", "ray_train_2w", "pythae",
          "pythae_same_allocator", "bare_vae")


def parse_args():
    p = common.argument_parser(__doc__)
    p.add_argument("--config", default=None, help="pipeline config (default pipelines/configs/default.yaml; "
                                                  "--quick: smoke.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--images", type=int, default=None, help="training images per epoch (default 3200; --quick 256)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per measurement, the first is warm-up (default 3)")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)} "
                                                 "(default all; --quick leaves out ray_train_2w and pythae)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the bare loop on GPU 0 and Ray Train with use_gpu")
    p.add_argument("--ddp", action="store_true", help="bare loop: wrap the nets in DDP over a world of one")
    p.add_argument("--rounds", type=int, default=None, help="times every part runs, in turn; each figure is the "
                                                            "median over the rounds (default 3; --quick 1)")
    args = p.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.config = args.config or f"pipelines/configs/{'smoke' if args.quick else 'default'}.yaml"
    args.images = args.images or (256 if args.quick else 3200)
    args.epochs = args.epochs or (2 if args.quick else 3)
    # --quick keeps one Ray Train run: each costs ~20 s of start-up, and the suite runs 2-worker DDP elsewhere.
    default_parts = [p for p in PARTS if not (args.quick and p in ("ray_train_2w", "pythae"))]
    args.parts = args.parts.split(",") if args.parts else default_parts
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown --parts {sorted(unknown)}; allowed: {', '.join(PARTS)}")
    args.out = common.result_path(args, "throughput")
    return args


# -- the measurements --------------------------------------------------------------------------------


def loop_figures(history: list[dict[str, float]]) -> dict[str, Any]:
    return {"images_per_s": round(common.steady_images_per_s(history), 1),
            "per_epoch_images_per_s": [round(h["images_per_s"], 1) for h in history], "epochs": len(history)}


def bare(cfg, images: torch.Tensor, epochs: int, device: torch.device, threads: int, ddp: bool) -> dict[str, Any]:
    """The train step in a plain loop; ``cfg`` is a ``vaegan.config.VAEGANConfig``."""
    from pipelines.worker import ddp as wrap_ddp  # the product's own per-network DDP wrapping
    from vaegan.loop import fit
    from vaegan.nets import build_nets
    from vaegan.step import VAEGANTrainer
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    nets = [m.to(device) if m is not None else None for m in build_nets(cfg.model)]
    if ddp:
        nets = [wrap_ddp(m, device) for m in nets]
    trainer = VAEGANTrainer(cfg, *nets)
    history = fit(trainer, images, epochs, cfg.train.batch_size, cfg.train.seed,
                  log=lambda line: print(f"[bare, {threads} threads] {line}", flush=True))
    return {"torch_threads": torch.get_num_threads(), "device": device.type, "ddp": ddp,
            "amp": cfg.train.amp and device.type == "cuda", **loop_figures(history),
            "nonfinite_skipped": trainer.all_counters()["nonfinite_skipped"]}


def ray_train(cfg, data: common.PreparedData, workers: int, images: int, storage: Path) -> dict[str, Any]:
    """One run of the product's Ray Train path; figures from the per-epoch summaries it checkpoints.
    The workers share the machine's CPUs (``train.cpus_per_worker``), as the bare loop's threads do."""
    from dataclasses import replace

    from pipelines import training
    cpus = max(1, (os.cpu_count() or 1) // workers)
    run_cfg = replace(cfg, train=replace(cfg.train, num_workers=workers, cpus_per_worker=cpus))
    start = time.perf_counter()
    result = training.fit(run_cfg, str(data.dir), data.image_shape, data.featnet_path, name=f"throughput-{workers}w",
                          storage=str(storage), train_limit=images).result
    wall = time.perf_counter() - start
    history = checkpointed_history(result)
    trained = sum(h["images_per_s"] * h["epoch_seconds"] for h in history)
    return {"workers": workers, "torch_threads": int(history[-1]["torch_threads"]), **loop_figures(history),
            "wall_seconds": round(wall, 1), "wall_images_per_s": round(trained / wall, 1),
            "nonfinite_skipped": int(history[-1]["guard/nonfinite_skipped"])}


def checkpointed_history(result) -> list[dict[str, float]]:
    """Every epoch's summary, from the latest checkpoint (the worker stores the history in each one)."""
    from vaegan.checkpoint import CHECKPOINT_NAME, load_checkpoint
    with result.checkpoint.as_directory() as folder:
        return json.loads(load_checkpoint(Path(folder) / CHECKPOINT_NAME)["history"])


def pythae(cfg, data: common.PreparedData, images: int, epochs: int, keep_step_memory: bool) -> dict[str, Any]:
    from dataclasses import asdict
    out = common.run_pythae(["--data", str(data.dir), "--config-json", json.dumps(asdict(cfg)),
                             "--epochs", str(epochs), "--images", str(images), "--seed", str(cfg.train.seed),
                             *(["--keep-step-memory"] if keep_step_memory else [])])
    return {"torch_threads": out["torch_threads"], "pythae": out["pythae"], "kept_step_memory": out["kept_step_memory"],
            **loop_figures(out["epochs"]),
            "update_fractions": out["update_fractions"],
            "all_updates_step_flops_per_image": round(out["all_updates_step_flops"] / cfg.train.batch_size)}


def init_single_process_group(device: torch.device) -> None:
    """A DDP world of one (gloo on CPU, NCCL on CUDA), so the bare loop can run the DDP path."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


# -- the run -----------------------------------------------------------------------------------------


def measure_ray(args, cfg, parts: dict[str, Any], scratch: Path) -> common.PreparedData:
    """Prepare the data and run the Ray Train parts, in one Ray session (``common.pipeline_ray``)."""
    with common.pipeline_ray():
        data = common.prepare_data(cfg, args.work_dir / "data")
        for workers in (1, 2):
            name = f"ray_train_{workers}w"
            if name not in args.parts:
                parts[name] = {"skipped": "--quick" if args.quick else "not in --parts"}
            elif cfg.train.use_gpu and torch.cuda.device_count() < workers:
                parts[name] = {"skipped": f"{workers} workers need {workers} GPUs, found {torch.cuda.device_count()}"}
            else:
                parts[name] = ray_train(cfg, data, workers, args.images, scratch / "ray")
        if "bare" in args.parts and args.device == "cpu" and not args.ddp:
            # --quick (the tests) does not wait: the suite's other worker keeps the machine busy.
            settled_after_s = wait_until_idle(most_s=0 if args.quick else 60)
            parts["bare_ray_up"] = {**bare(cfg.core(), train_images(args, data), args.epochs, torch.device("cpu"),
                                           torch.get_num_threads(), ddp=False), "settled_after_s": settled_after_s,
                                    "ray_actors_alive": ray_actors_alive()}
    return data


def wait_until_idle(most_s: int, busy_percent: float = 10.0) -> int | None:
    """Seconds until the machine's CPUs are less than ``busy_percent`` busy over one second; None if they were
    not within ``most_s``. After a Train run Ray tears its actors down and starts fresh idle workers, seconds
    of CPU on 2 cores; ``bare_ray_up`` waits for that to end, so that it measures an idle Ray, not Ray
    cleaning up."""
    import psutil  # ray/thirdparty_files, on sys.path once ray is imported
    for second in range(most_s):
        if psutil.cpu_percent(interval=1.0) < busy_percent:
            return second + 1
    return None


def ray_actors_alive() -> list[str]:
    """The classes of the actors alive in this Ray now (Ray Data's and Ray Train's own among them)."""
    from ray.util.state import list_actors
    return sorted(actor.class_name for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000))


def train_images(args, data: common.PreparedData) -> torch.Tensor:
    """The first ``--images`` rows of the preprocessed train split, uint8 (N, C, H, W)."""
    from vaegan.imagerows import read_split
    return torch.from_numpy(read_split(data.dir / "split=train", data.image_shape, limit=args.images)[0])


def measure_bare(args, cfg, data: common.PreparedData, parts: dict[str, Any]) -> None:
    """The bare loop at torch's default thread count and at the Ray Train worker's."""
    if "bare" not in args.parts:
        parts["bare"] = {"skipped": "not in --parts"}
        return
    images = train_images(args, data)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if args.ddp:
        init_single_process_group(device)
    try:
        default_threads = torch.get_num_threads()
        parts["bare"] = bare(cfg.core(), images, args.epochs, device, default_threads, args.ddp)
        worker_threads = parts.get("ray_train_1w", {}).get("torch_threads")
        if worker_threads and device.type == "cpu":
            parts["bare_at_worker_threads"] = bare(cfg.core(), images, args.epochs, device, worker_threads, args.ddp)
        torch.set_num_threads(default_threads)
        if "bare_vae" in args.parts:
            vae = replace(cfg.core(), model=replace(cfg.core().model, kind="vae"))
            parts["bare_vae"] = bare(vae, images, args.epochs, device, default_threads, args.ddp)
        else:
            parts["bare_vae"] = {"skipped": "not in --parts"}
    finally:
        if args.ddp:
            dist.destroy_process_group()


def compute_figures(cfg, parts: dict[str, Any], device: str, quick: bool) -> dict[str, Any]:
    """The step's FLOPs against its floor, the machine's fp32 peak, and the fraction of it the bare step reaches."""
    step = flops.step_figures(cfg.core())
    if device != "cpu":
        skipped = {"skipped": f"the peak is measured on the CPU; the step ran on {device}"}
        return {"flops": step, "step_flops_per_image": step["step_flops_per_image"], "machine_gflops": skipped,
                "fraction_of_peak": {**skipped, "of_matmul": None}}
    peak = flops.machine_gflops(cfg.core(), quick)
    achieved = (parts["bare"].get("images_per_s") or 0) * step["step_flops_per_image"] / 1e9
    fraction = {"step_gflops": round(achieved, 1),
                "of_matmul": common.ratio(achieved, peak["matmul"]),
                "of_conv_forward_backward": common.ratio(achieved, peak["conv_forward_backward"])}
    return {"flops": step, "step_flops_per_image": step["step_flops_per_image"], "machine_gflops": peak,
            "fraction_of_peak": fraction}


def ratios(parts: dict[str, Any], figures: dict[str, Any]) -> dict[str, float | None]:
    def ips(name: str) -> float | None:
        return parts.get(name, {}).get("images_per_s")

    return {"ray_train_1w_over_bare": common.ratio(ips("ray_train_1w"), ips("bare")),
            "ray_train_1w_over_bare_at_worker_threads": common.ratio(ips("ray_train_1w"), ips("bare_at_worker_threads")),
            "ray_train_1w_over_bare_ray_up": common.ratio(ips("ray_train_1w"), ips("bare_ray_up")),
            "bare_ray_up_over_bare": common.ratio(ips("bare_ray_up"), ips("bare")),
            "ddp_2w_over_1w": common.ratio(ips("ray_train_2w"), ips("ray_train_1w")),
            "pythae_over_bare": common.ratio(ips("pythae"), ips("bare")),
            "ours_over_pythae": common.ratio(ips("bare"), ips("pythae")),
            "ours_over_pythae_same_allocator": common.ratio(ips("bare"), ips("pythae_same_allocator")),
            # Step time over step time: the VAE's images/s over the VAE-GAN's, at the same batch.
            "vaegan_over_vae_step_time": common.ratio(ips("bare_vae"), ips("bare")),
            "floor_vaegan_over_vae_flops": figures["flops"]["floor_over_vae_flops"],
            "step_over_floor_flops": figures["flops"]["step_over_floor_flops"],
            "fraction_of_peak": figures["fraction_of_peak"]["of_matmul"]}


def measure_round(args, cfg, scratch: Path) -> tuple[dict[str, Any], common.PreparedData]:
    """Every part once, in turn: the Ray Train runs (and bare_ray_up), the bare loops, pythae."""
    parts: dict[str, Any] = {}
    data = measure_ray(args, cfg, parts, scratch)  # Ray is shut down before the bare loop runs (bare_ray_up aside)
    measure_bare(args, cfg, data, parts)
    for name, keep in (("pythae", False), ("pythae_same_allocator", True)):
        parts[name] = pythae(cfg.core(), data, args.images, args.epochs, keep) if "pythae" in args.parts else \
            {"skipped": "--quick" if args.quick else "not in --parts"}
    return parts, data


def median_parts(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each part as its last round ran it, but with ``images_per_s`` the median over the rounds, beside each
    round's figure (``rounds_images_per_s``) and per-epoch figures. On a shared 2-core box a slow spell of
    seconds to minutes moved one run's figures by 15 %; parts run in turn, so a spell falls on one round of
    each part, not on every round of one."""
    combined = {}
    for name, last in rounds[-1].items():
        if "images_per_s" not in last:
            combined[name] = last
            continue
        per_round = [parts[name]["images_per_s"] for parts in rounds]
        combined[name] = {**last, "images_per_s": round(statistics.median(per_round), 1),
                          "rounds_images_per_s": per_round,
                          "per_epoch_images_per_s": [parts[name]["per_epoch_images_per_s"] for parts in rounds]}
    return combined


def median_ratios(by_round: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Each ratio's median over the rounds: a ratio of two parts of one round compares figures minutes apart,
    where the medians of the parts over all rounds would compare a slow spell's round with a fast one's."""
    medians = {}
    for key in by_round[0]:
        values = [r[key] for r in by_round if r[key] is not None]
        medians[key] = round(statistics.median(values), 3) if values else None
    return medians


def main() -> None:
    args = parse_args()
    settings = [f"train.epochs={args.epochs}", "train.patience=0", "train.val_images=64",
                f"train.use_gpu={str(args.device == 'cuda').lower()}"]
    cfg = common.load_pipeline_config(args.config, [*settings, *args.overrides])
    args.work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="throughput-", dir=args.work_dir))
    try:
        rounds = [measure_round(args, cfg, scratch / f"round-{i}") for i in range(args.rounds)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    data = rounds[0][1]
    parts = median_parts([round_parts for round_parts, _ in rounds])
    figures = compute_figures(cfg, parts, args.device, args.quick)
    ordered = {name: parts[name] for name in BLOCKS if name in parts}
    by_round = [ratios(round_parts, figures) for round_parts, _ in rounds]
    result = {"ratios": median_ratios(by_round), "ratios_by_round": by_round, **ordered, **figures,
              "setup": {"config": args.config, "overrides": args.overrides, "images_per_epoch": args.images,
                        "epochs": args.epochs, "batch_size": cfg.train.batch_size, "kind": cfg.model.kind,
                        "image_shape": data.image_shape, "base_channels": cfg.model.base_channels,
                        "latent_dim": cfg.model.latent_dim, "steady_state": "epochs after the first",
                        "rounds": args.rounds}}
    rows = [(name, f"{p['images_per_s']:.1f} images/s ({p['torch_threads']} threads)" if "images_per_s" in p
             else p.get("skipped")) for name, p in ordered.items()]
    common.print_table(rows + [(k, v) for k, v in result["ratios"].items()])
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()

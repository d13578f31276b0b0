"""What each speed lever buys the train step, measured one at a time in one run on the same batch.

Variants of the bare ``VAEGANTrainer.train_step`` (no Ray, no data loading), run in interleaved rounds so
that a slow spell of the machine hits every variant alike; each figure is the median over the rounds:

  previous_step     the step before the FLOP-floor rewrite (``vaegan/step.py`` at --previous-commit, read
                    with ``git show``): three phases, each with its own forwards;
  unfused_adam      today's step with the Adam of before (``fused=False``: a Python loop over tensors);
  floor_step        today's step: the FLOP floor, fused Adam, the product's default (the baseline of the ratios);
  channels_last     floor_step with the nets and the batch in channels_last memory format;
  compiled          floor_step with each network under ``torch.compile`` (compile seconds reported apart).

The allocator (``vaegan/allocator.py``, which the training loop applies once per process, so floor_step and
every variant above run with it) is process-wide and one-way, so its comparison runs in fresh child
processes, alternating: floor_step with glibc's default malloc thresholds (``glibc_default_allocator``)
against floor_step with the loop's, each child timing the same steps and counting its minor page faults.

Each variant's ``step_flops`` (benchmarks/flops.py's counter, one step) sits beside its speed.
Then the per-epoch validation's pieces (``pipelines/worker.py``): rebuilding the model through the checkpoint
format, and the metrics under ``torch.no_grad`` against ``torch.inference_mode``; and one Adam step of the
decoder, fused against unfused, alone.

Run from the repository root (no Ray; about 3 minutes on 2 cores):
    .venv/bin/python benchmarks/step_options.py
    .venv/bin/python benchmarks/step_options.py --quick      # smoke nets, a few rounds (tests)
Results: benchmarks/results/step_options.json (--quick: step_options_quick.json).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import common
import flops
import torch

import vaegan
from vaegan import metrics
from vaegan.allocator import keep_step_memory
from vaegan.checkpoint import checkpoint_payload
from vaegan.config import VAEGANConfig
from vaegan.inference import GenerativeModel
from vaegan.nets import build_nets
from vaegan.step import VAEGANTrainer

PREVIOUS_COMMIT = "aa6502b"  # the last commit with the three-phase step


def previous_step_module(commit: str) -> types.ModuleType:
    """``vaegan/step.py`` as it was at ``commit``, importable beside today's (it uses relative imports)."""
    source = subprocess.run(["git", "show", f"{commit}:vaegan/step.py"], cwd=common.REPO, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("vaegan._previous_step")
    module.__package__ = "vaegan"
    module.__file__ = f"vaegan/step.py@{commit}"
    sys.modules[module.__name__] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def previous_config(cfg: VAEGANConfig) -> types.SimpleNamespace:
    """``cfg`` as the previous step reads it: that commit's step also read the NaN-injection keys, which have
    since moved out of the product config (into tests/hooks); off, as they always were outside tests."""
    train = types.SimpleNamespace(**vars(cfg.train), inject_nonfinite_from=-1, inject_nonfinite_steps=0)
    return types.SimpleNamespace(**{**vars(cfg), "train": train})


def trainer_factories(cfg: VAEGANConfig, commit: str) -> dict[str, Callable[[], tuple[VAEGANTrainer, Callable]]]:
    """Each variant: a trainer, and the function that turns a float batch into that variant's input."""
    def nets(memory_format=torch.contiguous_format):
        torch.manual_seed(cfg.train.seed)
        return [net.to(memory_format=memory_format) for net in build_nets(cfg.model)]

    def unfused(module, opt_cfg):
        return torch.optim.Adam(vaegan.step.unwrap(module).parameters(), lr=opt_cfg.lr,
                                betas=(opt_cfg.beta1, opt_cfg.beta2), weight_decay=opt_cfg.weight_decay, fused=False)

    def with_optimizer(factory):
        original = vaegan.step.make_optimizer
        vaegan.step.make_optimizer = factory
        try:
            return VAEGANTrainer(cfg, *nets())
        finally:
            vaegan.step.make_optimizer = original

    same = (lambda x: x)
    return {
        "previous_step": lambda: (previous_step_module(commit).VAEGANTrainer(previous_config(cfg), *nets()), same),
        "unfused_adam": lambda: (with_optimizer(unfused), same),
        "floor_step": lambda: (VAEGANTrainer(cfg, *nets()), same),
        "channels_last": lambda: (VAEGANTrainer(cfg, *nets(torch.channels_last)),
                                  lambda x: x.contiguous(memory_format=torch.channels_last)),
        "compiled": lambda: (VAEGANTrainer(cfg, *[torch.compile(net) for net in nets()]), same),
    }


def one_batch(cfg: VAEGANConfig) -> torch.Tensor:
    """The batch every variant steps on: uniform pixels, seeded."""
    m = cfg.model
    return torch.rand(cfg.train.batch_size, m.channels, m.image_size, m.image_size,
                      generator=torch.Generator().manual_seed(0))


def measure_steps(cfg: VAEGANConfig, commit: str, rounds: int, steps: int) -> dict[str, Any]:
    x = one_batch(cfg)
    variants, warmup = {}, {}
    for name, factory in trainer_factories(cfg, commit).items():
        start = time.perf_counter()
        trainer, prepare = factory()
        for _ in range(3):  # the first steps allocate optimiser state (and compile)
            trainer.train_step(prepare(x))
        warmup[name] = time.perf_counter() - start
        variants[name] = (trainer, prepare(x))
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (trainer, batch) in variants.items():
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(batch)
            seconds[name].append((time.perf_counter() - start) / steps)
    figures = {name: {"images_per_s": round(cfg.train.batch_size / statistics.median(s), 1),
                      "best_images_per_s": round(cfg.train.batch_size / min(s), 1),
                      "first_3_steps_seconds": round(warmup[name], 2),
                      # Counting under a dispatch mode would make dynamo trace the compiled nets afresh.
                      "step_flops": None if name == "compiled" else
                      flops.count(lambda: variants[name][0].train_step(variants[name][1]))}
               for name, s in seconds.items()}
    base = figures["floor_step"]["images_per_s"]
    for figure in figures.values():
        figure["over_floor_step"] = common.ratio(figure["images_per_s"], base)
    return figures


def allocator_child(cfg: VAEGANConfig, keep: bool, steps: int) -> dict[str, float]:
    """In a fresh process: floor_step's images/s and minor page faults per step, with or without the loop's
    allocator setting."""
    if keep:
        keep_step_memory()
    x = one_batch(cfg)
    torch.manual_seed(cfg.train.seed)
    trainer = VAEGANTrainer(cfg, *build_nets(cfg.model))
    for _ in range(3):
        trainer.train_step(x)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x)
    seconds = time.perf_counter() - start
    return {"images_per_s": cfg.train.batch_size * steps / seconds,
            "minor_faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps}


def measure_allocator(config: str, rounds: int, steps: int) -> dict[str, Any]:
    """glibc's default malloc thresholds against the loop's, one fresh child process per sample, alternating."""
    samples: dict[str, list[dict[str, float]]] = {"glibc_default_allocator": [], "floor_step": []}
    for _ in range(rounds):
        for name, mode in (("glibc_default_allocator", "default"), ("floor_step", "keep")):
            out = subprocess.run([sys.executable, __file__, "--config", config, "--steps", str(steps),
                                  "--allocator-child", mode], check=True, capture_output=True, text=True,
                                 cwd=common.REPO).stdout
            samples[name].append(json.loads(out.strip().splitlines()[-1]))
    figures = {name: {key: round(statistics.median(s[key] for s in runs), 1) for key in runs[0]}
               for name, runs in samples.items()}
    return {**figures, "glibc_default_allocator_over_floor_step": common.ratio(
        figures["glibc_default_allocator"]["images_per_s"], figures["floor_step"]["images_per_s"]),
        "children_per_side": rounds, "steps_per_child": steps}


def measure_validation(cfg: VAEGANConfig, images: int, repeats: int) -> dict[str, Any]:
    """The per-epoch validation's model rebuild and metric passes (ELBO, samples), timed per call."""
    torch.manual_seed(cfg.train.seed)
    trainer = VAEGANTrainer(cfg, *build_nets(cfg.model))
    m = cfg.model
    val = torch.rand(images, m.channels, m.image_size, m.image_size, generator=torch.Generator().manual_seed(1))

    def rebuild() -> GenerativeModel:
        return GenerativeModel.from_checkpoint(checkpoint_payload(trainer))

    model = rebuild()

    def passes() -> None:
        metrics.elbo(model.enc, model.dec, val, generator=torch.Generator().manual_seed(0))
        model.dec.generate(torch.randn(images, m.latent_dim))

    def timed(fn: Callable[[], Any], context: Callable[[], Any]) -> float:
        samples = []
        for _ in range(repeats):
            with context():
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
        return round(statistics.median(samples), 4)

    no_grad = timed(passes, torch.no_grad)
    inference = timed(passes, torch.inference_mode)
    return {"images": images, "rebuild_model_seconds": timed(rebuild, torch.no_grad),
            "elbo_and_samples_no_grad_seconds": no_grad, "elbo_and_samples_inference_mode_seconds": inference,
            "inference_mode_over_no_grad_time": common.ratio(inference, no_grad)}


def measure_adam(cfg: VAEGANConfig, steps: int) -> dict[str, Any]:
    """One Adam step over the decoder's parameters, fused against the per-tensor loop, in milliseconds."""
    figures = {}
    for fused in (True, False):
        torch.manual_seed(cfg.train.seed)
        params = list(build_nets(cfg.model)[1].parameters())
        for param in params:
            param.grad = torch.randn_like(param)
        opt = torch.optim.Adam(params, lr=1e-4, fused=fused)
        opt.step()  # allocates the state
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            samples.append((time.perf_counter() - start) / steps)
        figures["fused_ms" if fused else "unfused_ms"] = round(statistics.median(samples) * 1e3, 3)
    figures["fused_over_unfused_time"] = common.ratio(figures["fused_ms"], figures["unfused_ms"])
    return figures


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--config", default=None, help="pipeline config (default: the main job's; --quick: smoke)")
    parser.add_argument("--previous-commit", default=PREVIOUS_COMMIT, help="where previous_step's step.py comes from")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 8; --quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per variant per round (default 10; --quick 2)")
    parser.add_argument("--allocator-child", choices=["default", "keep"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = args.config or f"pipelines/configs/{'smoke' if args.quick else 'default'}.yaml"
    rounds, steps = args.rounds or (2 if args.quick else 8), args.steps or (2 if args.quick else 10)
    cfg = common.load_pipeline_config(config, []).core()
    if args.allocator_child:
        print(json.dumps(allocator_child(cfg, args.allocator_child == "keep", steps)))
        return
    args.out = common.result_path(args, "step_options")
    allocator = measure_allocator(config, rounds=max(2, rounds // 2), steps=3 * steps)
    keep_step_memory()  # the product's training loop does so; every variant below runs with it
    steps_figures = measure_steps(cfg, args.previous_commit, rounds, steps)
    validation = measure_validation(cfg, images=128 if args.quick else 1000, repeats=3 if args.quick else 5)
    adam = measure_adam(cfg, steps=20 if args.quick else 200)
    result = {"ratios": {f"{name}_over_floor_step": f["over_floor_step"] for name, f in steps_figures.items()
                         if name != "floor_step"}
              | {"inference_mode_over_no_grad_time": validation["inference_mode_over_no_grad_time"],
                 "fused_adam_over_unfused_time": adam["fused_over_unfused_time"],
                 "glibc_default_allocator_over_floor_step": allocator["glibc_default_allocator_over_floor_step"]},
              "variants": steps_figures, "allocator": allocator, "validation": validation, "adam_decoder_step": adam,
              "setup": {"config": config, "previous_commit": args.previous_commit, "rounds": rounds,
                        "steps_per_round": steps, "batch_size": cfg.train.batch_size,
                        "torch_threads": torch.get_num_threads(), "statistic": "median over rounds"}}
    common.print_table([(name, f"{f['images_per_s']} images/s ({f['over_floor_step']}x)")
                        for name, f in steps_figures.items()]
                       + [(f"allocator: {name}", value) for name, value in allocator.items()]
                       + list(validation.items()) + list(adam.items()))
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()

"""FLOPs of the train step against its floor, and this machine's measured fp32 GFLOP/s.

Counts are torch's own (``torch.utils.flop_counter.FlopCounterMode``): matmuls and convolutions,
forward and backward, where a backward convolution counts its input gradient and its weight gradient
only when autograd asks for them. Element-wise work (activations, norms, the optimiser) is not counted.

The floor of Larsen et al.'s step, for a batch of B images:
  forward   enc on B; dec on B reconstructions and B prior samples; dis on B real, B reconstructed and
            B prior images;
  enc loss  input gradients through dis (reconstructions, Dis_l features only) and dec (B), then the
            encoder's weight gradients;
  dec loss  input gradients through dis (2B), then the decoder's weight gradients (2B);
  dis loss  the discriminator's weight gradients (3B).
A backward that trains a network computes its weight gradients and the input gradients between its
layers, not the gradient of its own input, which no loss needs. R1 and WGAN-GP add double-backward work
on top of this floor; they are off in the default config.

Run from the repository root (no Ray; about 20 s):
    .venv/bin/python benchmarks/flops.py                 # the main job's nets and batch
    .venv/bin/python benchmarks/flops.py --quick         # the smoke config
Results: benchmarks/results/flops.json (--quick: flops_quick.json). ``benchmarks/throughput.py`` uses the
same functions and reports the fraction of the measured peak that the step reaches.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import common
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vaegan.config import VAEGANConfig
from vaegan.nets import build_nets
from vaegan.step import VAEGANTrainer


def count(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls and convolutions that ``fn`` runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _outputs(out: Any, features_only: bool) -> torch.Tensor:
    """A scalar to backpropagate from a net's output; the discriminator returns (logits, Dis_l features)."""
    if isinstance(out, tuple):
        return out[1].sum() if features_only else out[0].sum() + out[1].sum()
    return out.sum()


def forward_flops(net: nn.Module, inputs: torch.Tensor) -> int:
    with torch.no_grad():
        return count(lambda: net(inputs))


def input_gradient_flops(net: nn.Module, inputs: torch.Tensor, features_only: bool = False) -> int:
    """Backward FLOPs of a gradient that only passes through ``net`` (its parameters frozen)."""
    net.requires_grad_(False)
    leaf = inputs.detach().requires_grad_(True)
    out = _outputs(net(leaf), features_only)
    return count(out.backward)


def weight_gradient_flops(net: nn.Module, inputs: torch.Tensor) -> int:
    """Backward FLOPs of training ``net``: weight gradients and the input gradients between its layers."""
    net.requires_grad_(True)
    out = _outputs(net(inputs.detach()), features_only=False)
    flops = count(out.backward)
    net.requires_grad_(False)
    net.zero_grad(set_to_none=True)
    return flops


def floor_flops(cfg: VAEGANConfig, batch: int) -> dict[str, int]:
    """The VAE-GAN step's floor for ``batch`` images, by part (see the module docstring)."""
    enc, dec, dis = build_nets(replace(cfg.model, kind="vaegan"))
    m = cfg.model
    x = torch.rand(batch, m.channels, m.image_size, m.image_size)
    z = torch.randn(batch, m.latent_dim)
    parts = {
        "forward": forward_flops(enc, x) + 2 * forward_flops(dec, z) + 3 * forward_flops(dis, x),
        "enc_loss_backward": (input_gradient_flops(dis, x, features_only=True) + input_gradient_flops(dec, z)
                              + weight_gradient_flops(enc, x)),
        "dec_loss_backward": 2 * input_gradient_flops(dis, x) + 2 * weight_gradient_flops(dec, z),
        "dis_loss_backward": 3 * weight_gradient_flops(dis, x),
    }
    return {**parts, "total": sum(parts.values())}


def step_flops(cfg: VAEGANConfig, batch: int) -> int:
    """FLOPs of one ``VAEGANTrainer.train_step`` as implemented (``cfg.model.kind`` picks VAE-GAN or VAE)."""
    torch.manual_seed(cfg.train.seed)
    trainer = VAEGANTrainer(cfg, *build_nets(cfg.model))
    m = cfg.model
    x = torch.rand(batch, m.channels, m.image_size, m.image_size)
    trainer.train_step(x)  # the first step allocates optimiser state; count a later one
    return count(lambda: trainer.train_step(x))


def step_figures(cfg: VAEGANConfig) -> dict[str, Any]:
    """The step's FLOPs against its floor and against a plain VAE step on the same nets and batch."""
    batch = cfg.train.batch_size
    floor = floor_flops(cfg, batch)
    vaegan = step_flops(replace(cfg, model=replace(cfg.model, kind="vaegan")), batch)
    vae = step_flops(replace(cfg, model=replace(cfg.model, kind="vae")), batch)
    # The discriminator's loss on reconstructions, which pythae's VAEGAN leaves out (its dis sees 2B).
    enc, dec, dis = build_nets(replace(cfg.model, kind="vaegan"))
    m = cfg.model
    x = torch.rand(batch, m.channels, m.image_size, m.image_size)
    recon_as_fake = forward_flops(dis, x) + weight_gradient_flops(dis, x)
    return {"batch_size": batch, "step_flops": vaegan, "floor_flops": floor, "vae_step_flops": vae,
            "step_flops_per_image": round(vaegan / batch), "step_over_floor_flops": round(vaegan / floor["total"], 4),
            "vaegan_over_vae_flops": round(vaegan / vae, 3),
            "floor_over_vae_flops": round(floor["total"] / vae, 3),
            "dis_on_recon_fraction_of_step": round(recon_as_fake / vaegan, 3)}


def sustained_gflops(fn: Callable[[], Any], flops: int, windows: int = 6, seconds: float = 0.5) -> float:
    """GFLOP/s of ``fn``: the median over ``windows`` windows of about ``seconds`` each, after a one-second
    warm-up (oneDNN builds its kernels on the first calls); the median shrugs off a window that another
    process on the box slowed down."""
    def rate(duration: float) -> float:
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration:
            fn()
            calls += 1
        return flops * calls / (time.perf_counter() - start) / 1e9

    rate(1.0)
    return statistics.median(rate(seconds) for _ in range(windows))


def costliest_conv(cfg: VAEGANConfig) -> tuple[nn.Conv2d, torch.Tensor]:
    """The encoder's convolution with the most forward FLOPs, and an input of the shape it sees in the step."""
    enc = build_nets(replace(cfg.model, kind="vae"))[0]
    seen: list[tuple[nn.Conv2d, torch.Tensor]] = []
    hooks = [layer.register_forward_hook(lambda module, inputs, _: seen.append((module, inputs[0])))
             for layer in enc.modules() if isinstance(layer, nn.Conv2d)]
    m = cfg.model
    with torch.no_grad():
        enc(torch.rand(cfg.train.batch_size, m.channels, m.image_size, m.image_size))
    for hook in hooks:
        hook.remove()
    return max(seen, key=lambda pair: forward_flops(*pair))


def machine_gflops(cfg: VAEGANConfig, quick: bool = False) -> dict[str, Any]:
    """fp32 GFLOP/s of a large matmul and of the step's costliest convolution (forward, and forward plus
    both gradients), at torch's current thread count; each the median of 6 half-second windows (``quick``:
    of 1, a check of the layout)."""
    windows = 1 if quick else 6
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    conv, x = costliest_conv(cfg)
    leaf = x.clone().requires_grad_(True)
    conv.requires_grad_(True)

    def train_conv() -> None:
        conv(leaf).sum().backward()

    with torch.no_grad():
        forward = sustained_gflops(lambda: conv(x), forward_flops(conv, x), windows)
    return {"torch_threads": torch.get_num_threads(), "matmul": round(sustained_gflops(lambda: a @ b, 2 * n**3, windows), 1),
            "matmul_shape": [n, n, n], "conv_forward": round(forward, 1),
            "conv_forward_backward": round(sustained_gflops(train_conv, count(train_conv), windows), 1),
            "conv_shape": {"input": list(x.shape), "weight": list(conv.weight.shape), "stride": conv.stride[0]}}


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--config", default=None, help="pipeline config (default: the main job's; --quick: smoke)")
    args = parser.parse_args()
    config = args.config or f"pipelines/configs/{'smoke' if args.quick else 'default'}.yaml"
    cfg = common.load_pipeline_config(config, []).core()
    args.out = common.result_path(args, "flops")
    figures = step_figures(cfg)
    result = {"ratios": {k: figures[k] for k in ("step_over_floor_flops", "vaegan_over_vae_flops",
                                                  "floor_over_vae_flops")},
              "flops": figures, "machine_gflops": machine_gflops(cfg, args.quick),
              "setup": {"config": config, "image_shape": [cfg.model.channels, cfg.model.image_size,
                                                          cfg.model.image_size],
                        "base_channels": cfg.model.base_channels, "latent_dim": cfg.model.latent_dim}}
    common.print_table([(k, v) for k, v in {**result["ratios"], "step_flops_per_image": figures["step_flops_per_image"],
                                             **result["machine_gflops"]}.items() if not isinstance(v, dict)])
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()

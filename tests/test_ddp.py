"""DDP reduces every gradient of the step: two gloo processes, each stepping on half a batch, end with the
gradients (and weights) of one process stepping on the whole batch.

Every loss is a batch mean, so the mean of the two halves' gradients, which is what DDP's all-reduce
computes, is the whole batch's gradient. A network whose all-reduce were missed (a forward that did not
ready DDP, a backward that bypassed ``.grad``) would keep its own half's gradient and fail here.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.worker import ddp, ranks_out_of_sync  # the product's per-network DDP wrapping and its desync count
from vaegan.nets import build_nets
from vaegan.step import StepNoise, VAEGANTrainer, unwrap

from test_step import tiny_config

WORLD = 2
BATCH = 8  # 4 images per rank


def whole_batch() -> tuple[torch.Tensor, StepNoise]:
    x = torch.rand(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    noise = StepNoise(eps=torch.randn(BATCH, 4, generator=gen), z_prior=torch.randn(BATCH, 4, generator=gen),
                      mix=torch.rand(BATCH, 1, 1, 1, generator=gen))
    return x, noise


def half(rank: int, x: torch.Tensor, noise: StepNoise) -> tuple[torch.Tensor, StepNoise]:
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return x[rows], StepNoise(eps=noise.eps[rows], z_prior=noise.z_prior[rows], mix=noise.mix[rows])


def step_and_collect(trainer: VAEGANTrainer, x: torch.Tensor, noise: StepNoise) -> dict[str, list[torch.Tensor]]:
    trainer.train_step(x, noise)
    nets = {"enc": trainer.enc, "dec": trainer.dec, "dis": trainer.dis}
    return {name: {"grads": [p.grad.clone() for p in unwrap(m).parameters()],
                   "weights": [p.detach().clone() for p in unwrap(m).parameters()]}
            for name, m in nets.items() if m is not None}


CASES = [("vaegan", "bce", 0.0), ("vaegan", "hinge", 2.0), ("vaegan", "wgan-gp", 0.0), ("vae", "bce", 0.0)]


def case_config(kind: str, adversarial: str, r1: float):
    cfg = tiny_config(adversarial=adversarial, r1_weight=r1)
    cfg.model.kind = kind
    cfg.train.balance_margin = 0.35  # exercises the all-reduced balance decision too
    return cfg


def rank_main(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        results = []
        for case in CASES:
            torch.manual_seed(0)
            nets = [ddp(m, torch.device("cpu")) for m in build_nets(case_config(*case).model)]
            trainer = VAEGANTrainer(case_config(*case), *nets)
            results.append(step_and_collect(trainer, *half(rank, *whole_batch())))
            results[-1]["out_of_sync"] = ranks_out_of_sync(trainer, WORLD)  # the figure each epoch reports
        if rank == 1:  # one rank's weights drift by one step of float32: the count must see it
            with torch.no_grad():
                next(unwrap(trainer.dec).parameters()).view(-1)[0].nextafter_(torch.tensor(float("inf")))
        results.append({"out_of_sync": ranks_out_of_sync(trainer, WORLD)})
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[list[dict]]:
    """Both ranks' gradients and weights after one DDP step of every case (one spawn: imports dominate)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(rank_main, args=(str(out / "init"), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_two_gloo_ranks_reduce_to_the_whole_batch_gradient(ranks, case):
    torch.manual_seed(0)
    cfg = case_config(*case)
    single = step_and_collect(VAEGANTrainer(cfg, *build_nets(cfg.model)), *whole_batch())
    per_rank = [results[CASES.index(case)] for results in ranks]
    assert [rank["out_of_sync"] for rank in per_rank] == [0] * WORLD

    nets = set(per_rank[0]) - {"out_of_sync"}
    assert nets == set(single) == ({"enc", "dec", "dis"} if case[0] == "vaegan" else {"enc", "dec"})
    for name, want in single.items():
        for rank in per_rank:
            for got, expected in zip(rank[name]["grads"], want["grads"]):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=f"{name} reduced gradient")
        # Equal gradients and equal decisions leave every rank with the same weights after the step.
        for a, b in zip(per_rank[0][name]["weights"], per_rank[1][name]["weights"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} weights differ between ranks")


def test_a_rank_whose_weights_drifted_is_counted_out_of_sync(ranks):
    """``ranks_out_of_sync`` (reported each epoch as ddp/ranks_out_of_sync) sees a one-ulp difference."""
    assert [results[len(CASES)]["out_of_sync"] for results in ranks] == [1] * WORLD


def test_a_rank_that_kept_its_own_gradient_would_be_caught(tmp_path):
    """The comparison above can fail: one half's gradient alone is not the whole batch's."""
    cfg = tiny_config()
    torch.manual_seed(0)
    nets = build_nets(cfg.model)
    single = step_and_collect(VAEGANTrainer(cfg, *copy.deepcopy(nets)), *whole_batch())
    alone = step_and_collect(VAEGANTrainer(cfg, *nets), *half(0, *whole_batch()))
    for name in ("enc", "dec", "dis"):
        assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-6)
                   for a, b in zip(alone[name]["grads"], single[name]["grads"])), name

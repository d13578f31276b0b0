"""Each benchmark's --quick mode end to end (a real Ray where the benchmark uses one): it runs, and its JSON
has the layout of the committed full run (benchmarks/results/<name>.json: every block, every key of each
block, ``command`` and ``machine``), with finite, positive figures. The scripts that use Ray join the test
process's shared Ray head (RAY_ADDRESS, conftest's ``shared_ray``); preprocess's full run measures a fresh
local Ray's start-up, its --quick run here the connection. Four Ray Train runs (1 throughput, 2 sweep trials,
1 quality pipeline) at ~20 s of start-up each (Train controller, worker group) set the floor; their epochs
take seconds."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MACHINE_KEYS = {"cores", "memory_gib", "cpu_model", "torch", "ray", "mlflow", "python", "platform", "date"}
QUALITY_METRICS = {"fid", "kid", "precision", "recall", "recon_mse", "iwae_nll", "active_units", "elbo_gap",
                   "fid_fitted_prior"}


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    """One work folder for every benchmark here: the smoke-sized Parquet is preprocessed once and reused."""
    return tmp_path_factory.mktemp("bench-work")


def layout(result: dict) -> dict:
    """A result's blocks and, for each block that is a dict, its keys: what docs/benchmarks.md reads."""
    return {key: sorted(value) if isinstance(value, dict) else type(value).__name__ for key, value in result.items()}


def run_quick(name: str, tmp_path: Path, work_dir: Path, env: dict[str, str] | None = None) -> dict:
    """``benchmarks/<name>.py --quick``, with ``env`` added to this process's environment."""
    out = tmp_path / f"{name}.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--quick", "--out", str(out),
                           "--work-dir", str(work_dir)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    # The quick run writes every block and key the committed full run has; a part --quick leaves out says so.
    full = layout(json.loads((REPO / "benchmarks" / "results" / f"{name}.json").read_text()))
    quick = {key: full[key] if result.get(key) == {"skipped": "--quick"} else keys for key, keys in layout(result).items()}
    assert quick == full, f"benchmarks/results/{name}.json's layout"
    assert MACHINE_KEYS <= result["machine"].keys() and result["machine"]["cores"] >= 1
    assert f"benchmarks/{name}.py" in result["command"] and "--quick" in result["command"]
    assert isinstance(result["ratios"], dict)
    return result


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_throughput_quick(tmp_path, work_dir, shared_ray):
    result = run_quick("throughput", tmp_path, work_dir, shared_ray)
    for part in ("bare", "bare_at_worker_threads", "ray_train_1w", "bare_vae"):
        assert positive(result[part]["images_per_s"]) and result[part]["torch_threads"] >= 1, part
        assert result[part]["nonfinite_skipped"] == 0, part
    assert result["ray_train_1w"]["workers"] == 1
    # The finished run's controller is gone (training.fit_releasing_controller), not waking beside the next loop.
    assert "TrainController" not in result["bare_ray_up"]["ray_actors_alive"]
    assert positive(result["ray_train_1w"]["wall_seconds"])
    assert result["bare_at_worker_threads"]["torch_threads"] == result["ray_train_1w"]["torch_threads"]
    assert result["ray_train_2w"] == result["pythae"] == {"skipped": "--quick"}
    assert result["ratios"]["pythae_over_bare"] is None and result["ratios"]["ddp_2w_over_1w"] is None
    assert all(positive(result["ratios"][k]) for k in ("ray_train_1w_over_bare", "vaegan_over_vae_step_time",
                                                        "fraction_of_peak"))
    assert result["ratios"]["ours_over_pythae"] is None
    assert result["ratios"]["step_over_floor_flops"] == pytest.approx(1.0, abs=0.005)  # the step is at its floor
    assert positive(result["step_flops_per_image"]) and result["flops"]["floor_over_vae_flops"] > 1
    assert all(positive(result["machine_gflops"][k]) for k in ("matmul", "conv_forward", "conv_forward_backward"))
    assert 0 < result["fraction_of_peak"]["of_matmul"] < 1


def test_flops_quick(tmp_path, work_dir):
    result = run_quick("flops", tmp_path, work_dir)
    figures = result["flops"]
    assert figures["step_flops"] == figures["floor_flops"]["total"]  # no backward work a loss does not need
    parts = ("forward", "enc_loss_backward", "dec_loss_backward", "dis_loss_backward")
    assert sum(figures["floor_flops"][k] for k in parts) == figures["floor_flops"]["total"]
    assert all(positive(figures["floor_flops"][k]) for k in parts)
    assert figures["vae_step_flops"] < figures["step_flops"]
    assert 0 < figures["dis_on_recon_fraction_of_step"] < 1
    assert positive(result["machine_gflops"]["matmul"])


def test_preprocess_quick(tmp_path, work_dir, shared_ray):
    result = run_quick("preprocess", tmp_path, work_dir, shared_ray)
    assert result["setup"]["limit"] == 2000
    for side in ("ray_data", "numpy"):
        assert result[side]["rows"] == 2000, side
        assert all(positive(result[side][k]) for k in ("seconds", "rows_per_s", "peak_rss_mb")), side
    assert result["same_output"] is True  # same rows, same split: the same manifest fingerprint
    assert positive(result["ratios"]["ray_over_numpy_time"])
    png = result["png_folder"]
    assert png["images"] == png["source"]["images"] == 500
    for side in ("ray_data", "script"):
        assert png[side]["rows"] == 500, side
        assert all(positive(png[side][k]) for k in ("seconds", "rows_per_s", "peak_rss_mb")), side
    assert png["same_output"] is True
    assert all(positive(result["ratios"][k]) for k in ("ray_over_script_png_time", "ray_over_script_png_peak_rss",
                                                      "ray_over_script_png_time_at_perfect_scaling"))
    assert positive(sum(png["ray_data"]["data_phase_cpu_seconds"].values()))
    assert positive(png["script"]["transform_write_cpu_seconds"])


def test_sweep_quick(tmp_path, work_dir, shared_ray):
    result = run_quick("sweep", tmp_path, work_dir, shared_ray)
    asha = result["asha"]
    assert asha["trials"] == 1  # --quick: one point, the layout's check
    assert asha["trial_epochs"] == result["setup"]["max_epochs"] == 2  # ASHA never stops the only trial of a rung
    assert positive(asha["best_val_fid"]) and positive(asha["best_test_fid"]) and positive(asha["seconds"])
    assert result["grid"] == result["asha_found_grid_best"] == {"skipped": "--quick"}  # it would rerun that trial
    assert result["pbt"] == result["tuned_vs_default"] == result["asha_replay"] == result["sha"] == {"skipped": "--quick"}
    assert set(result["ratios"].values()) == {None}


def test_asha_replay_spends_every_epoch_when_each_trial_is_a_new_best_and_stops_the_rest_when_the_best_comes_first():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import asha_replay
    # Four trials of four 1-second epochs; trial i scores 10 - i at every epoch (lower is better).
    histories = {i: [(1.0, 10.0 - i)] * 4 for i in range(4)}
    asha = {"max_t": 4, "grace_period": 1, "reduction_factor": 2, "slots": 1}
    assert asha_replay.replay(histories, [0, 1, 2, 3], **asha) == (16, 7.0)  # each beats all before it
    assert asha_replay.replay(histories, [3, 2, 1, 0], **asha) == (4 + 1 + 1 + 1, 7.0)  # stopped at the first rung
    figures = asha_replay.summary(histories, {"worst": [0, 1, 2, 3]}, random_orders=50, seed=0, **asha)
    assert figures["worst"] == {"compute_fraction": 1.0, "best_gap": 0.0}
    assert 7 / 16 <= figures["random_orders"]["compute_fraction"]["mean"] < 1.0


def test_quality_quick(tmp_path, work_dir, shared_ray):
    """--quick runs the plain VAE's pipeline, the one model kind no other test registers; every other test's
    pipeline trains the VAE-GAN."""
    result = run_quick("quality", tmp_path, work_dir, shared_ray)
    block = result["vae"]
    assert QUALITY_METRICS == block["metrics"].keys()
    for name, figure in block["metrics"].items():
        assert len(figure["per_seed"]) == 1 and figure["std"] == 0.0, name
        assert math.isfinite(figure["mean"]), name
    assert all(positive(block["metrics"][k]["mean"]) for k in ("fid", "recon_mse", "iwae_nll"))
    assert block["model_uri"] == "models:/bench-quality-vae@champion"
    run = block["runs"][0]
    assert run["model_uri"] == "models:/bench-quality-vae/1"
    assert run["epochs"] == 1 and positive(run["epochs_seconds"])
    assert run["dis_update_fraction"] is block["dis_update_fraction"] is None  # a plain VAE has no discriminator
    assert result["vaegan"] == result["vae_equal_time"] == result["pythae_vaegan"] == {"skipped": "--quick"}
    assert result["ratios"].keys() == {"vaegan_over_vae_fid", "vaegan_over_vae_equal_time_fid", "vaegan_over_pythae_fid",
                                       "pythae_vaegan_over_vaegan_fid", "vaegan_over_vae_recon_mse",
                                       "vaegan_fitted_over_standard_prior_fid"}
    assert set(result["ratios"].values()) == {None}
    assert result["tracking_uri"].startswith("sqlite:///")

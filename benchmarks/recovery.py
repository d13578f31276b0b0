"""Recovery from Train worker kills: steps redone and seconds lost, against the same run left alone.

Runs the product's CLI twice on the same data and config (``--steps preprocess,tune,train``, tune off, a
2-worker DDP run): once undisturbed, once with one Train worker SIGKILLed mid-epoch after each of the first
``--kills`` checkpoints. FailureConfig restarts the worker group from the latest checkpoint; the run's
FaultLedger (``summary.json``'s ``train_faults``) says how many steps were redone. "recovery" is the time
from a kill to the first training step after it (detection, new worker group, checkpoint load).

Run from the repository root, under the shared Ray lock:
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/recovery.py           # 6,000 images x 4 epochs, ~6 min
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/recovery.py --quick   # smoke data, 1 kill
Results: benchmarks/results/recovery.json (--quick: recovery_quick.json; --out to change).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common


def parse_args():
    p = common.argument_parser(__doc__)
    p.add_argument("--kills", type=int, default=None, help="workers killed, one per checkpoint (default 2; --quick 1)")
    return p.parse_args()


def command(run_dir: Path, quick: bool) -> list[str]:
    size = [] if quick else ["--set", "data.limit=6000"]
    return [str(Path(sys.executable).parent / "vaegan"), "run", "--config", "pipelines/configs/smoke.yaml",
            "--run-dir", str(run_dir), "--steps", "preprocess,tune,train", "--set", "tune.enabled=false",
            "--set", "train.num_workers=2", "--set", "train.epochs=4", "--set", "register.experiment=recovery",
            "--set", "train.max_failures=3", *size]


def ledger(run_dir: Path) -> dict[str, Any]:
    """The FaultLedger rank 0 rewrites while training runs (see pipelines/faults.py)."""
    files = list((run_dir / "ray").glob("train-*.progress.json"))
    try:
        return json.loads(files[0].read_text()) if files else {}
    except json.JSONDecodeError:
        return {}


def checkpoint_count(run_dir: Path) -> int:
    return sum(p.is_dir() for p in (run_dir / "ray").glob("train-*/checkpoint_2*"))


def wait(condition, proc: subprocess.Popen, what: str) -> None:
    while not condition():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (exit {proc.returncode}) while waiting for {what}")
        time.sleep(0.05)


def train_worker_pids(session: int) -> list[int]:
    """This run's Train workers: the driver leads a session of its own and its local Ray's processes stay in
    it (a worker takes a process group of its own, not a session), so another Ray on the host is never picked."""
    listed = subprocess.run(["ps", "-s", str(session), "-o", "pid=,args="], capture_output=True, text=True, check=False)
    return [int(line.split()[0]) for line in listed.stdout.splitlines() if "RayTrainWorker" in line]


def run(run_dir: Path, quick: bool, kills: int) -> dict[str, Any]:
    run_dir.mkdir(parents=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{run_dir / 'mlflow.db'}"}
    start = time.perf_counter()
    with open(run_dir / "run.log", "w") as log:
        proc = subprocess.Popen(command(run_dir, quick), cwd=common.REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            recoveries = kill_workers(proc, run_dir, kills)
        finally:
            if proc.poll() is None:  # interrupted: its own session no longer gets the terminal's Ctrl-C
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"the run failed; see {run_dir / 'run.log'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"seconds": round(time.perf_counter() - start, 1), "train_seconds": summary["steps"]["train"]["seconds"],
            "recovery_seconds": recoveries, "train_faults": summary["train_faults"]}


def kill_workers(proc: subprocess.Popen, run_dir: Path, kills: int) -> list[float]:
    """SIGKILL one of the run's Train workers after each of the first ``kills`` checkpoints; the seconds from
    each kill to the first training step after it."""
    recoveries = []
    for kill in range(1, kills + 1):
        wait(lambda k=kill: checkpoint_count(run_dir) >= k, proc, f"checkpoint {kill}")
        at_checkpoint = ledger(run_dir)["step"]
        wait(lambda s=at_checkpoint: ledger(run_dir).get("step", 0) >= s + 3, proc, "steps after the checkpoint")
        killed_at = time.perf_counter()
        os.kill(train_worker_pids(proc.pid)[0], signal.SIGKILL)
        # Back at work: the restarted group counted the restart and took a step past the one it resumed at.
        wait(lambda k=kill: ledger(run_dir).get("restarts") == k, proc, "the restart")
        resumed_at = ledger(run_dir)["step"]
        wait(lambda s=resumed_at: ledger(run_dir).get("step", 0) > s, proc, "a step after the restart")
        recoveries.append(round(time.perf_counter() - killed_at, 2))
        print(f"kill {kill}: recovered in {recoveries[-1]:.1f}s", flush=True)
    proc.wait()
    return recoveries


def main() -> None:
    args = parse_args()
    kills = args.kills if args.kills is not None else (1 if args.quick else 2)
    scratch = args.work_dir / f"recovery-{time.strftime('%Y%m%d-%H%M%S')}"
    undisturbed = run(scratch / "undisturbed", args.quick, 0)
    killed = run(scratch / "killed", args.quick, kills)
    result = {"kills": kills, "undisturbed": undisturbed, "killed": killed,
              "train_seconds_lost": round(killed["train_seconds"] - undisturbed["train_seconds"], 1)}
    common.print_table([("kills", kills), ("steps redone", killed["train_faults"]["steps_redone"]),
                        ("restarts", killed["train_faults"]["restarts"]),
                        ("recovery s (kill -> next step)", killed["recovery_seconds"]),
                        ("train step s, undisturbed", undisturbed["train_seconds"]),
                        ("train step s, with kills", killed["train_seconds"]),
                        ("train s lost", result["train_seconds_lost"])])
    common.write_result(common.result_path(args, "recovery"), result)


if __name__ == "__main__":
    main()

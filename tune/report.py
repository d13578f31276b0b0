"""The sweep report: one row per trial (its parameters, score and epochs), as trials.csv, trials.md and
trials.png (the score against each searched parameter)."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib
from ray import tune as ray_tune

from pipelines.config import flatten

matplotlib.use("Agg")  # file-only backend: clusters have no display
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def trial_rows(results: ray_tune.ResultGrid, score: str) -> list[dict[str, Any]]:
    """One row per trial, best ``score`` (lower is better) first, trials without a score last."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        # Tune names a trial's folder "<trainable>_<experiment>_<index>_<params...>".
        rows.append({"trial": "_".join(Path(result.path).name.split("_")[1:3]) if result.path else "?",
                     **flatten(result.config or {}), score: metrics.get(score, float("nan")),
                     "epochs": int(metrics.get("training_iteration", 0)), "error": str(result.error or "")})
    return sorted(rows, key=lambda r: (math.isnan(r[score]), r[score]))


def write_report(rows: list[dict[str, Any]], score: str, out: Path) -> list[Path]:
    """The trials table as CSV and markdown, best first, and trials.png: the score against each parameter."""
    columns = list(rows[0]) if rows else []
    with open(out / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    (out / "trials.md").write_text("\n".join(lines) + "\n")
    params = [c for c in columns if c not in ("trial", score, "epochs", "error")]
    metric_vs_params(rows, params, score, out / "trials.png")
    return [out / "trials.csv", out / "trials.md", out / "trials.png"]


def metric_vs_params(rows: Sequence[dict[str, Any]], params: Sequence[str], metric: str, path: Path) -> Path:
    """A scatter of ``metric`` against each parameter (log x-axis for positive ranges over a decade)."""
    fig, axes = plt.subplots(1, max(len(params), 1), figsize=(3.2 * max(len(params), 1), 3), squeeze=False,
                             sharey=True)
    for ax, param in zip(axes[0], params):
        points = [(r[param], r[metric]) for r in rows if isinstance(r.get(metric), float) and math.isfinite(r[metric])]
        if points:
            xs, ys = zip(*points)
            ax.scatter(xs, ys)
            if min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
        ax.set_xlabel(param)
    axes[0][0].set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

"""The sweep report: one row per trial (its parameters, objectives and epochs), as trials.csv, trials.md and
trials.png (the first objective against each searched parameter); every trial's every epoch as history.csv;
with several objectives pareto.csv and pareto.png (the non-dominated trials); under PBT pbt.png (each trial's
score per epoch with its exploits, and the winner's hyperparameter schedule)."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib
from ray import tune as ray_tune

from pipelines.config import flatten

from .objectives import OBJECTIVES, pareto_front, signed
from .search import EPOCH
from .trial import DONOR, PARAM

matplotlib.use("Agg")  # file-only backend: clusters have no display
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


class TrialHistory(ray_tune.Callback):
    """Every report of every trial, as Tune's driver receives them: the epoch, the validation figures, the
    step range, the trial's parameters at that epoch and, after a PBT take-over, the donor. Kept here because
    a trial's own result files restart when PBT pauses or restores it."""

    KEPT = ("val/", PARAM, "step/", DONOR, EPOCH)

    def __init__(self):
        self.reports: dict[str, list[dict[str, Any]]] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        kept = {k: v for k, v in result.items() if k.startswith(self.KEPT)}
        if kept.get(DONOR):  # the donor's folder name, as the trial saw it: its id
            kept[DONOR] = next((t.trial_id for t in trials if t.path and Path(t.path).name == kept[DONOR]), kept[DONOR])
        self.reports.setdefault(trial.trial_id, []).append({"trial": trial.trial_id, **kept})


def trial_rows(results: ray_tune.ResultGrid, objectives: Sequence[str],
               history: TrialHistory) -> list[dict[str, Any]]:
    """One row per trial (its epochs: those its own Train runs trained), best first objective first, trials
    without a score last."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial = metrics.get("trial_id", "?")  # Tune's own id (filled into every result)
        rows.append({"trial": trial, **flatten(result.config or {}),
                     **{m: metrics.get(m, float("nan")) for m in objectives},
                     "epochs": len(history.reports.get(trial, [])), "error": str(result.error or "")})
    return sorted(rows, key=lambda r: (math.isnan(r[objectives[0]]), signed(r, objectives[0])))


def write_report(rows: list[dict[str, Any]], objectives: Sequence[str], out: Path, history: TrialHistory,
                 winner: str = "", pbt: bool = False) -> list[Path]:
    """The trials table as CSV and markdown, best first, trials.png and history.csv; pareto.* with several
    objectives; pbt.png after a PBT sweep, whose ``winner`` (a trial id) feeds the train step."""
    epochs = [report for reports in history.reports.values() for report in reports]
    columns = list(dict.fromkeys(key for report in epochs for key in report))
    written = [write_table(rows, out / "trials.csv"), write_markdown(rows, out / "trials.md"),
               write_table([{c: report.get(c, "") for c in columns} for report in epochs], out / "history.csv")]
    params = [c for c in (list(rows[0]) if rows else []) if c not in ("trial", "epochs", "error", *objectives)]
    written.append(metric_vs_params(rows, params, objectives[0], out / "trials.png"))
    if len(objectives) > 1:
        front = pareto_front(rows, objectives)
        written += [write_table(front, out / "pareto.csv"), pareto_plot(rows, front, objectives, out / "pareto.png")]
    if pbt:
        written.append(pbt_plot(history, objectives[0], winner, out / "pbt.png"))
    return written


def write_table(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    columns = list(rows[0]) if rows else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_markdown(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    columns = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


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
    return _save(fig, path)


def pareto_plot(rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]], objectives: Sequence[str],
                path: Path) -> Path:
    """Every scored trial on the first two objectives, the non-dominated ones joined as the front."""
    x, y = objectives[:2]
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    scored = [r for r in rows if math.isfinite(r[x]) and math.isfinite(r[y])]
    ax.scatter([r[x] for r in scored], [r[y] for r in scored], color="0.6", label="trials")
    line = sorted(front, key=lambda r: r[x])
    ax.plot([r[x] for r in line], [r[y] for r in line], "o-", color="C3", label="Pareto front")
    ax.set_xlabel(f"{x} ({'lower' if OBJECTIVES[x] == 'min' else 'higher'} is better)")
    ax.set_ylabel(f"{y} ({'lower' if OBJECTIVES[y] == 'min' else 'higher'} is better)")
    ax.legend()
    return _save(fig, path)


def pbt_plot(history: TrialHistory, metric: str, winner: str, path: Path) -> Path:
    """Left: each trial's ``metric`` per epoch, a cross where it took over another trial's checkpoint. Right:
    the ``winner``'s searched parameters per epoch (relative to their first value), the schedule PBT found."""
    fig, (curves, schedule) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (trial, reports) in enumerate(sorted(history.reports.items())):
        colour, scored = f"C{i % 10}", [r for r in reports if metric in r]
        # A take-over continues the donor's curve, not the trial's own: draw it from the donor's last point.
        starts = [0] + [j for j, r in enumerate(scored) if r.get(DONOR)] + [len(scored)]
        for begin, end in zip(starts, starts[1:]):
            part = scored[begin:end]
            curves.plot([r[EPOCH] for r in part], [r[metric] for r in part], "o-", color=colour,
                        label=trial if begin == 0 else None)
        for r in scored:
            donor = next((d for d in history.reports.get(r.get(DONOR), []) if d[EPOCH] == r[EPOCH] - 1), None)
            if donor is not None:
                curves.plot([donor[EPOCH], r[EPOCH]], [donor[metric], r[metric]], "--", color=colour)
                curves.scatter([r[EPOCH]], [r[metric]], marker="x", s=90, color="k", zorder=3)
    curves.set_xlabel("epoch")
    curves.set_ylabel(f"{metric} (x, dashed: took over a better trial)")
    curves.legend(fontsize=7)
    reports = history.reports.get(winner, [])
    for param in dict.fromkeys(k for r in reports for k in r if k.startswith(PARAM)):
        first = reports[0].get(param) or 1.0
        schedule.plot([r[EPOCH] for r in reports], [r.get(param, math.nan) / first for r in reports], "o-",
                      label=param.removeprefix(PARAM))
    schedule.set_xlabel("epoch")
    schedule.set_ylabel("value / its first value")
    schedule.set_title(f"winner {winner}: its schedule", fontsize=9)
    schedule.legend(fontsize=7)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

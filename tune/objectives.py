"""A sweep's objectives: the per-epoch validation figures a trial reports, which way each is better, the
Pareto front of several, and the one rule that picks the trial that feeds the train step. Plain Python:
the driver checks a config against ``OBJECTIVES`` before Ray starts."""
from __future__ import annotations

import math
from typing import Any, Sequence

# The per-epoch validation figures a trial reports (pipelines/worker.py, Validation) that a sweep may optimise,
# and which way is better.
OBJECTIVES = {"val/fid": "min", "val/kid": "min", "val/recon_mse": "min", "val/elbo": "max",
              "val/precision": "max", "val/recall": "max"}


def signed(row: dict[str, Any], objective: str) -> float:
    """The row's ``objective`` with lower always better (NaN when it has none)."""
    value = float(row.get(objective, math.nan))
    return value if OBJECTIVES[objective] == "min" else -value


def pareto_front(rows: Sequence[dict[str, Any]], objectives: Sequence[str]) -> list[dict[str, Any]]:
    """The rows no other row dominates (at least as good on every objective, better on one); rows missing an
    objective take no part."""
    scored = [r for r in rows if all(math.isfinite(signed(r, m)) for m in objectives)]

    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        pairs = [(signed(a, m), signed(b, m)) for m in objectives]
        return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)
    return [r for r in scored if not any(dominates(other, r) for other in scored)]


def pick(rows: Sequence[dict[str, Any]], objectives: Sequence[str], tolerance: float) -> dict[str, Any] | None:
    """The trial that feeds the train step: on the Pareto front, the best first objective among the rows whose
    every other objective is within ``tolerance`` times its best on the front (a factor on the lower-is-better
    form: the figure, or its negative); with one objective, simply the best. None if none scored."""
    front = pareto_front(rows, objectives)
    if not front:
        return None
    acceptable = front
    for objective in objectives[1:]:
        best = min(signed(r, objective) for r in front)
        bound = best * tolerance if best >= 0 else best / tolerance
        acceptable = [r for r in acceptable if signed(r, objective) <= bound]
    # The front's best on each later objective always passes its own bound, but not necessarily the others';
    # the front's best first objective is the fallback when no row passes them all.
    return min(acceptable or front, key=lambda r: signed(r, objectives[0]))

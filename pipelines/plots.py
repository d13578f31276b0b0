"""The loss curves of a training run as a PNG. Matplotlib with the file-only Agg backend (no display on
clusters); the sweep's figures are ``tune/report.py``'s."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

LOSS_KEYS = ("loss/enc/total", "loss/dec/total", "loss/dis/total")
VALIDATION_KEYS = ("val/fid", "val/elbo")


def loss_curves(history: Sequence[dict[str, float]], path: Path) -> Path:
    """One panel per network's total loss and per validation score, against the epoch."""
    keys = [k for k in (*LOSS_KEYS, *VALIDATION_KEYS) if any(k in h for h in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(h.get("epoch", i + 1), h[key]) for i, h in enumerate(history) if key in h]
        ax.plot(*zip(*points), marker="o")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

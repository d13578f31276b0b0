"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

The discriminator sees every image -- real, reconstructed and sampled -- randomly translated by up to
1/8 of its side (zero fill) and with a square of half its side cut out. The ops are differentiable, so
the decoder's adversarial gradient passes through them; a discriminator that cannot memorise exact
pixels stays uncertain for longer, which keeps the adversarial game going on small data.

The random draw is separate from the op so that a step can apply *the same* draw to a real image and
its reconstruction: the Dis_l reconstruction term then compares two views of one transform, and stays a
likelihood of the reconstruction rather than of the augmentation. Images are (B, C, H, W).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TRANSLATION_RATIO = 0.125  # Zhao et al.'s defaults
CUTOUT_RATIO = 0.5


def draw_params(batch: int, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image integer parameters (B, 4): translation (dy, dx), then the cutout's centre (cy, cx)."""
    shift_y, shift_x = int(height * TRANSLATION_RATIO + 0.5), int(width * TRANSLATION_RATIO + 0.5)

    def uniform(low: int, high: int) -> torch.Tensor:  # integers in [low, high]
        return torch.randint(low, high + 1, (batch,), generator=generator)

    return torch.stack([uniform(-shift_y, shift_y), uniform(-shift_x, shift_x),
                        uniform(0, height - 1), uniform(0, width - 1)], dim=1)


def diff_augment(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """``x`` translated, then cut out, per ``params`` (B, 4) from :func:`draw_params`; same shape as ``x``."""
    return _cutout(_translate(x, params[:, 0:2].to(x.device)), params[:, 2:4].to(x.device))


def _translate(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each image moved by its (dy, dx); uncovered pixels are 0. One gather over a zero-padded copy."""
    batch, _, height, width = x.shape
    pad = int(max(height, width) * TRANSLATION_RATIO + 0.5)
    padded = F.pad(x, [pad, pad, pad, pad])
    rows = torch.arange(height, device=x.device).view(1, height, 1) - shifts[:, 0].view(batch, 1, 1) + pad
    cols = torch.arange(width, device=x.device).view(1, 1, width) - shifts[:, 1].view(batch, 1, 1) + pad
    index = (rows * padded.shape[-1] + cols).view(batch, 1, height * width).expand(-1, x.shape[1], -1)
    return padded.flatten(2).gather(2, index).view_as(x)


def _cutout(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Each image times a mask that is 0 on a square of side CUTOUT_RATIO * size around its centre."""
    batch, _, height, width = x.shape
    half_y, half_x = int(height * CUTOUT_RATIO + 0.5) // 2, int(width * CUTOUT_RATIO + 0.5) // 2
    rows = torch.arange(height, device=x.device).view(1, height, 1) - centres[:, 0].view(batch, 1, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width) - centres[:, 1].view(batch, 1, 1)
    inside = (rows >= -half_y) & (rows < half_y) & (cols >= -half_x) & (cols < half_x)  # (B, H, W)
    return x * (~inside).unsqueeze(1).to(x.dtype)

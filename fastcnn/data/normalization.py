"""Normalization: the statistics images are normalized with, and the normalize step every loader shares.

A normalized image is what torchvision's ``ToTensor()`` + ``Normalize(mean, std)`` make of a uint8 image:
fp32 ``(x / 255 - mean) / std`` per channel. The statistics come from one of two places: the published ones of
MNIST and Fashion-MNIST (``MNIST_NORM``, ``FASHION_MNIST_NORM``, what the tutorial programs use), or a dataset's
own per-channel statistics (``channel_stats``), for every other set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# (mean, std) of the train split's pixels scaled to [0, 1], as the tutorials write them
MNIST_NORM = ((0.1307,), (0.3081,))
FASHION_MNIST_NORM = ((0.2860,), (0.3530,))


def normalize_uint8(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """What torchvision's ToTensor() + Normalize(mean, std) compute, for a uint8 (N, C, H, W) batch: fp32
    (x / 255 - mean) / std, in that order, so the values are bitwise those of the reference loader. ``mean`` and
    ``std``: fp32 (1, C, 1, 1), as ``as_channel_tensor`` makes them."""
    return pixels.to(torch.float32).div_(255).sub_(mean).div_(std)


def as_channel_tensor(values: Sequence[float] | float, channels: int, device) -> torch.Tensor:
    """One statistic per channel as an fp32 (1, ``channels``, 1, 1) tensor on ``device``: a single value (or a
    one-value sequence) is used for every channel. ValueError for another count of values."""
    values = [float(values)] * channels if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) == 1 and channels > 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{len(values)} normalization values for {channels} channels")
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, channels, 1, 1)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of uint8 (N, C, H, W) ``images`` scaled to [0, 1]: what Normalize(mean, std)
    needs to make each channel zero-mean and unit-variance on them. Exact (from per-channel histograms, in
    float64); population std, 1.0 for a constant channel, so that normalizing by it stays finite."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1).cpu(), minlength=256).to(torch.float64)
        total = counts.sum()
        if total == 0:
            means.append(0.0), stds.append(1.0)
            continue
        mean = float((counts * values).sum() / total)
        variance = float((counts * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(math.sqrt(variance) if variance > 0 else 1.0)
    return tuple(means), tuple(stds)

"""Synthetic data (``--dataset synthetic``): learnable images of any shape, made from a seed, for benchmarks and
tests that need no files."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastcnn.data.image_dataset import ImageDataset
from fastcnn.data.image_shape import parse_image_size
from fastcnn.data.mnist import MNIST_SPLIT_SIZES

# (train, test) sample counts when none are given: MNIST's, so that a synthetic epoch costs what an MNIST one does
DEFAULT_SYNTHETIC_SIZE = MNIST_SPLIT_SIZES


def synthetic_dataset(count: int, *, train: bool = True, seed: int = 0, num_classes: int = 10,
                      size: int | Sequence[int] = 28, channels: int = 1) -> ImageDataset:
    """Images whose labels a CNN can learn, of any shape (default: MNIST's, 1x28x28): each class is a fixed
    smooth random pattern (one per channel), each sample that pattern shifted by up to 2 pixels, scaled, and with
    noise added.

    The class patterns depend only on ``seed``; the samples also on ``train``, so train and test differ. The
    1-channel 28x28 images are the same as before other shapes existed.
    """
    height, width = parse_image_size(size)
    pattern_gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 7, 7, generator=pattern_gen)
    patterns = F.interpolate(coarse, size=(height + 4, width + 4), mode="bicubic", align_corners=False).clamp(0, 1)
    sample_gen = torch.Generator().manual_seed(seed * 2 + (1 if train else 2))
    labels = torch.randint(num_classes, (count,), generator=sample_gen)
    dy = torch.randint(5, (count,), generator=sample_gen)
    dx = torch.randint(5, (count,), generator=sample_gen)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
    images = patterns[labels][torch.arange(count)[:, None, None, None], torch.arange(channels)[None, :, None, None],
                              rows, cols]
    scale = 0.6 + 0.4 * torch.rand(count, 1, 1, generator=sample_gen)
    noise = 0.15 * torch.randn(count, channels, height, width, generator=sample_gen)
    pixels = ((images * scale[:, None] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageDataset("synthetic", pixels, labels, [str(i) for i in range(num_classes)])

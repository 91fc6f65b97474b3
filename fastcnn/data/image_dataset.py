"""ImageDataset: a labelled image set held whole in memory as tensors, read once, then served by any loader.

``images`` is uint8 (N, C, H, W) and ``labels`` int64 (N,). Loaders (device, DALI, torch) all take an
ImageDataset, so every loader serves exactly the same samples. The sources that make one: ``mnist`` (MNIST-style
IDX files), ``cifar``, ``imagefolder``, ``synthetic``; ``load_dataset`` (``fastcnn.data.datasets``) picks one by
name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from fastcnn.data.normalization import channel_stats


@dataclass
class ImageDataset:
    """A labelled image set held as tensors. images: uint8 (N, C, H, W); labels: int64 (N,)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)
    source: str = ""  # where it was read from (a folder), for the run's opening line
    notes: list[str] = field(default_factory=list)  # what was inferred or converted, one sentence each
    _stats: tuple | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, count: int | None) -> ImageDataset:
        """The first ``count`` samples (all of them when count is None or larger than the set)."""
        if count is None or count >= len(self):
            return self
        return dataclasses.replace(self, images=self.images[:count], labels=self.labels[:count], _stats=None)

    def with_images(self, images: torch.Tensor, note: str) -> ImageDataset:
        """The same samples with ``images`` in their place (converted to another shape), and ``note`` saying
        what was done added to ``notes``."""
        return dataclasses.replace(self, images=images, _stats=None, notes=[*self.notes, note])

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of the pixels scaled to [0, 1], over every image
        (``fastcnn.data.normalization.channel_stats``), computed once per dataset object."""
        if self._stats is None:
            self._stats = channel_stats(self.images)
        return self._stats

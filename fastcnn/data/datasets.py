"""Datasets as whole uint8 tensors in memory: read once (through torchvision for MNIST-style sets), then
served by any loader.

``ImageDataset.images`` is uint8 (N, C, H, W) and ``labels`` int64 (N,). Loaders (device, DALI, torch) all take
an ImageDataset, so every loader serves exactly the same samples.
"""

from __future__ import annotations

import math
import os
import pathlib
import shutil
from dataclasses import dataclass, field

import torch

from fastcnn.errors import DatasetError, NotAvailableError, UsageError

DATASETS = ("mnist", "fashion-mnist", "synthetic", "imagefolder")
DEFAULT_SYNTHETIC_SIZE = (60_000, 10_000)


@dataclass
class ImageDataset:
    """A labelled image set held as tensors. images: uint8 (N, C, H, W); labels: int64 (N,)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)

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
        return ImageDataset(self.name, self.images[:count], self.labels[:count], self.classes)


def default_data_root(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """--data-dir, else $FASTCNN_DATA, else ./data."""
    return pathlib.Path(data_dir or os.environ.get("FASTCNN_DATA") or "data")


def load_dataset(name: str, train: bool, *, root: str | os.PathLike | None = None, download: bool = True,
                 synthetic_size: tuple[int, int] = DEFAULT_SYNTHETIC_SIZE, seed: int = 0) -> ImageDataset:
    """Load the train or test split of a dataset by name (see ``DATASETS``)."""
    if name == "synthetic":
        return synthetic_dataset(synthetic_size[0] if train else synthetic_size[1], train=train, seed=seed)
    if name in ("mnist", "fashion-mnist"):
        return _load_torchvision_mnist(name, train, default_data_root(root), download)
    if name == "imagefolder":
        # No default root here: ./data holds MNIST/ and FashionMNIST/, which would be taken for classes.
        if root is None:
            raise UsageError("--dataset imagefolder needs --data-dir: a folder laid out as <class>/<image>.png "
                             "(or train/<class>/... and test/<class>/...)")
        from fastcnn.data.dali_status import dali_status

        ok, why = dali_status()
        if not ok:
            raise NotAvailableError(f"--dataset imagefolder decodes images with DALI, which is not available "
                                    f"here: {why}")
        from fastcnn.data.imagefolder import load_imagefolder

        return load_imagefolder(root, train)  # the same held-out test images whatever the run's seed
    raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def _load_torchvision_mnist(name: str, train: bool, root: pathlib.Path, download: bool) -> ImageDataset:
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    raw = root / cls.__name__ / "raw"
    split = "train" if train else "test"
    hint = (f"put the four IDX files of {name} under {raw} (torchvision layout), or point --data-dir / "
            "FASTCNN_DATA at their parent folder")
    if not root.is_dir() and not download:
        raise DatasetError(f"data folder {root} does not exist; {hint}")
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError as missing_or_corrupt:
        if "dataset not found" not in str(missing_or_corrupt).lower():
            raise DatasetError(f"{name} {split} split under {raw} is corrupt or truncated "
                               f"({_one_line(missing_or_corrupt)}); {hint}") from None
        missing = [f for f in _raw_files(cls) if not (raw / f).is_file()]
        what = f"missing {', '.join(missing)}" if missing else "files present but unreadable"
        if not download:
            raise DatasetError(f"{name} not found under {raw} ({what}); {hint}") from None
        created = [d for d in (root, raw.parent) if not d.exists()]
        try:
            ds = cls(str(root), train=train, download=True)
        except Exception as failed:  # no network, or a mirror down: say what failed and what to do
            for folder in reversed(created):  # leave nothing behind from a failed download
                shutil.rmtree(folder, ignore_errors=True)
            raise DatasetError(f"{name} not found under {raw} ({what}) and the download failed "
                               f"({_one_line(failed)}); {hint}") from None
    except Exception as corrupt:  # torchvision asserts on a bad magic number, TypeError on a wrong dtype, ...
        raise DatasetError(f"{name} {split} split under {raw} is corrupt or truncated "
                           f"({_one_line(corrupt) or type(corrupt).__name__ + ' while parsing'}); {hint}") from None
    images, labels = ds.data, ds.targets
    expected = 60_000 if train else 10_000
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or images.dtype != torch.uint8:
        raise DatasetError(f"{name} {split} images under {raw} have shape {tuple(images.shape)} "
                           f"{images.dtype}, expected ({expected}, 28, 28) uint8; {hint}")
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{name} {split} split under {raw} has {images.shape[0]} images but "
                           f"{labels.shape[0]} labels; {hint}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(ds.classes)):
        raise DatasetError(f"{name} {split} labels under {raw} fall outside 0..{len(ds.classes) - 1}; {hint}")
    return ImageDataset(name, images.unsqueeze(1).contiguous(), labels, [str(c) for c in ds.classes])


def _raw_files(cls) -> list[str]:
    return [pathlib.Path(url).name.removesuffix(".gz") for url, _ in cls.resources]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def synthetic_dataset(count: int, *, train: bool = True, seed: int = 0, num_classes: int = 10,
                      size: int = 28) -> ImageDataset:
    """MNIST-shaped images whose labels a CNN can learn: each class is a fixed smooth random pattern,
    each sample that pattern shifted by up to 2 pixels, scaled, and with noise added.

    The class patterns depend only on ``seed``; the samples also on ``train``, so train and test differ.
    """
    pattern_gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 1, 7, 7, generator=pattern_gen)
    patterns = torch.nn.functional.interpolate(coarse, size=(size + 4, size + 4), mode="bicubic",
                                               align_corners=False).clamp(0, 1)
    sample_gen = torch.Generator().manual_seed(seed * 2 + (1 if train else 2))
    labels = torch.randint(num_classes, (count,), generator=sample_gen)
    dy = torch.randint(5, (count,), generator=sample_gen)
    dx = torch.randint(5, (count,), generator=sample_gen)
    rows = (dy[:, None] + torch.arange(size))[:, :, None]
    cols = (dx[:, None] + torch.arange(size))[:, None, :]
    images = patterns[labels, 0][torch.arange(count)[:, None, None], rows, cols]
    scale = 0.6 + 0.4 * torch.rand(count, 1, 1, generator=sample_gen)
    noise = 0.15 * torch.randn(count, size, size, generator=sample_gen)
    pixels = ((images * scale + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageDataset("synthetic", pixels.unsqueeze(1), labels, [str(i) for i in range(num_classes)])


def batches_per_epoch(count: int, batch_size: int, drop_last: bool) -> int:
    return count // batch_size if drop_last else math.ceil(count / batch_size)

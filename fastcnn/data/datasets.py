"""Datasets as whole uint8 tensors in memory: read once (through torchvision for MNIST-style sets), then
served by any loader.

``ImageDataset.images`` is uint8 (N, C, H, W) and ``labels`` int64 (N,). Loaders (device, DALI, torch) all take
an ImageDataset, so every loader serves exactly the same samples.

Shapes. MNIST and Fashion-MNIST are 1x28x28, CIFAR-10 3x32x32; an image folder keeps its images' colour and
size (``fastcnn.data.imagefolder``); synthetic data is any shape. ``channels`` and ``image_size`` convert a set to
another shape (gray <-> RGB, antialiased bilinear resize), as the image folder decoder does for its images.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastcnn.errors import DatasetError, NotAvailableError, UsageError

DATASETS = ("mnist", "fashion-mnist", "synthetic", "imagefolder", "cifar10")
DEFAULT_SYNTHETIC_SIZE = (60_000, 10_000)
CHANNEL_CHOICES = (1, 3)
# ITU-R 601-2 luma, PIL's convert("L") weights: RGB -> grayscale everywhere in fastcnn
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


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

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of the pixels scaled to [0, 1], over every image: what Normalize(mean, std)
        needs to make each channel zero-mean and unit-variance on this set. Exact (from per-channel histograms,
        in float64) and computed once per dataset object."""
        if self._stats is None:
            self._stats = channel_stats(self.images)
        return self._stats


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of uint8 (N, C, H, W) ``images`` scaled to [0, 1] (population std; 1.0 for a
    constant channel, so that normalizing by it stays finite)."""
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


def parse_image_size(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``28`` / ``(28, 28)`` -> (height, width); None stays None. ValueError for a size below 1."""
    if value is None:
        return None
    height, width = (value, value) if isinstance(value, int) else (int(v) for v in value)
    if height < 1 or width < 1:
        raise ValueError(f"an image size must be at least 1x1, got {height}x{width}")
    return height, width


def convert_images(images: torch.Tensor, channels: int | None = None,
                   image_size: int | Sequence[int] | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, ``channels``, ``image_size``): grayscale to RGB by repeating the channel,
    RGB to grayscale with ``LUMA_WEIGHTS``, then an antialiased bilinear resize (aspect ratio not kept, like
    ``transforms.Resize((h, w))``). Unchanged (the same tensor) when it already has that shape."""
    channels = channels or images.shape[1]
    if channels not in CHANNEL_CHOICES or images.shape[1] not in CHANNEL_CHOICES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {images.shape[1]} -> {channels}")
    size = parse_image_size(image_size) or tuple(images.shape[2:])
    if images.shape[1] == channels and tuple(images.shape[2:]) == size:
        return images
    out = torch.empty((images.shape[0], channels, *size), dtype=torch.uint8, device=images.device)
    for lo in range(0, images.shape[0], 4096):  # bounds the float temporary
        chunk = images[lo:lo + 4096].to(torch.float32)
        if chunk.shape[1] == 3 and channels == 1:
            weights = torch.tensor(LUMA_WEIGHTS, device=chunk.device).view(1, 3, 1, 1)
            chunk = (chunk * weights).sum(1, keepdim=True)
        elif chunk.shape[1] == 1 and channels == 3:
            chunk = chunk.expand(-1, 3, -1, -1)
        if tuple(chunk.shape[2:]) != size:
            chunk = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False, antialias=True)
        out[lo:lo + 4096] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def describe_shape(shape: Sequence[int]) -> str:
    """(3, 32, 32) -> "RGB 3x32x32"; (1, 28, 28) -> "grayscale 1x28x28"."""
    kind = {1: "grayscale", 3: "RGB"}.get(shape[0], f"{shape[0]}-channel")
    return f"{kind} {'x'.join(str(v) for v in shape)}"


def default_data_root(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """--data-dir, else $FASTCNN_DATA, else ./data."""
    return pathlib.Path(data_dir or os.environ.get("FASTCNN_DATA") or "data")


def load_dataset(name: str, train: bool, *, root: str | os.PathLike | None = None, download: bool = True,
                 synthetic_size: tuple[int, int] = DEFAULT_SYNTHETIC_SIZE, seed: int = 0,
                 channels: int | None = None, image_size: int | Sequence[int] | None = None,
                 subset: int | None = None) -> ImageDataset:
    """Load the train or test split of a dataset by name (see ``DATASETS``).

    ``channels`` (1 or 3) and ``image_size`` (N or (H, W)): the shape to deliver; None keeps the dataset's own
    (for an image folder: inferred from its images). ``subset``: only that many images, the first ones (for an
    image folder, spread evenly over its classes, and only those are decoded)."""
    if channels is not None and channels not in CHANNEL_CHOICES:
        raise UsageError(f"--channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    try:
        image_size = parse_image_size(image_size)
    except ValueError as err:
        raise UsageError(f"--image-size: {err}") from None
    if name == "imagefolder":
        return _load_imagefolder(root, train, channels=channels, image_size=image_size, subset=subset)
    if name == "synthetic":
        return synthetic_dataset(synthetic_size[0] if train else synthetic_size[1], train=train, seed=seed,
                                 channels=channels or 1, size=image_size or 28).subset(subset)
    if name in ("mnist", "fashion-mnist"):
        dataset = _load_torchvision_mnist(name, train, default_data_root(root), download)
    elif name == "cifar10":
        from fastcnn.data.cifar import load_cifar10

        dataset = load_cifar10(default_data_root(root), train, download=download)
    else:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    dataset = dataset.subset(subset)
    converted = convert_images(dataset.images, channels, image_size)
    if converted is not dataset.images:
        dataset = dataclasses.replace(dataset, images=converted, _stats=None, notes=[
            *dataset.notes, f"{name} images ({describe_shape(dataset.image_shape)}) converted to "
            f"{describe_shape(converted.shape[1:])}"])
    return dataset


def _load_imagefolder(root, train: bool, *, channels: int | None, image_size: tuple[int, int] | None,
                      subset: int | None) -> ImageDataset:
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

    # The same held-out test images whatever the run's seed: the hold-out split is not seeded by it.
    return load_imagefolder(root, train, channels=channels, image_size=image_size, subset=subset)


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
    patterns = torch.nn.functional.interpolate(coarse, size=(height + 4, width + 4), mode="bicubic",
                                               align_corners=False).clamp(0, 1)
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


def batches_per_epoch(count: int, batch_size: int, drop_last: bool) -> int:
    return count // batch_size if drop_last else math.ceil(count / batch_size)

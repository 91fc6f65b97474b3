"""The dataset dispatcher: ``load_dataset(name, train)`` reads the named set from its source and delivers it as
an ImageDataset in the shape asked for.

Sources, one module each: ``mnist`` (MNIST and Fashion-MNIST IDX files), ``cifar`` (CIFAR-10 batches),
``imagefolder`` (a folder of PNG/JPEG images, decoded by DALI), ``synthetic`` (made from a seed).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

from fastcnn.data.cifar import load_cifar10
from fastcnn.data.dali_status import dali_status
from fastcnn.data.image_dataset import ImageDataset
from fastcnn.data.image_shape import CHANNEL_CHOICES, convert_images, describe_shape, parse_image_size
from fastcnn.data.mnist import MNIST_NAMES, load_mnist
from fastcnn.data.synthetic import DEFAULT_SYNTHETIC_SIZE, synthetic_dataset
from fastcnn.errors import NotAvailableError, UsageError

DATASETS = ("mnist", "fashion-mnist", "synthetic", "imagefolder", "cifar10")

__all__ = ["DATASETS", "default_data_root", "load_dataset"]


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
    if name == "imagefolder":  # decoded straight to the shape asked for
        return _load_imagefolder(root, train, channels=channels, image_size=image_size, subset=subset)
    if name == "synthetic":  # made in the shape asked for
        return synthetic_dataset(synthetic_size[0] if train else synthetic_size[1], train=train, seed=seed,
                                 channels=channels or 1, size=image_size or 28).subset(subset)
    if name in MNIST_NAMES:
        dataset = load_mnist(name, train, default_data_root(root), download)
    elif name == "cifar10":
        dataset = load_cifar10(default_data_root(root), train, download=download)
    else:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    dataset = dataset.subset(subset)
    converted = convert_images(dataset.images, channels, image_size)
    if converted is dataset.images:
        return dataset
    return dataset.with_images(converted, f"{name} images ({describe_shape(dataset.image_shape)}) converted to "
                                          f"{describe_shape(converted.shape[1:])}")


def _load_imagefolder(root, train: bool, *, channels: int | None, image_size: tuple[int, int] | None,
                      subset: int | None) -> ImageDataset:
    # No default root here: ./data holds MNIST/ and FashionMNIST/, which would be taken for classes.
    if root is None:
        raise UsageError("--dataset imagefolder needs --data-dir: a folder laid out as <class>/<image>.png "
                         "(or train/<class>/... and test/<class>/...)")
    ok, why = dali_status()
    if not ok:
        raise NotAvailableError(f"--dataset imagefolder decodes images with DALI, which is not available "
                                f"here: {why}")
    # Imported here, not at the top: the decoder imports nvidia.dali, which is optional (checked just above).
    from fastcnn.data.imagefolder import load_imagefolder

    # The same held-out test images whatever the run's seed: the hold-out split is not seeded by it.
    return load_imagefolder(root, train, channels=channels, image_size=image_size, subset=subset)

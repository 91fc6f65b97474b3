"""MNIST and Fashion-MNIST (``--dataset mnist`` / ``fashion-mnist``): the four IDX files in torchvision's layout
(``<root>/MNIST/raw``, ``<root>/FashionMNIST/raw``), read once through torchvision into an ImageDataset of
uint8 (N, 1, 28, 28). A missing set is downloaded when ``download`` allows; a missing, truncated or corrupt file
is a one-line DatasetError that names the folder and what to put there.
"""

from __future__ import annotations

import pathlib
import re
import shutil

import torch
from torchvision.datasets import MNIST, FashionMNIST

from fastcnn.data.error_text import one_line
from fastcnn.data.image_dataset import ImageDataset
from fastcnn.errors import DatasetError

MNIST_NAMES = ("mnist", "fashion-mnist")
# Images in the train and the test split, the same for both sets
MNIST_SPLIT_SIZES = (60_000, 10_000)
IMAGE_SIZE = (28, 28)


def download_failure(failed: BaseException) -> str:
    """Why a torchvision download failed, in a few words: the network's own reason when there is one
    (torchvision strings together every mirror it tried, each with the same urlopen error)."""
    reason = re.search(r"<urlopen error (?:\[Errno -?\d+\] )?([^>]+)>", str(failed))
    return f"no network: {reason.group(1)}" if reason else one_line(failed, limit=120)


def load_mnist(name: str, train: bool, root: pathlib.Path, download: bool) -> ImageDataset:
    """The train or test split of ``name`` (one of ``MNIST_NAMES``) under ``root``: images uint8 (N, 1, 28, 28),
    labels int64 (N,), classes torchvision's names."""
    cls = MNIST if name == "mnist" else FashionMNIST
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
                               f"({one_line(missing_or_corrupt)}); {hint}") from None
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
            raise DatasetError(f"{name} not found under {raw} ({what}), and downloading it failed "
                               f"({download_failure(failed)}); {hint}") from None
    except Exception as corrupt:  # torchvision asserts on a bad magic number, TypeError on a wrong dtype, ...
        raise DatasetError(f"{name} {split} split under {raw} is corrupt or truncated "
                           f"({one_line(corrupt) or type(corrupt).__name__ + ' while parsing'}); {hint}") from None
    images, labels = ds.data, ds.targets
    expected = MNIST_SPLIT_SIZES[0] if train else MNIST_SPLIT_SIZES[1]
    if images.dim() != 3 or tuple(images.shape[1:]) != IMAGE_SIZE or images.dtype != torch.uint8:
        raise DatasetError(f"{name} {split} images under {raw} have shape {tuple(images.shape)} "
                           f"{images.dtype}, expected ({expected}, {IMAGE_SIZE[0]}, {IMAGE_SIZE[1]}) uint8; {hint}")
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{name} {split} split under {raw} has {images.shape[0]} images but "
                           f"{labels.shape[0]} labels; {hint}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(ds.classes)):
        raise DatasetError(f"{name} {split} labels under {raw} fall outside 0..{len(ds.classes) - 1}; {hint}")
    return ImageDataset(name, images.unsqueeze(1).contiguous(), labels, [str(c) for c in ds.classes])


def _raw_files(cls) -> list[str]:
    return [pathlib.Path(url).name.removesuffix(".gz") for url, _ in cls.resources]

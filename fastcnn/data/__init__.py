"""Data: datasets as uint8 tensors, and the loaders that serve them (device-resident, DALI, torch reference)."""

from __future__ import annotations

from fastcnn.data.datasets import DATASETS, ImageDataset, default_data_root, load_dataset, synthetic_dataset
from fastcnn.data.device_loader import DeviceLoader, normalize_uint8
from fastcnn.data.torch_loader import TorchLoader

LOADERS = ("device", "dali", "torch")

__all__ = ["DATASETS", "LOADERS", "DeviceLoader", "ImageDataset", "TorchLoader", "default_data_root",
           "load_dataset", "make_loader", "normalize_uint8", "synthetic_dataset"]


def make_loader(kind: str, dataset: ImageDataset, batch_size: int, **options):
    """Build the loader named ``kind`` ("device", "dali" or "torch"); all take the same options."""
    if kind == "device":
        return DeviceLoader(dataset, batch_size, **options)
    if kind == "torch":
        return TorchLoader(dataset, batch_size, **options)
    if kind == "dali":
        from fastcnn.data.dali_loader import DaliLoader

        return DaliLoader(dataset, batch_size, **options)
    raise ValueError(f"unknown loader {kind!r}; choose one of {LOADERS}")

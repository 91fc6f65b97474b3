"""The loaders by name: ``make_loader("device" | "dali" | "torch", dataset, batch_size, **options)``.

All three serve the same batches for the same options (``DeviceLoader``: the whole set resident on the device;
``DaliLoader``: the same batches made by a DALI pipeline; ``TorchLoader``: the tutorials' DataLoader + PIL path,
the reference).
"""

from __future__ import annotations

from fastcnn.data.device_loader import DeviceLoader
from fastcnn.data.image_dataset import ImageDataset
from fastcnn.data.torch_loader import TorchLoader

LOADERS = ("device", "dali", "torch")


def make_loader(kind: str, dataset: ImageDataset, batch_size: int, **options):
    """Build the loader named ``kind`` ("device", "dali" or "torch"); all take the same options."""
    if kind == "device":
        return DeviceLoader(dataset, batch_size, **options)
    if kind == "torch":
        return TorchLoader(dataset, batch_size, **options)
    if kind == "dali":
        # Imported here, not at the top: the DALI loader imports nvidia.dali, which is optional.
        from fastcnn.data.dali_loader import DaliLoader

        return DaliLoader(dataset, batch_size, **options)
    raise ValueError(f"unknown loader {kind!r}; choose one of {LOADERS}")

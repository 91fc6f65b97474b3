"""Data: datasets as uint8 tensors, and the loaders that serve them (device-resident, DALI, torch reference).

One module per concept: ``image_dataset`` (the ImageDataset type), ``datasets`` (``load_dataset``: which source
for which name), the sources ``mnist``, ``cifar``, ``imagefolder`` (with ``image_headers``) and ``synthetic``,
``image_shape`` (channels, sizes, converting between them), ``normalization`` (statistics and the normalize
step), ``sampling`` (epoch order, sharding), the loaders ``device_loader``, ``torch_loader`` and ``dali_loader``
(chosen by name in ``loaders``), ``dali_status`` (whether DALI runs here) and ``dali_runtime`` (what the DALI
pipelines share).
"""

from __future__ import annotations

from fastcnn.data.datasets import DATASETS, default_data_root, load_dataset
from fastcnn.data.device_loader import DeviceLoader
from fastcnn.data.image_dataset import ImageDataset
from fastcnn.data.loaders import LOADERS, make_loader
from fastcnn.data.mnist import MNIST_SPLIT_SIZES
from fastcnn.data.normalization import FASHION_MNIST_NORM, MNIST_NORM, normalize_uint8
from fastcnn.data.synthetic import DEFAULT_SYNTHETIC_SIZE, synthetic_dataset
from fastcnn.data.torch_loader import TorchLoader

__all__ = ["DATASETS", "DEFAULT_SYNTHETIC_SIZE", "FASHION_MNIST_NORM", "LOADERS", "MNIST_NORM", "MNIST_SPLIT_SIZES",
           "DeviceLoader", "ImageDataset", "TorchLoader", "default_data_root", "load_dataset", "make_loader",
           "normalize_uint8", "synthetic_dataset"]

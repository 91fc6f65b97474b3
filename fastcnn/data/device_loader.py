"""DeviceLoader: the whole dataset resident on the training device, batches cut out of it there.

No per-sample Python and no host-to-device copies after set-up: each epoch is one ``torch.randperm`` on the
device, each batch two gathers (images, labels). The images are normalized, cast and laid out once, at set-up,
when that copy fits in ``PREPARED_MAX_BYTES``: a batch then costs two kernel launches instead of seven, which
matters on a GPU where a small CNN's step takes tens of microseconds. Larger datasets keep uint8 pixels and
normalize each batch. Either way the values are bitwise the same. Under a CUDA graph the two gathers write
straight into the graph's input buffers (``DeviceLoader.serve_into``), so a step is two gathers and a replay.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from fastcnn.data.image_dataset import ImageDataset
from fastcnn.data.normalization import as_channel_tensor, normalize_uint8
from fastcnn.data.sampling import batches_per_epoch, check_sharding, epoch_permutation, shard, shard_size

PREPARED_MAX_BYTES = 2 * 2**30  # normalized copy kept on the device up to this size (MNIST fp32: 188 MB)
_PREPARE_CHUNK = 8192  # images normalized at a time at set-up, to bound the fp32 temporary

__all__ = ["PREPARED_MAX_BYTES", "DeviceLoader", "ResidentLoader"]


class ResidentLoader:
    """What the device-resident loaders share (DeviceLoader, and DaliLoader): the uint8 dataset and its labels on
    ``device``, normalization statistics there, this rank's shard, the epoch (and batch) to serve next, and the
    epoch's order of samples (``fastcnn.data.sampling``), so that equal seeds serve equal batches."""

    def __init__(self, dataset: ImageDataset, batch_size: int, *, device: torch.device | str = "cpu",
                 shuffle: bool = True, drop_last: bool = False, seed: int = 0,
                 mean: Sequence[float] | float = 0.0, std: Sequence[float] | float = 1.0,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_sharding(rank, world_size)
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        channels = self.images.shape[1]
        self.mean = as_channel_tensor(mean, channels, self.device)
        self.std = as_channel_tensor(std, channels, self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.dtype = dtype
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.rank, self.world_size = rank, world_size
        self.num_samples = shard_size(len(dataset), world_size)
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Serve epoch ``epoch`` next, starting at batch ``start_batch`` (to resume inside an epoch)."""
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_order(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, on the device, in serving order."""
        order = epoch_permutation(self.labels.numel(), seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
                                  device=self.device)
        return shard(order, self.rank, self.world_size)


class DeviceLoader(ResidentLoader):
    """Serves ``(images, labels)`` batches of ``dataset`` from memory on ``device``.

    images: ``dtype`` (N, C, H, W), normalized like ToTensor + Normalize(mean, std), channels-last when asked;
    labels: int64 (N,). One epoch visits every sample of this rank's shard exactly once, in the order of
    ``fastcnn.data.sampling.epoch_permutation``; the last batch is smaller unless ``drop_last``. Keyword options:
    those of ``ResidentLoader``.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, **options):
        super().__init__(dataset, batch_size, **options)
        self.prepared = self._prepare() if self._prepared_bytes() <= PREPARED_MAX_BYTES else None
        self._destination = None  # (images, labels, the images' NHWC or NCHW view) set by serve_into

    def serve_into(self, images: torch.Tensor | None, labels: torch.Tensor | None = None) -> bool:
        """Gather every full batch into ``images`` and ``labels`` (a CUDA graph's static inputs) and yield those
        same two tensors, instead of new ones: the graph then needs no copy of its inputs per step. Each batch
        overwrites the previous one, in stream order (a step issued before the next batch is gathered reads its
        own batch). The last, smaller batch is still a new tensor. ``None`` goes back to new tensors.

        Returns whether it will: only with the normalized copy resident (``prepared``), and only for tensors
        exactly like a full batch (shape, dtype, device, layout); otherwise nothing changes."""
        self._destination = None
        if images is None or labels is None or self.prepared is None:
            return False
        rows = images.permute(0, 2, 3, 1) if self.memory_format == torch.channels_last else images
        fits = (rows.shape == (self.batch_size, *self.prepared.shape[1:]) and rows.is_contiguous()
                and images.dtype == self.dtype and images.device == self.prepared.device
                and labels.shape == (self.batch_size,) and labels.dtype == self.labels.dtype
                and labels.device == self.labels.device and labels.is_contiguous())
        if fits:
            self._destination = (images, labels, rows)
        return fits

    def _prepared_bytes(self) -> int:
        return self.images.numel() * self.dtype.itemsize

    def _prepare(self) -> torch.Tensor:
        """Every image normalized, cast, and stored so that a gather along dim 0 yields the batch layout:
        (N, H, W, C) contiguous for channels-last (served as a permuted view), (N, C, H, W) otherwise."""
        channels_last = self.memory_format == torch.channels_last
        shape = self.images.shape
        prepared = torch.empty((shape[0], shape[2], shape[3], shape[1]) if channels_last else shape,
                               dtype=self.dtype, device=self.device)
        for start in range(0, shape[0], _PREPARE_CHUNK):
            chunk = normalize_uint8(self.images[start:start + _PREPARE_CHUNK], self.mean, self.std).to(self.dtype)
            prepared[start:start + _PREPARE_CHUNK] = chunk.permute(0, 2, 3, 1) if channels_last else chunk
        return prepared

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_order()
        for batch in range(self.start_batch, len(self)):
            index = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            destination = self._destination  # read per batch: serve_into may be called between batches
            if destination is not None and index.numel() == self.batch_size:
                images, labels, rows = destination
                torch.index_select(self.prepared, 0, index, out=rows)
                torch.index_select(self.labels, 0, index, out=labels)
                yield images, labels
            else:
                yield self.gather_images(index), self.labels.index_select(0, index)

    def gather_images(self, index: torch.Tensor) -> torch.Tensor:
        if self.prepared is None:
            return self.transform(self.images.index_select(0, index))
        images = self.prepared.index_select(0, index)
        return images.permute(0, 3, 1, 2) if self.memory_format == torch.channels_last else images

    def transform(self, pixels: torch.Tensor) -> torch.Tensor:
        images = normalize_uint8(pixels, self.mean, self.std)
        return images.to(dtype=self.dtype, memory_format=self.memory_format)

"""TorchLoader: the tutorials' data path (torchvision DataLoader, PIL image per sample, ToTensor + Normalize).

It is the reference twin of DeviceLoader: same constructor, same batches in the same order for the same seed
(on CPU), but every sample goes through Python and PIL as in the tutorial programs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from fastcnn.data.image_dataset import ImageDataset
from fastcnn.data.normalization import as_channel_tensor
from fastcnn.data.sampling import batches_per_epoch, check_sharding, epoch_permutation, shard, shard_size


class PILImageDataset(Dataset):
    """Like torchvision's MNIST.__getitem__: a PIL image per sample, then the per-sample transform."""

    def __init__(self, dataset: ImageDataset, transform):
        self.images, self.labels, self.transform = dataset.images, dataset.labels, transform

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int):
        pixels = self.images[index]
        # (H, W) uint8 becomes a mode "L" image and (H, W, 3) an "RGB" one, as in torchvision's datasets.
        array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
        return self.transform(Image.fromarray(array)), int(self.labels[index])


class EpochSampler(Sampler[int]):
    """RandomSampler's order (one seeded randperm per epoch) made reproducible per epoch and shardable."""

    def __init__(self, num_samples: int, *, shuffle: bool, seed: int, rank: int, world_size: int):
        self.total, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def __iter__(self):
        order = shard(epoch_permutation(self.total, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle),
                      self.rank, self.world_size)
        return iter(order[self.start:].tolist())

    def __len__(self) -> int:
        return shard_size(self.total, self.world_size) - self.start


class TorchLoader:
    """The reference loader: same interface as DeviceLoader, tutorial-style data path underneath."""

    def __init__(self, dataset: ImageDataset, batch_size: int, *, device: torch.device | str = "cpu",
                 shuffle: bool = True, drop_last: bool = False, seed: int = 0,
                 mean: Sequence[float] | float = 0.0, std: Sequence[float] | float = 1.0,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_sharding(rank, world_size)
        channels = dataset.images.shape[1]
        mean = as_channel_tensor(mean, channels, "cpu").flatten().tolist()
        std = as_channel_tensor(std, channels, "cpu").flatten().tolist()
        steps = [transforms.ToTensor()]
        if any(m != 0.0 for m in mean) or any(s != 1.0 for s in std):
            steps.append(transforms.Normalize(mean, std))
        self.sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
        self.loader = DataLoader(PILImageDataset(dataset, transforms.Compose(steps)), batch_size=batch_size,
                                 sampler=self.sampler, drop_last=drop_last, num_workers=num_workers)
        self.device = torch.device(device)
        self.batch_size, self.drop_last, self.dtype = batch_size, drop_last, dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.num_samples = shard_size(len(dataset), world_size)
        self.epoch = 0

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = self.sampler.epoch = epoch
        self.sampler.start = start_batch * self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plain = self.device.type == "cpu" and self.dtype == torch.float32 and \
            self.memory_format == torch.contiguous_format
        for images, labels in self.loader:
            if plain:  # the tutorial program: batches used as the DataLoader made them
                yield images, labels
            else:
                yield (images.to(self.device, self.dtype, non_blocking=True, memory_format=self.memory_format),
                       labels.to(self.device, non_blocking=True))

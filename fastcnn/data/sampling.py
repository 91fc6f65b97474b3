"""Sampling: the per-epoch sample order shared by every loader, so that loaders are interchangeable and resumable.

Epoch ``e`` of a run with seed ``s`` is one ``torch.randperm`` drawn from a generator seeded with (s, e): it
does not depend on how many epochs ran before, so a resumed run sees the same order as an uninterrupted one.
For data parallel, each rank takes every ``world_size``-th index of the permutation after dropping the tail
that does not divide evenly (every rank must run the same number of steps).
"""

from __future__ import annotations

import math

import torch


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63 - 1)


def epoch_permutation(num_samples: int, *, seed: int, epoch: int, shuffle: bool = True,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices 0..num_samples-1 in the order of ``epoch`` (identity when shuffle is False), on ``device``."""
    device = torch.device(device)
    if not shuffle:
        return torch.arange(num_samples, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator, device=device)


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of an epoch's indices: equal-sized, disjoint, covering all but < world_size samples."""
    if world_size == 1:
        return indices
    usable = indices.numel() // world_size * world_size
    return indices[:usable][rank::world_size]


def shard_size(num_samples: int, world_size: int) -> int:
    """How many samples each rank's shard of ``num_samples`` holds (``shard``'s length)."""
    return num_samples // world_size


def check_sharding(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")


def batches_per_epoch(count: int, batch_size: int, drop_last: bool) -> int:
    """Batches of ``batch_size`` in an epoch of ``count`` samples: a smaller last one unless ``drop_last``."""
    return count // batch_size if drop_last else math.ceil(count / batch_size)

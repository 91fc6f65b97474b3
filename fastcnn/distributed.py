"""Data parallel training on torch.distributed: NCCL on GPUs, gloo on CPUs.

``torchrun --nproc-per-node N -m fastcnn train ...`` starts N processes; each reads RANK / WORLD_SIZE /
LOCAL_RANK from its environment (``DistributedContext.from_env``), trains on its own shard of every epoch with
DistributedDataParallel, and only rank 0 writes logs, checkpoints and the summary. ``fastcnn train --nproc N``
runs that torchrun command for you (fastcnn.launch).

Every rank must make the same collective calls in the same order, or the others wait in an all-reduce forever:
stop requests and non-finite losses are agreed on by all ranks together (fastcnn.stopping, through ``all_max_``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastcnn.engine import EpochProgress, EpochStats
from fastcnn.errors import UsageError


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether this process is one rank of a process group (started by torchrun), even a group of one."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str, *, cuda_graph: bool = False) -> DistributedContext:
        """Join the process group torchrun set up (a no-op context when not started by torchrun).
        ``cuda_graph``: the training step will be captured with its NCCL all-reduces (see fastcnn.cuda_graph)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1 and not launched_by_torchrun():
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)  # so that "cuda" means this process's GPU
            if cuda_graph:
                # PyTorch's CUDA-graphs notes, "Usage with DistributedDataParallel", NCCL >= 2.9.6, step 1: no
                # asynchronous NCCL error handling when collectives are captured (set before the group exists;
                # set, not defaulted: a cluster's own setting of 1 or 3 would break the capture).
                os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(rank, world_size, local_rank, backend)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (identity when not distributed)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def max(self, value: float, device: torch.device) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor)

    def all_max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of ``tensor`` over all ranks, in place (the tensor itself when not distributed).
        Queued on the device like any collective: reading the result is what waits for it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def parameters_in_sync(self, model: torch.nn.Module, device: torch.device) -> bool:
        """Whether every rank holds bitwise the same parameters (DDP's promise; checked at the end of a run)."""
        if not self.enabled:
            return True
        flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in model.parameters()]).to(device)
        gathered = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(gathered, flat)
        return all(torch.equal(gathered[0], other) for other in gathered[1:])

    def from_main(self, value: object) -> object:
        """Rank 0's ``value`` on every rank (any picklable object; ``value`` itself when not distributed)."""
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """Whether this process is one of torchrun's workers (torchrun marks them, even a group of one)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def per_rank_batch_size(global_batch: int, world_size: int) -> int:
    """-b is the global batch: each of the world_size ranks takes an equal share of it."""
    if global_batch % world_size:
        raise UsageError(f"--batch-size {global_batch} does not split evenly over {world_size} processes; "
                         f"use a multiple of {world_size}")
    return global_batch // world_size


def global_stats(stats: EpochStats, ctx: DistributedContext, device: torch.device) -> EpochStats:
    """An epoch's training loss, accuracy and throughput over all ranks (the slowest rank's time)."""
    if not ctx.enabled:
        return stats
    loss_sum, correct, samples = ctx.sum([stats.loss * stats.samples, stats.accuracy * stats.samples / 100.0,
                                          float(stats.samples)], device)
    seconds = ctx.max(stats.seconds, device)
    return EpochStats(loss_sum / max(samples, 1), 100.0 * correct / max(samples, 1), int(samples), seconds)


def global_progress(progress: EpochProgress, ctx: DistributedContext, device: torch.device) -> EpochProgress:
    """The sums of an epoch in progress over all ranks (the slowest rank's time), for rank 0's checkpoint. Every
    rank must call it at the same step."""
    if not ctx.enabled:
        return progress
    loss_sum, correct, samples = ctx.sum([float(progress.loss_sum), float(progress.correct), float(progress.samples)],
                                         device)
    return EpochProgress(torch.tensor(loss_sum, dtype=torch.float64, device=device),
                         torch.tensor(round(correct), dtype=torch.int64, device=device), round(samples),
                         ctx.max(progress.seconds, device), progress.batches)


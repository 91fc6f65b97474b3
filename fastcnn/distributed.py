"""Data parallel training on torch.distributed: NCCL on GPUs, gloo on CPUs.

``torchrun --nproc-per-node N -m fastcnn train ...`` starts N processes; each reads RANK / WORLD_SIZE /
LOCAL_RANK from its environment (``DistributedContext.from_env``), trains on its own shard of every epoch with
DistributedDataParallel, and only rank 0 writes logs, checkpoints and the summary. ``fastcnn train --nproc N``
runs that torchrun command for you (``--nproc 1``: DistributedDataParallel of one process, which checks the
data-parallel path on one GPU).

Every rank must make the same collective calls in the same order, or the others wait in an all-reduce forever.
So a rank never stops on its own: stop requests (SIGINT/SIGTERM) and non-finite losses are agreed on by all ranks
together (``all_max_``, from ``fastcnn.train.StopAgreement``), and every rank stops, or raises, at the same step.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
        if world_size <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun sets it, even for one process
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


def per_rank_batch_size(global_batch: int, world_size: int) -> int:
    """-b is the global batch: each of the world_size ranks takes an equal share of it."""
    if global_batch % world_size:
        raise UsageError(f"--batch-size {global_batch} does not split evenly over {world_size} processes; "
                         f"use a multiple of {world_size}")
    return global_batch // world_size


def launch(nproc: int, argv: list[str], cfg) -> int:
    """Run ``fastcnn <argv>`` under torchrun with ``nproc`` processes on this machine.

    Everything that can be checked once (arguments, dataset, output folder, GPU count) is checked here first, so
    that a mistake is one line rather than one per process. Then this process becomes torchrun (exec), so that
    Ctrl-C and SIGTERM reach torchrun, which passes them on to the workers; its exit status is the workers' (see
    ``run_torchrun``).
    """
    from fastcnn.train import preflight

    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    if cfg.runs > 1:
        raise UsageError("--runs and --nproc do not combine; run the data-parallel runs one by one")
    rc = preflight(cfg)
    if rc.device == "cuda" and nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc {nproc} needs {nproc} GPUs but {torch.cuda.device_count()} are visible; one "
                         "process per GPU")
    per_rank_batch_size(rc.batch_size, nproc)
    command = [sys.executable, "-m", "fastcnn.distributed", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "fastcnn", *argv]
    print("fastcnn: running " + " ".join(command[1:]), file=sys.stderr, flush=True)
    os.execv(sys.executable, command)
    return 1  # not reached


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without its --nproc option (so the launched processes do not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def run_torchrun(args: list[str]) -> int:
    """torchrun (``python -m torch.distributed.run``) with ``args``, exiting like one fastcnn process would.

    torchrun itself exits 1, with a traceback, whenever a worker fails or it is signalled. Here the status is the
    first failed worker's: 130/143 when the run was interrupted (the workers agreed to stop and rank 0 saved a
    checkpoint), 1 when it diverged, 2 for a usage error, 128+N when a worker was killed by signal N; and
    128+N when torchrun itself got signal N (it passed it on to the workers and waited for them).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(args))
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        if failure.exitcode >= 0:
            return failure.exitcode or 1
        print(f"fastcnn: error: rank {rank} was killed by {failure.signal_name()}", file=sys.stderr)
        return 128 - failure.exitcode
    except SignalException as signalled:
        return 128 + int(signalled.sigval)
    return 0


if __name__ == "__main__":  # what ``launch`` execs
    sys.exit(run_torchrun(sys.argv[1:]))

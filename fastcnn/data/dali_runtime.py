"""What fastcnn's two DALI pipelines (the loader's batches, the image folder's decoding) share: the CPU cores
they may use, the CUDA stream they run on, and their outputs handed to torch without a copy.

Plain torch: it never imports DALI, so it imports where DALI is missing.
"""

from __future__ import annotations

import os

import torch


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity on Linux, else all of them); at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pipeline_stream(device: torch.device):
    """The CUDA stream a pipeline serving ``device`` runs on (the current one there); None on a CPU."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def output_to_torch(out, device: torch.device) -> torch.Tensor:
    """A pipeline's output batch (a DALI TensorList of samples of one shape) as one torch tensor on ``device``,
    sharing DALI's buffer through DLPack."""
    dense = out.as_tensor()  # the batch is one buffer: every sample has the same shape
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.from_dlpack(dense)
    return torch.from_dlpack(dense)

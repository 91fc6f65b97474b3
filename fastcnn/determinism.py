"""``--deterministic``: bitwise-repeatable runs, with the process's own settings given back afterwards."""

from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """Deterministic kernels only (an op without one fails loudly), no cuDNN autotuning. fastcnn's fused kernel
    already reduces its gradients in a fixed order. The previous settings come back afterwards, so a library
    caller's process is left as it was."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for deterministic GEMMs
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1], saved[2]

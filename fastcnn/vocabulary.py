"""The names users type, in one torch-free place (the CLI builds its --help from here without importing torch).

The fused Conv2d -> ReLU -> MaxPool2d op has two implementations, and everything (CLI, JSON, docs, code) calls
them by the same two names:
- ``fused``: fastcnn's one-kernel op (Triton on a GPU, the native C kernel on a CPU);
- ``aten``: PyTorch's own chain, ``F.conv2d`` -> ``F.relu`` -> ``F.max_pool2d``.
``auto`` lets fastcnn choose (by measurement where it can). ``triton`` and ``torch`` are the names older runs and
scripts used; they stay accepted and mean ``fused`` and ``aten``.
"""

from __future__ import annotations

KERNELS = ("auto", "fused", "aten")
KERNEL_ALIASES = {"triton": "fused", "torch": "aten"}


def canonical_kernel(name: str) -> str:
    """``name`` in the current vocabulary (an old alias is translated); ValueError for an unknown name."""
    name = KERNEL_ALIASES.get(name, name)
    if name not in KERNELS:
        known = ", ".join([*KERNELS, *KERNEL_ALIASES])
        raise ValueError(f"unknown kernel {name!r}: choose one of {known}")
    return name

"""fastcnn: train small convolutional networks as fast as the hardware allows.

Public API:
- ``conv_relu_pool(x, weight, bias=None, padding=0)``: the fused Conv2d -> ReLU -> MaxPool2d(2, 2) op.
- ``ConvReLUPool2d``: the drop-in module (an ``nn.Conv2d`` with the same state_dict).
- ``accelerate(model)``: rewrite a model's Conv2d -> ReLU -> MaxPool2d chains to the fused module.
- ``choose_kernels(model, train_batches, eval_batches)``: time the two implementations, ``fused`` (the fused
  kernel) and ``aten`` (PyTorch's chain), for each call shape on this device and let ``kernel="auto"`` layers use
  the faster one.

The names are imported on first use (PEP 562), so that ``import fastcnn`` and ``fastcnn --help`` do not import
torch: the command line starts in a fraction of a second.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "AccelerateReport": "fastcnn.accelerate",
    "accelerate": "fastcnn.accelerate",
    "accelerate_report": "fastcnn.accelerate",
    "KernelTiming": "fastcnn.kernel_choice",
    "choose_kernels": "fastcnn.kernel_choice",
    "resolve_kernel": "fastcnn.kernel_choice",
    "ConvReLUPool2d": "fastcnn.nn",
    "conv_relu_pool": "fastcnn.ops",
    "conv_relu_pool_reference": "fastcnn.ops",
    "fused_kernel_status": "fastcnn.ops",
}

__all__ = ["AccelerateReport", "ConvReLUPool2d", "KernelTiming", "accelerate", "accelerate_report",
           "choose_kernels", "conv_relu_pool", "conv_relu_pool_reference", "fused_kernel_status", "resolve_kernel",
           "__version__"]

if TYPE_CHECKING:
    from fastcnn.accelerate import AccelerateReport, accelerate, accelerate_report
    from fastcnn.kernel_choice import KernelTiming, choose_kernels, resolve_kernel
    from fastcnn.nn import ConvReLUPool2d
    from fastcnn.ops import conv_relu_pool, conv_relu_pool_reference, fused_kernel_status


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastcnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """``fastcnn.accelerate`` is the function, although a subpackage of the same name exists: the import system
    binds every submodule it loads to its parent's attribute, and here that one binding is declined (the package
    stays importable as ``from fastcnn.accelerate import ...``, through sys.modules)."""

    def __setattr__(self, name, value):
        if name == "accelerate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

"""fastcnn: train small convolutional networks as fast as the hardware allows.

Public API:
- ``conv_relu_pool(x, weight, bias=None, padding=0)``: the fused Conv2d -> ReLU -> MaxPool2d(2, 2) op.
- ``ConvReLUPool2d``: the drop-in module (an ``nn.Conv2d`` with the same state_dict).
- ``accelerate(model)``: rewrite a model's Conv2d -> ReLU -> MaxPool2d chains to the fused module.
- ``choose_kernels(model, train_batches, eval_batches)``: time the two implementations, ``fused`` (the fused
  kernel) and ``aten`` (PyTorch's chain), for each call shape on this device and let ``kernel="auto"`` layers use
  the faster one.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Imported eagerly on purpose: the first import of the package fastcnn.accelerate sets the attribute
# fastcnn.accelerate to the package; here it happens before the line binds that attribute to the function.
from fastcnn.accelerate import AccelerateReport, accelerate, accelerate_report  # noqa: E402, I001
from fastcnn.kernel_choice import KernelTiming, choose_kernels, resolve_kernel
from fastcnn.nn import ConvReLUPool2d
from fastcnn.ops import conv_relu_pool, conv_relu_pool_reference, fused_kernel_status

__all__ = ["AccelerateReport", "ConvReLUPool2d", "KernelTiming", "accelerate", "accelerate_report",
           "choose_kernels", "conv_relu_pool", "conv_relu_pool_reference", "fused_kernel_status", "resolve_kernel",
           "__version__"]

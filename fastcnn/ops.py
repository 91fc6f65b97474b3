"""The fused Conv2d -> ReLU -> MaxPool2d(2, 2) operation (functional form).

PLACEHOLDER FOR THE KERNEL WORK: today this is only the plain-PyTorch reference. The Triton op
registration (torch.library.triton_op "fastcnn::conv_relu_pool") replaces the body of conv_relu_pool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_relu_pool_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                             padding: int = 0) -> torch.Tensor:
    """``max_pool2d(relu(conv2d(x, weight, bias, padding)), 2, 2)`` in plain PyTorch: the reference twin."""
    return F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding=padding)), kernel_size=2, stride=2)


def conv_relu_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   padding: int = 0) -> torch.Tensor:
    return conv_relu_pool_reference(x, weight, bias, padding)

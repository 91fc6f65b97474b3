"""Drop-in modules: ``ConvReLUPool2d`` is an ``nn.Conv2d`` (same parameters, same state_dict) whose forward
is the fused Conv2d -> ReLU -> MaxPool2d(2, 2)."""

from __future__ import annotations

import torch
from torch import nn

from fastcnn.ops import conv_relu_pool, conv_relu_pool_reference

KERNEL_CHOICES = ("auto", "triton", "torch")


class ConvReLUPool2d(nn.Conv2d):
    """``MaxPool2d(2, 2)(ReLU()(Conv2d(...)(x)))`` as one module.

    Input (N, Cin, H, W), fp32/fp16/bf16, NCHW or channels-last; output (N, Cout, Ho // 2, Wo // 2) with
    Ho = H + 2 * padding - k + 1. ``kernel`` picks the implementation: ``"torch"`` is the plain-PyTorch chain,
    ``"triton"`` the fused op, ``"auto"`` the faster of the two for this device.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
                 bias: bool = True, *, kernel: str = "auto", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=padding, bias=bias,
                         device=device, dtype=dtype)
        if kernel not in KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
        self.kernel = kernel

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, kernel: str = "auto") -> ConvReLUPool2d:
        """A ConvReLUPool2d that shares ``conv``'s parameters (same tensors, so the same state_dict)."""
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], padding=conv.padding[0],
                    bias=conv.bias is not None, kernel=kernel, device="meta")
        fused.weight = conv.weight
        fused.bias = conv.bias
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "torch":
            return conv_relu_pool_reference(x, self.weight, self.bias, self.padding[0])
        return conv_relu_pool(x, self.weight, self.bias, self.padding[0])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.kernel!r}"

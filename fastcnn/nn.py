"""Drop-in modules: ``ConvReLUPool2d`` is an ``nn.Conv2d`` (same parameters, same state_dict) whose forward
is the fused Conv2d -> ReLU -> MaxPool2d(2, 2); ``linear_on_flattened`` is ``linear(features.flatten(1))`` without
the copy that flatten makes of channels-last features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

from fastcnn.kernel_choice import CallKey, ChoosableLayer, resolve_kernel
from fastcnn.kernels.contract import CONV_CONTRACT, conv_problem
from fastcnn.kernels.layout import is_channels_last
from fastcnn.ops import conv_relu_pool, conv_relu_pool_aten
from fastcnn.vocabulary import canonical_kernel

__all__ = ["ConvReLUPool2d", "fusion_problem", "linear_on_flattened", "resolve_kernel"]


def fusion_problem(conv: nn.Conv2d) -> str | None:
    """Why the fused op cannot compute ``conv`` (``fastcnn.kernels.contract``), or None."""
    return conv_problem(conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                        groups=conv.groups, padding_mode=conv.padding_mode)


class ConvReLUPool2d(nn.Conv2d, ChoosableLayer):
    """``MaxPool2d(2, 2)(ReLU()(Conv2d(...)(x)))`` as one module.

    Input (N, Cin, H, W), fp32/fp16/bf16, NCHW or channels-last; output (N, Cout, Ho // 2, Wo // 2) with
    Ho = H + 2 * padding - k + 1. ``kernel`` picks the implementation: ``"aten"`` is PyTorch's chain, ``"fused"``
    the fused op, ``"auto"`` the faster of the two for each call shape that ``fastcnn.choose_kernels`` measured on
    this device (``kernel_choices``), else the fused op where it is available (``resolve_kernel``). The old names
    ``"triton"`` and ``"torch"`` are taken too (and kept as ``"fused"`` and ``"aten"``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
                 bias: bool = True, *, kernel: str = "auto", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=padding, bias=bias,
                         device=device, dtype=dtype)
        self.kernel = canonical_kernel(kernel)
        # CallKey -> "fused" | "aten", filled by fastcnn.choose_kernels; consulted only when kernel == "auto".
        self.kernel_choices: dict[CallKey, str] = {}

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, kernel: str = "auto") -> ConvReLUPool2d:
        """A ConvReLUPool2d that shares ``conv``'s parameters (same tensors, so the same state_dict).

        Raises ValueError for a convolution the fused op cannot compute (``fusion_problem``: stride, dilation,
        groups, a non-square or too large kernel, padding that is not zeros up to kernel_size // 2 on every side).
        """
        problem = fusion_problem(conv)
        if problem:
            raise ValueError(f"cannot fuse {conv}: {problem} (the fused op takes {CONV_CONTRACT})")
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], padding=conv.padding[0],
                    bias=conv.bias is not None, kernel=kernel, device="meta")
        fused.weight = conv.weight
        fused.bias = conv.bias
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.implementation(x) == "aten":
            return conv_relu_pool_aten(x, self.weight, self.bias, self.padding[0])
        return conv_relu_pool(x, self.weight, self.bias, self.padding[0])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.kernel!r}"


def linear_on_flattened(features: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear(features.flatten(1))`` for (N, C, H, W) ``features``, with ``linear``'s weights as they are.

    ``flatten(1)`` orders the features (c, h, w), as the weights expect; on channels-last features, which are laid
    out (h, w, c), that takes a copy of the whole activation (and its gradient comes back in the other order). Here
    such features are flattened in their own order, a view, and the weight's columns are put in that order instead:
    a copy of the weight, which is 1/N the size. Same result up to the order of the sums; the state_dict is unchanged.
    That route calls ``F.linear`` with the layer's parameters, so it is taken only for a plain ``nn.Linear`` without
    forward hooks (module or global): a subclass, a lazy, parametrized or hooked layer is called as itself.
    """
    n, c, h, w = features.shape
    if c == 1 or h * w == 1 or not is_channels_last(features) or not _plain_linear(linear) or \
            linear.in_features != c * h * w:
        return linear(features.flatten(1))
    weight = linear.weight.reshape(linear.out_features, c, h, w).permute(0, 2, 3, 1).reshape(linear.out_features, -1)
    return F.linear(features.permute(0, 2, 3, 1).reshape(n, -1), weight, linear.bias)


def _plain_linear(linear: nn.Module) -> bool:
    """An ``nn.Linear`` itself, whose forward is exactly ``F.linear(x, weight, bias)``: no subclass (a parametrized
    layer is one), no forward hooks of its own or global ones."""
    return (type(linear) is nn.Linear and not linear._forward_hooks and not linear._forward_pre_hooks and
            not module_globals._global_forward_hooks and not module_globals._global_forward_pre_hooks)

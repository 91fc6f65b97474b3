"""Drop-in modules: ``ConvReLUPool2d`` is an ``nn.Conv2d`` (same parameters, same state_dict) whose forward
is the fused Conv2d -> ReLU -> MaxPool2d(2, 2)."""

from __future__ import annotations

import torch
from torch import nn

from fastcnn.kernel_choice import CallKey
from fastcnn.ops import conv_pool_relu, conv_relu_pool, fused_kernel_status, native_runs_on_cpu

KERNEL_CHOICES = ("auto", "triton", "torch")

@torch.compiler.assume_constant_result
def _fused_available(device_type: str, index: int) -> bool:
    # Asked from forward: under torch.compile the answer is computed once while tracing, never in the graph.
    device = torch.device(device_type) if index < 0 else torch.device(device_type, index)
    return fused_kernel_status(device)[0]


@torch.compiler.assume_constant_result
def _native_available() -> bool:
    return native_runs_on_cpu()


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The implementation a ``kernel`` choice means on ``device``: ``"triton"`` (the fused op) or ``"torch"``.

    ``"torch"`` and ``"triton"`` mean themselves. ``"triton"`` is the fused op whatever runs it: Triton kernels on
    CUDA; on a CPU the native kernel (``fastcnn.kernels.conv_relu_pool_cpu``), or the Triton interpreter when
    TRITON_INTERPRET=1 was set before import, or the op's plain-PyTorch branch when neither is there. ``"auto"``
    picks the fused op on CUDA when its kernels can run there and on a CPU when the native kernel runs there;
    otherwise the plain chain: the interpreter is for tests, never for training a model. This is ``auto``'s
    default, for call shapes that ``fastcnn.choose_kernels`` has not measured; a measured shape takes the
    measured winner.
    """
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    if device.type == "cpu":
        return "triton" if _native_available() else "torch"
    if device.type != "cuda":
        return "torch"
    if not _fused_available(device.type, -1 if device.index is None else device.index):
        return "torch"
    return "triton"


class ConvReLUPool2d(nn.Conv2d):
    """``MaxPool2d(2, 2)(ReLU()(Conv2d(...)(x)))`` as one module.

    Input (N, Cin, H, W), fp32/fp16/bf16, NCHW or channels-last; output (N, Cout, Ho // 2, Wo // 2) with
    Ho = H + 2 * padding - k + 1. ``kernel`` picks the implementation: ``"torch"`` is the plain-PyTorch chain,
    ``"triton"`` the fused op, ``"auto"`` the faster of the two for each call shape that
    ``fastcnn.choose_kernels`` measured on this device (``kernel_choices``), else the fused op where it is
    available (``resolve_kernel``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
                 bias: bool = True, *, kernel: str = "auto", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=padding, bias=bias,
                         device=device, dtype=dtype)
        if kernel not in KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
        self.kernel = kernel
        # CallKey -> "triton" | "torch", filled by fastcnn.choose_kernels; consulted only when kernel == "auto".
        self.kernel_choices: dict[CallKey, str] = {}

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, kernel: str = "auto") -> ConvReLUPool2d:
        """A ConvReLUPool2d that shares ``conv``'s parameters (same tensors, so the same state_dict).

        Raises ValueError for a convolution the fused op cannot express (stride, dilation, groups, non-square
        kernel or padding, non-zero padding mode).
        """
        k = conv.kernel_size
        if isinstance(conv.padding, str):
            raise ValueError(f"padding={conv.padding!r} is not supported; give the padding as a number")
        problems = [
            f"kernel_size={k}" if k[0] != k[1] else "",
            f"stride={conv.stride}" if conv.stride != (1, 1) else "",
            f"dilation={conv.dilation}" if conv.dilation != (1, 1) else "",
            f"groups={conv.groups}" if conv.groups != 1 else "",
            f"padding={conv.padding}" if conv.padding[0] != conv.padding[1] else "",
            f"padding_mode={conv.padding_mode!r}" if conv.padding_mode != "zeros" else "",
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ValueError(f"cannot fuse {conv}: {', '.join(problems)} (needs a square kernel, stride 1, "
                             "dilation 1, groups 1, equal zero padding)")
        fused = cls(conv.in_channels, conv.out_channels, k[0], padding=conv.padding[0],
                    bias=conv.bias is not None, kernel=kernel, device="meta")
        fused.weight = conv.weight
        fused.bias = conv.bias
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.implementation(x) == "torch":
            return conv_pool_relu(x, self.weight, self.bias, self.padding[0])
        return conv_relu_pool(x, self.weight, self.bias, self.padding[0])

    def implementation(self, x: torch.Tensor) -> str:
        """``"triton"`` or ``"torch"``: what forward runs for this input."""
        if self.kernel == "auto" and self.kernel_choices:
            measured = self.kernel_choices.get(CallKey.of(x, self.weight))
            if measured is not None:
                return measured
        return resolve_kernel(self.kernel, x.device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.kernel!r}"

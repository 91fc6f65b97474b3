"""What the fused Conv2d -> ReLU -> MaxPool2d kernels compute, as one rule that everything asks.

The kernels (Triton and native CPU alike) take a stride-1 convolution with a square kernel of 1..7, zero
padding of 0..kernel_size // 2 on every side, dilation 1 and groups 1, followed by ReLU and a floor-mode 2x2
max pool with stride 2. ``fastcnn.ops`` refuses any other call with the reason, ``ConvReLUPool2d.from_conv``
refuses any other ``nn.Conv2d``, and ``fastcnn.accelerate`` leaves any other chain as written and reports why:
all three with the words of the functions below, which return None for what the kernels take and else the
reason in a few words.
"""

from __future__ import annotations

import torch
from fastcnn.kernels.layout import pooled_size

MAX_KERNEL_SIZE = 7
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What the kernels take, in words, for messages that refuse something else.
CONV_CONTRACT = (f"stride 1, dilation 1, groups 1, a square kernel of 1..{MAX_KERNEL_SIZE}, zero padding of "
                 "0..kernel_size // 2")


def as_pair(value) -> tuple[int, int] | None:
    """``3`` or ``(3, 3)`` or ``[3]`` -> ``(3, 3)``; None for anything else (a string, a float, a computed value)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (isinstance(value, tuple | list) and len(value) in (1, 2)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return (value[0], value[-1])
    return None


def conv_problem(kernel_size, *, stride=1, padding=0, dilation=1, groups: int = 1,
                 padding_mode: str = "zeros") -> str | None:
    """Why the kernels cannot compute this convolution (arguments as ``nn.Conv2d`` takes them), or None."""
    kernel = as_pair(kernel_size)
    if kernel is None:
        return f"kernel_size={kernel_size!r}, needs an int"
    kh, kw = kernel
    if kh != kw:
        return f"non-square kernel {kh}x{kw}, needs a square one"
    if kh > MAX_KERNEL_SIZE:
        return f"kernel {kh}x{kw} larger than {MAX_KERNEL_SIZE}x{MAX_KERNEL_SIZE}"
    if kh < 1:
        return f"empty kernel {kh}x{kw}"
    if as_pair(stride) != (1, 1):
        return f"stride {_shown(stride)}, needs 1"
    if as_pair(dilation) != (1, 1):
        return f"dilation {_shown(dilation)}, needs 1"
    if groups != 1:
        return f"groups={groups}, needs 1"
    if isinstance(padding, str):
        return f"padding={padding!r} (string padding), give it as a number"
    pad = as_pair(padding)
    if pad is None:
        return f"padding={padding!r}, needs an int"
    if pad[0] != pad[1]:
        return f"asymmetric padding {pad}"
    if pad[0] < 0:
        return f"negative padding {pad[0]}"
    if pad[0] > kh // 2:
        return f"padding {pad[0]} larger than kernel_size // 2 = {kh // 2}"
    if padding_mode != "zeros":
        return f"padding_mode={padding_mode!r}, needs 'zeros'"
    return None


def pool_problem(kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
                 return_indices: bool = False) -> str | None:
    """Why this max pool (arguments as ``F.max_pool2d`` takes them) is not the kernels' floor-mode 2x2 pool with
    stride 2, or None. ``stride`` None (or empty) means the kernel size, as in ``F.max_pool2d``."""
    if as_pair(kernel_size) != (2, 2):
        return f"max pool kernel_size={kernel_size!r}, needs 2"
    default_stride = stride is None or (isinstance(stride, tuple | list) and len(stride) == 0)
    if not default_stride and as_pair(stride) != (2, 2):
        return f"max pool stride={stride!r}, needs 2"
    if as_pair(padding) != (0, 0):
        return f"max pool padding={padding!r}, needs 0"
    if as_pair(dilation) != (1, 1):
        return f"max pool dilation={dilation!r}, needs 1"
    if ceil_mode:
        return "max pool ceil_mode=True"
    if return_indices:
        return "max pool return_indices=True"
    return None


def call_problem(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding, *,
                 params_cast: bool = False) -> str | None:
    """Why the kernels cannot run ``conv_relu_pool(x, weight, bias, padding)`` on these tensors, or None.
    ``params_cast``: the caller casts the weight and bias to x's dtype (autocast), so their own dtype may differ."""
    if x.dim() != 4 or weight.dim() != 4:
        return (f"needs a 4-d input (N, C, H, W) and a 4-d weight (Cout, Cin, k, k); got input {tuple(x.shape)} "
                f"and weight {tuple(weight.shape)}")
    c_out, c_in, kh, kw = weight.shape
    if isinstance(padding, bool) or not isinstance(padding, int):
        return f"padding={padding!r}, needs an int"
    problem = conv_problem((kh, kw), padding=padding)
    if problem:
        return problem
    if x.shape[1] != c_in:
        return f"input has {x.shape[1]} channels but the weight expects {c_in}"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype}, needs float32, float16 or bfloat16"
    if not params_cast and (weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)):
        bias_dtype = None if bias is None else bias.dtype
        return (f"input, weight and bias must share one dtype (or run under torch.autocast); got input {x.dtype}, "
                f"weight {weight.dtype}, bias {bias_dtype}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        return f"bias must have shape ({c_out},); got {tuple(bias.shape)}"
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        return "input, weight and bias must be on the same device"
    hp, wp = pooled_size(x.shape[2], x.shape[3], kh, padding)
    if hp < 1 or wp < 1:
        return (f"input {x.shape[2]}x{x.shape[3]} with kernel {kh} and padding {padding} leaves a {hp}x{wp} pooled "
                "output; it must be at least 1x1")
    return None


def _shown(value) -> str:
    pair = as_pair(value)
    return str(pair) if pair is not None else repr(value)

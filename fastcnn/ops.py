"""The fused Conv2d -> ReLU -> MaxPool2d(2, 2) operation (functional form) and its op registration.

Three custom ops, all ``torch.library.triton_op`` so that torch.compile sees (and can optimize) the Triton
launches inside them:

- ``fastcnn::conv_relu_pool(x, weight, bias, padding) -> (out, code)``: the pooled output and a uint8 code per
  pooled element (winning window position + whether ReLU passes the gradient), saved for backward.
- ``fastcnn::conv_relu_pool_backward_input(grad_out, code, x, weight, padding) -> grad_x``
- ``fastcnn::conv_relu_pool_backward_weight(grad_out, code, x, weight, padding) -> (grad_weight, grad_bias)``

Each op body dispatches on the device (a branch in the body, not ``register_kernel``: under torch.compile on
CPU Inductor ignores a CPU kernel registration and fails with "triton not built with the 'cpu' backend"):

- CUDA: the Triton kernels of ``fastcnn.kernels.conv_relu_pool``, launched through ``wrap_triton``.
- CPU with ``TRITON_INTERPRET=1`` set before import: the same kernels under Triton's interpreter, eagerly
  (this is how CI tests the kernel code; torch.compile cannot run the interpreter on fake tensors).
- CPU otherwise: the native kernels of ``fastcnn.kernels.conv_relu_pool_cpu`` (C, loaded with ctypes), for
  float32 and bfloat16. They are called through three opaque ``torch.library.custom_op``s of their own
  (``fastcnn::native_cpu_*``), so that under torch.compile Inductor, which traces into the triton_ops' bodies,
  keeps each native call as one extern kernel instead of tracing a ctypes call it cannot see.
- Anything else (float16 on CPU, no native build, no Triton): plain aten ops that produce the same ``code`` and
  the same gradients.

Eager calls on a CPU that runs the native kernel skip the op machinery: ``conv_relu_pool`` calls the native
launchers from a plain ``torch.autograd.Function`` (``_NativeEager``). Each custom-op layer costs tens of
microseconds of Python dispatch per call, forward and backward, which on a 1 ms CPU training step is as much as
the kernel saves; the Function also takes autocast's cast of the weight and bias inside itself, where autograd does
not record it. Under torch.compile the triton_op is what gets traced, as above.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

try:
    from fastcnn.kernels.conv_relu_pool import (
        conv_relu_pool_backward_input as _triton_backward_input,
    )
    from fastcnn.kernels.conv_relu_pool import (
        conv_relu_pool_backward_weight as _triton_backward_weight,
    )
    from fastcnn.kernels.conv_relu_pool import (
        conv_relu_pool_bwd_input_kernel,
        conv_relu_pool_bwd_weight_kernel,
        conv_relu_pool_fwd_kernel,
    )
    from fastcnn.kernels.conv_relu_pool import (
        conv_relu_pool_forward as _triton_forward,
    )

    _TRITON_ERROR: str | None = None
except (ImportError, RuntimeError) as err:
    # No triton on this platform, or (triton <= 3.2 on a machine without a GPU) @triton.autotune finding no
    # active driver at definition: every device takes the aten branch. With a GPU, a RuntimeError here is a real
    # fault that must not turn into a silent fallback.
    if isinstance(err, RuntimeError) and torch.cuda.is_available():
        raise
    _TRITON_ERROR = f"{type(err).__name__}: {err}"

from fastcnn.kernels import conv_relu_pool_cpu as _native
from fastcnn.kernels.contract import SUPPORTED_DTYPES, call_problem
from fastcnn.kernels.layout import memory_format_of, pooled_size

__all__ = ["conv_relu_pool", "conv_relu_pool_aten", "conv_relu_pool_reference", "fused_kernel_status",
           "native_kernel_status", "native_runs_on_cpu", "INTERPRET_ON_CPU", "NATIVE_ON_CPU"]

# Triton decides at kernel definition (the import above) whether @triton.jit kernels are interpreted, so the
# op captures the same decision once. Tests set it to False to reach the aten branch on CPU (torch.compile).
INTERPRET_ON_CPU: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Whether CPU calls (outside the interpreter) run the native kernel. Tests set it to False to reach the aten
# branch, and simulate a missing build that way.
NATIVE_ON_CPU: bool = _native.LIBRARY is not None


# ---------------------------------------------------------------------------------- plain-PyTorch twins
# One op, three implementations with one signature: conv_relu_pool (the fused kernels), conv_relu_pool_aten (what
# kernel="aten" runs) and conv_relu_pool_reference (the literal chain, which tests and benchmarks compare with).


def conv_relu_pool_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                             padding: int = 0) -> torch.Tensor:
    """``max_pool2d(relu(conv2d(x, weight, bias, padding)), 2, 2)`` in plain PyTorch: the reference twin."""
    return F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding=padding)), kernel_size=2, stride=2)


def conv_relu_pool_aten(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        padding: int = 0) -> torch.Tensor:
    """The ``aten`` implementation: the same function as ``conv_relu_pool_reference``, with ReLU applied after the
    pool (4x fewer elements).

    relu(max(window)) == max(relu(window)), and the gradients agree too: when the window's maximum is > 0
    both orders route the gradient to its first maximum; when it is <= 0 (or NaN) both give zero gradient
    everywhere (ReLU's gradient at 0 is 0). This is what ``kernel="aten"`` runs (and ``"auto"`` where it picks
    aten), measured faster than the literal chain on CPU.
    """
    return F.relu(F.max_pool2d(F.conv2d(x, weight, bias, padding=padding), kernel_size=2, stride=2))




# --------------------------------------------------------------------------------------------- helpers


def _copy_as(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    # An explicit allocation, so the strides are exactly the fake implementation's (also for size-1 dims).
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt)
    out.copy_(t)
    return out


def _runs_triton(device: torch.device) -> bool:
    if _TRITON_ERROR is not None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET_ON_CPU)


def native_runs_on_cpu() -> bool:
    """Whether the op's CPU calls run the native kernel (it is loaded, and TRITON_INTERPRET=1 did not ask for the
    Triton interpreter instead)."""
    return NATIVE_ON_CPU and not INTERPRET_ON_CPU


def _runs_native(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and native_runs_on_cpu() and x.dtype in _native.SUPPORTED_DTYPES


def _launch(launcher, triton_kernel, device: torch.device, *args):
    """Run a Triton launcher: through ``wrap_triton`` on a GPU, so that torch.compile sees the kernel; directly
    under the interpreter, whose kernels are not JIT functions (older wrap_triton rejects them)."""
    if device.type != "cpu":
        return launcher(*args, triton_kernel=torch.library.wrap_triton(triton_kernel))
    return launcher(*args)


def native_kernel_status() -> str:
    """One line on the native CPU kernel: which build runs the fused op on CPUs, on how many threads, or why none
    does (the op then runs the plain PyTorch chain there)."""
    if not NATIVE_ON_CPU:
        return f"{_native.STATUS}; the fused op runs the plain PyTorch chain on CPUs"
    if INTERPRET_ON_CPU:
        return f"{_native.STATUS}, not used: TRITON_INTERPRET=1 runs the fused op under the Triton interpreter"
    return (f"{_native.STATUS}, {torch.get_num_threads()} threads: runs the fused op on CPUs "
            "(float32, bfloat16; float16 takes the plain chain)")


def fused_kernel_status(device: torch.device | str) -> tuple[bool, str]:
    """Whether the fused kernels run on ``device`` (Triton on CUDA, the native kernel on CPU), and a sentence
    saying why (not).

    When they do not, ``conv_relu_pool`` still works: it takes its plain-PyTorch branch.
    """
    device = torch.device(device)
    if device.type == "cpu":
        if INTERPRET_ON_CPU and _TRITON_ERROR is None:
            return True, "Triton interpreter on CPU (TRITON_INTERPRET=1): exact but very slow, for tests"
        if native_runs_on_cpu():
            return True, f"{_native.STATUS}; float16 runs the plain PyTorch chain"
        return False, f"{_native.STATUS}; the op runs plain PyTorch ops"
    if _TRITON_ERROR is not None:
        return False, f"the Triton kernels could not be loaded ({_TRITON_ERROR}); the op runs plain PyTorch ops"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available in this torch build or on this machine"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7:
            return False, f"compute capability {major}.{minor}: Triton needs 7.0 or newer"
        name = torch.cuda.get_device_name(device)
        note = "" if major >= 8 else " (bf16 needs compute capability 8.0)"
        return True, f"Triton kernels on {name} (compute capability {major}.{minor}){note}"
    return False, f"no fused kernel for device type {device.type!r}; the op runs plain PyTorch ops"


# --------------------------------------------------------------------------------------------- aten branch


def _aten_forward(x, weight, bias, padding):
    y = F.relu(F.conv2d(x, weight, bias, padding=padding))
    pooled, flat = F.max_pool2d(y, 2, 2, return_indices=True)
    wo = y.shape[3]
    position = (flat // wo % 2) * 2 + (flat % wo) % 2  # row-major position in the 2x2 window
    passes = torch.where(pooled <= 0, 0, 4)  # threshold_backward's rule
    fmt = memory_format_of(x)
    return _copy_as(pooled, fmt), _copy_as((position + passes).to(torch.uint8), fmt)


def _full_size_grad(grad_out, code, ho, wo):
    # gy, the gradient of the convolution output, rebuilt from the pooled gradient and the code.
    n, c, hp, wp = grad_out.shape
    g = torch.where((code & 4) != 0, grad_out, 0)
    win = code & 3
    planes = torch.stack([torch.where(win == d, g, 0) for d in range(4)], dim=-1)  # N, C, HP, WP, (dy dx)
    gy = planes.view(n, c, hp, wp, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * hp, 2 * wp)
    return F.pad(gy, (0, wo - 2 * wp, 0, ho - 2 * hp))  # floor mode: trailing rows/cols get no gradient


def _aten_backward(grad_out, code, x, weight, padding, output_mask):
    k = weight.shape[2]
    ho, wo = x.shape[2] + 2 * padding - k + 1, x.shape[3] + 2 * padding - k + 1
    gy = _full_size_grad(grad_out, code, ho, wo)
    return torch.ops.aten.convolution_backward(
        gy, x, weight, [weight.shape[0]], [1, 1], [padding, padding], [1, 1], False, [0, 0], 1, output_mask)


# --------------------------------------------------------------------------------------------- the ops


@torch.library.triton_op("fastcnn::conv_relu_pool", mutates_args=())
def _conv_relu_pool_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _runs_triton(x.device):
        return _launch(_triton_forward, conv_relu_pool_fwd_kernel, x.device, x, weight, bias, padding)
    if _runs_native(x):
        return torch.ops.fastcnn.native_cpu_forward(x, weight, bias, padding)
    return _aten_forward(x, weight, bias, padding)


@_conv_relu_pool_op.register_fake
def _conv_relu_pool_fake(x, weight, bias, padding):
    hp, wp = pooled_size(x.shape[2], x.shape[3], weight.shape[2], padding)
    shape = (x.shape[0], weight.shape[0], hp, wp)
    fmt = memory_format_of(x)
    return (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt),
            torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=fmt))


@torch.library.triton_op("fastcnn::conv_relu_pool_backward_input", mutates_args=())
def _backward_input_op(grad_out: torch.Tensor, code: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       padding: int) -> torch.Tensor:
    if _runs_triton(x.device):
        return _launch(_triton_backward_input, conv_relu_pool_bwd_input_kernel, x.device, grad_out, code, x,
                       weight, padding)
    if _runs_native(x):
        return torch.ops.fastcnn.native_cpu_backward_input(grad_out, code, x, weight, padding)
    grad_x = _aten_backward(grad_out, code, x, weight, padding, [True, False, False])[0]
    return _copy_as(grad_x, memory_format_of(x))


@_backward_input_op.register_fake
def _backward_input_fake(grad_out, code, x, weight, padding):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


@torch.library.triton_op("fastcnn::conv_relu_pool_backward_weight", mutates_args=())
def _backward_weight_op(grad_out: torch.Tensor, code: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _runs_triton(x.device):
        return _launch(_triton_backward_weight, conv_relu_pool_bwd_weight_kernel, x.device, grad_out, code, x,
                       weight, padding)
    if _runs_native(x):
        return torch.ops.fastcnn.native_cpu_backward_weight(grad_out, code, x, weight, padding)
    _, gw, gb = _aten_backward(grad_out, code, x, weight, padding, [False, True, True])
    grad_weight = torch.empty_like(weight)
    grad_weight.copy_(gw)
    return grad_weight, gb


@_backward_weight_op.register_fake
def _backward_weight_fake(grad_out, code, x, weight, padding):
    return torch.empty_like(weight), weight.new_empty((weight.shape[0],))


# The native CPU kernels as opaque ops (see the module docstring), with the same fake implementations.
@torch.library.custom_op("fastcnn::native_cpu_forward", mutates_args=(), device_types="cpu")
def _native_forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _native.conv_relu_pool_forward(x, weight, bias, padding)


@torch.library.custom_op("fastcnn::native_cpu_backward_input", mutates_args=(), device_types="cpu")
def _native_backward_input_op(grad_out: torch.Tensor, code: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              padding: int) -> torch.Tensor:
    return _native.conv_relu_pool_backward_input(grad_out, code, x, weight, padding)


@torch.library.custom_op("fastcnn::native_cpu_backward_weight", mutates_args=(), device_types="cpu")
def _native_backward_weight_op(grad_out: torch.Tensor, code: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _native.conv_relu_pool_backward_weight(grad_out, code, x, weight, padding)


_native_forward_op.register_fake(_conv_relu_pool_fake)
_native_backward_input_op.register_fake(_backward_input_fake)
_native_backward_weight_op.register_fake(_backward_weight_fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, padding = inputs
    _, code = output
    ctx.save_for_backward(x, weight, code)
    ctx.padding = padding
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out, _grad_code):
    x, weight, code = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if need_x:  # skipped for the first layer, whose input is data
        grad_x = torch.ops.fastcnn.conv_relu_pool_backward_input(grad_out, code, x, weight, ctx.padding)
    if need_w or (need_b and ctx.has_bias):
        gw, gb = torch.ops.fastcnn.conv_relu_pool_backward_weight(grad_out, code, x, weight, ctx.padding)
        grad_w = gw if need_w else None
        grad_b = gb if need_b and ctx.has_bias else None
    return grad_x, grad_w, grad_b, None


_conv_relu_pool_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- public API


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, *,
                  params_cast: bool = False) -> None:
    problem = call_problem(x, weight, bias, padding, params_cast=params_cast)
    if problem:
        raise ValueError(f"conv_relu_pool: {problem}")


def _autocast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    # Custom ops are not autocast by the dispatcher: cast like autocast casts conv2d's inputs (every floating
    # tensor but float64, which autocast leaves alone and the checks then reject).
    device_type = x.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t):
            return t.to(dtype) if t is not None and t.dtype in SUPPORTED_DTYPES else t

        x, weight, bias = cast(x), cast(weight), cast(bias)
    return x, weight, bias


def _named(name: str):
    """A profiler range named like the op's native kernel, while a profiler runs (``fastcnn bench --profile``
    reports the kernels by these names); nothing otherwise (a range costs about 5 us per call)."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


class _NativeEager(torch.autograd.Function):
    """The op on the native CPU kernel, for eager autograd (see the module docstring): the same kernels and the same
    numbers as the op's native branch under autocast. ``dtype`` is the compute dtype: float32 parameters with
    bfloat16 data go to the kernels as they are (they round the weights as they read them and give float32
    gradients, rounded to bfloat16); other parameters are cast here, and their gradients cast back, as autocast's
    casts and their backward would."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dtype):
        as_is = dtype == torch.bfloat16 and weight.dtype == torch.float32 and \
            (bias is None or bias.dtype == torch.float32)
        weight_c = weight if as_is else weight.to(dtype)
        bias_c = bias if as_is or bias is None else bias.to(dtype)
        _check_inputs(x, weight_c, bias_c, padding, params_cast=as_is)
        with _named("fastcnn::native_cpu_forward"):
            out, code = _native.conv_relu_pool_forward(x, weight_c, bias_c, padding)
        ctx.save_for_backward(x, weight_c, code)
        ctx.padding = padding
        ctx.grad_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    @once_differentiable  # the kernels' backward is not differentiable again: a double backward says so
    def backward(ctx, grad_out):
        x, weight, code = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        weight_dtype, bias_dtype = ctx.grad_dtypes
        grad_x = grad_w = grad_b = None
        if need_x:  # skipped for the first layer, whose input is data
            with _named("fastcnn::native_cpu_backward_input"):
                grad_x = _native.conv_relu_pool_backward_input(grad_out, code, x, weight, ctx.padding)
        if need_w or (need_b and bias_dtype is not None):
            with _named("fastcnn::native_cpu_backward_weight"):
                gw, gb = _native.conv_relu_pool_backward_weight(grad_out, code, x, weight, ctx.padding)
            grad_w = gw.to(weight_dtype) if need_w else None  # no-ops when the kernels took the parameters as is
            grad_b = gb.to(bias_dtype) if need_b and bias_dtype is not None else None
        return grad_x, grad_w, grad_b, None, None


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _eager_native_dtype(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype | None:
    """The compute dtype when this call can take ``_NativeEager`` (an eager CPU call the native kernel runs, in
    float32 or bfloat16, with parameters it can cast from), else None.

    Plain tensors only, outside any dispatch mode and functorch transform: fake tensors, FlopCounterMode, recorders
    and torch.func see the op, which has a fake implementation and is what they expect to see."""
    if x.device.type != "cpu" or not native_runs_on_cpu() or torch.compiler.is_compiling():
        return None
    if not all(type(t) in _PLAIN_TENSORS for t in (x, weight, bias) if t is not None) or \
            is_in_torch_dispatch_mode() or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    supported = _native.SUPPORTED_DTYPES
    if dtype not in supported or x.dtype not in supported or weight.dtype not in supported or \
            (bias is not None and bias.dtype not in supported):
        return None
    if not torch.is_autocast_enabled("cpu") and (weight.dtype != dtype or (bias is not None and bias.dtype != dtype)):
        return None  # mixed dtypes outside autocast: the op's check says what is wrong
    return dtype


def conv_relu_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   padding: int = 0) -> torch.Tensor:
    """``max_pool2d(relu(conv2d(x, weight, bias, padding=padding)), 2, 2)`` as one fused op.

    Args:
        x: (N, Cin, H, W), float32 / float16 / bfloat16, NCHW or channels-last (any strides work).
        weight: (Cout, Cin, k, k), same dtype, square kernel with 1 <= k <= 7 (``fastcnn.kernels.contract``).
        bias: (Cout,) in the same dtype, or None.
        padding: zero padding on every side, 0 <= padding <= k // 2. Stride and dilation are 1.

    Returns:
        (N, Cout, Ho // 2, Wo // 2) with Ho = H + 2 * padding - k + 1 (floor-mode pooling), in x's dtype;
        channels-last when x is densely channels-last, NCHW otherwise. Under ``torch.autocast`` the inputs are
        first cast to the autocast dtype, as autocast does for conv2d.

    Gradients match the reference chain's routing: the first maximum of each 2x2 window (row-major) gets the
    gradient, and none flows where the ReLU output is 0. Raises ValueError for unsupported shapes or dtypes.
    """
    dtype = _eager_native_dtype(x, weight, bias)
    if dtype is not None:
        return _NativeEager.apply(x.to(dtype), weight, bias, padding, dtype)
    x, weight, bias = _autocast(x, weight, bias)
    _check_inputs(x, weight, bias, padding)
    out, _ = torch.ops.fastcnn.conv_relu_pool(x, weight, bias, padding)
    return out

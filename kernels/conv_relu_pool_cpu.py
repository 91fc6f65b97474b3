"""Launchers for the native CPU kernels of the fused Conv2d -> ReLU -> MaxPool2d(2, 2) (``conv_relu_pool_cpu.c``).

The C library is built by ``pip install`` (setup.py), once per instruction set: ``libfastcnn_cpu_avx512.so``,
``libfastcnn_cpu_avx2.so`` and ``libfastcnn_cpu_baseline.so`` on x86-64 (one ``libfastcnn_cpu_baseline.so``
elsewhere). ``load()`` picks the best build this CPU runs, by torch's own reading of the CPU
(``torch.backends.cpu.get_cpu_capability()``, which also honours ``ATEN_CPU_CAPABILITY``). It is loaded with
ctypes: no tie to a torch or Python ABI, nothing compiled at first use. Where no build loads (no compiler at
install time, another platform, ``FASTCNN_NATIVE_CPU=0``), ``LIBRARY`` is None, ``STATUS`` says why, and the op
takes its plain-PyTorch branch.

The launchers have the Triton launchers' signatures and contract (``kernels/conv_relu_pool.py``): float32 or
bfloat16 inputs (fp32 accumulation), any strides, outputs in x's layout (channels-last when x is densely
channels-last, NCHW otherwise). With bfloat16 data the weight and bias may also be float32 parameters, as under
autocast: the kernels round them to bfloat16 as they read them, and give their gradients back in float32, rounded
to bfloat16 (what autocast's casts and their backward do, without the two extra tensors each way). Inputs are
assumed valid (``fastcnn.ops`` checks them). The kernels run on ``torch.get_num_threads()`` threads of the OpenMP
runtime torch already loaded.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import platform

import torch
from fastcnn.kernels.layout import memory_format_of, pooled_size

ABI = 3  # FASTCNN_CPU_ABI in the C source: a stale build from an older source is not loaded
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_HERE = pathlib.Path(__file__).resolve().parent

_i64p = ctypes.POINTER(ctypes.c_int64)
_ptr = ctypes.c_void_p
_i64 = ctypes.c_int64
_SIGNATURES = {
    # x, xs, weight, ws, bias, out, os, code, cs, N, Cin, H, W, Cout, k, pad, dtype, threads, options
    "fastcnn_cpu_forward": [_ptr, _i64p, _ptr, _i64p, _ptr, _ptr, _i64p, _ptr, _i64p] + [_i64] * 7
    + [ctypes.c_int] * 3,
    # grad, gs, code, cs, x, xs, grad_weight, gws, grad_bias, N, Cin, H, W, Cout, k, pad, dtype, threads, options
    "fastcnn_cpu_backward_weight": [_ptr, _i64p, _ptr, _i64p, _ptr, _i64p, _ptr, _i64p, _ptr] + [_i64] * 7
    + [ctypes.c_int] * 3,
    # grad, gs, code, cs, weight, ws, grad_x, gxs, N, Cin, H, W, Cout, k, pad, dtype, threads, options
    "fastcnn_cpu_backward_input": [_ptr, _i64p, _ptr, _i64p, _ptr, _i64p, _ptr, _i64p] + [_i64] * 7
    + [ctypes.c_int] * 3,
}


def build_names() -> list[str]:
    """The builds this CPU can run, best first."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["baseline"]
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if capability.startswith("AVX512"):
        return ["avx512", "avx2", "baseline"]
    if capability == "AVX2":
        return ["avx2", "baseline"]
    return ["baseline"]


def library_path(name: str, directory: pathlib.Path = _HERE) -> pathlib.Path:
    return directory / f"libfastcnn_cpu_{name}.so"


def load_library(path: pathlib.Path) -> tuple[ctypes.CDLL | None, str]:
    """(library, status) for one build: None and the reason when it is missing, does not load, or is stale."""
    if not path.exists():
        return None, f"{path.name} not built"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        return None, f"{path.name}: {err}"
    lib.fastcnn_cpu_abi.restype = ctypes.c_int
    if lib.fastcnn_cpu_abi() != ABI:
        return None, f"{path.name} is a stale build (reinstall fastcnn: pip install -e .)"
    lib.fastcnn_cpu_isa.restype = ctypes.c_char_p
    lib.fastcnn_cpu_dot_bf16.restype = ctypes.c_int
    for fn, argtypes in _SIGNATURES.items():
        getattr(lib, fn).argtypes = argtypes
        getattr(lib, fn).restype = ctypes.c_int
    dot = ", bf16 dot products" if lib.fastcnn_cpu_dot_bf16() else ""
    return lib, f"native CPU kernel ({lib.fastcnn_cpu_isa().decode()} build{dot})"


def load(directory: pathlib.Path = _HERE) -> tuple[ctypes.CDLL | None, str]:
    """(library, status): the best build in ``directory`` that loads, or None and the reason none did."""
    if os.environ.get("FASTCNN_NATIVE_CPU", "1") == "0":
        return None, "the native CPU kernel is switched off (FASTCNN_NATIVE_CPU=0)"
    reasons = []
    for name in build_names():
        lib, status = load_library(library_path(name, directory))
        if lib is not None:
            return lib, status
        reasons.append(status)
    return None, "the native CPU kernel is not available (" + "; ".join(reasons) + ")"


LIBRARY, STATUS = load()

# Bit 0: bf16 calls may use AVX512-BF16 dot products where the build and the CPU have them (the C source's
# OPTION_DOT_BF16). FASTCNN_NATIVE_BF16_DOT=0 (or a test setting OPTIONS = 0) runs the fp32-FMA path instead.
OPTIONS = 0 if os.environ.get("FASTCNN_NATIVE_BF16_DOT", "1") == "0" else 1
_FP32_PARAMS = 2  # bit 1: float32 weight and bias with bfloat16 data (OPTION_FP32_PARAMS)


def _options(x: torch.Tensor, weight: torch.Tensor) -> int:
    return OPTIONS | (_FP32_PARAMS if x.dtype == torch.bfloat16 and weight.dtype == torch.float32 else 0)


def _strides(t: torch.Tensor):
    return (ctypes.c_int64 * 4)(*t.stride())


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise MemoryError(f"fastcnn native CPU kernel ({what}): out of memory for its work buffers")


def conv_relu_pool_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled output (N, Cout, HP, WP) in x's dtype and layout, and its uint8 code."""
    n, c_in, h, w = x.shape
    c_out, _, ksize, _ = weight.shape
    hp, wp = pooled_size(h, w, ksize, padding)
    fmt = memory_format_of(x)
    out = torch.empty((n, c_out, hp, wp), dtype=x.dtype, memory_format=fmt)
    code = torch.empty((n, c_out, hp, wp), dtype=torch.uint8, memory_format=fmt)
    bias = bias.contiguous() if bias is not None else None
    rc = LIBRARY.fastcnn_cpu_forward(
        x.data_ptr(), _strides(x), weight.data_ptr(), _strides(weight), bias.data_ptr() if bias is not None else None,
        out.data_ptr(), _strides(out), code.data_ptr(), _strides(code),
        n, c_in, h, w, c_out, ksize, padding, _DTYPE_CODES[x.dtype], torch.get_num_threads(), _options(x, weight))
    _check(rc, "forward")
    return out, code


def conv_relu_pool_backward_weight(grad_out: torch.Tensor, code: torch.Tensor, x: torch.Tensor,
                                   weight: torch.Tensor, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight like ``weight``, grad_bias (Cout,) in weight's dtype), accumulated in fp32."""
    n, c_in, h, w = x.shape
    c_out, _, ksize, _ = weight.shape
    grad_out = grad_out.to(x.dtype)
    grad_weight = torch.empty_like(weight)
    grad_bias = torch.empty((c_out,), dtype=weight.dtype)
    rc = LIBRARY.fastcnn_cpu_backward_weight(
        grad_out.data_ptr(), _strides(grad_out), code.data_ptr(), _strides(code), x.data_ptr(), _strides(x),
        grad_weight.data_ptr(), _strides(grad_weight), grad_bias.data_ptr(),
        n, c_in, h, w, c_out, ksize, padding, _DTYPE_CODES[x.dtype], torch.get_num_threads(), _options(x, weight))
    _check(rc, "grad_weight")
    return grad_weight, grad_bias


def conv_relu_pool_backward_input(grad_out: torch.Tensor, code: torch.Tensor, x: torch.Tensor,
                                  weight: torch.Tensor, padding: int) -> torch.Tensor:
    """grad_input with x's shape, dtype and layout (``x`` is read for its metadata only)."""
    n, c_in, h, w = x.shape
    c_out, _, ksize, _ = weight.shape
    grad_out = grad_out.to(x.dtype)
    grad_x = torch.empty((n, c_in, h, w), dtype=x.dtype, memory_format=memory_format_of(x))
    rc = LIBRARY.fastcnn_cpu_backward_input(
        grad_out.data_ptr(), _strides(grad_out), code.data_ptr(), _strides(code), weight.data_ptr(),
        _strides(weight), grad_x.data_ptr(), _strides(grad_x),
        n, c_in, h, w, c_out, ksize, padding, _DTYPE_CODES[x.dtype], torch.get_num_threads(), _options(x, weight))
    _check(rc, "grad_input")
    return grad_x

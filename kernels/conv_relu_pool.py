"""Triton kernels for the fused Conv2d -> ReLU -> MaxPool2d(2, 2) (stride 1, square kernel, zero padding).

Unfused, the convolution writes its full-size output, ReLU reads and writes it, the pool reads it and writes
the pooled output plus int64 indices, and backward reads all of that again. Here the forward reads the input
once and writes only the pooled output (4x smaller) and one byte per pooled element, the *code*:

    bits 0-1  which of the 2x2 window positions won (dy * 2 + dx, row-major)
    bit  2    whether ReLU lets the gradient through (the winner is not <= 0)

Backward computes grad_weight, grad_bias and grad_input straight from grad_pooled, the code and the input,
never building the full-size gradient.

Numerics, chosen to agree with ``max_pool2d(relu(conv2d(x, w, b)), 2, 2)`` in PyTorch:

- Products are accumulated in fp32 (``tl.dot``); the bias is added in fp32; the pre-activation of each window
  position is then rounded ONCE to the output dtype, and ReLU and the 2x2 max work on those rounded values.
  PyTorch's chain does the same in fp16/bf16 (the conv writes its output in the low dtype, ReLU and the pool
  compare those), so ties are decided on rounded values, not on fp32 values the chain never sees. (cuDNN may
  round the conv result before adding the bias, i.e. round twice; accumulation order differs anyway, so
  bitwise equality in fp16/bf16 is not a goal, only the tie *rule* is.)
- The max picks the FIRST maximum in row-major order, with PyTorch's NaN rule: a position replaces the current
  best when ``v > best or isnan(v)``.
- ReLU's gradient is PyTorch's ``threshold_backward``: zero where the output is ``<= 0``. When a whole window
  is <= 0 the pool picks position 0 (all ReLU outputs equal 0), whose ReLU gradient is 0, so nothing flows.
- fp32 inputs use TF32 tensor cores when ``DOT_PRECISION == "tf32"``; the launcher picks it from
  ``torch.backends.cudnn.allow_tf32``, which is what cuDNN's fp32 convolution does by default.

Launchers are plain functions over tensors. Their ``triton_kernel`` argument is the Triton kernel to index with
the grid: the kernel itself for eager use, ``torch.library.wrap_triton(kernel)`` inside a
``torch.library.triton_op``. What the kernels accept is ``fastcnn.kernels.contract``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from fastcnn.kernels.layout import is_channels_last, memory_format_of, pooled_size

# Under TRITON_INTERPRET=1 every program runs in Python on numpy: one small config keeps autotuning from
# multiplying test time (the autotuner does not benchmark when there is only one config).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# FASTCNN_AUTOTUNE=0: each kernel takes its first GPU config, without benchmarking. For test runs on a GPU, where
# every new shape would otherwise autotune (seconds each, hundreds of shapes); tests/test_kernel_configs.py checks
# every config explicitly.
_AUTOTUNE = os.environ.get("FASTCNN_AUTOTUNE", "1") != "0"


def autotune_configs(gpu: list[triton.Config], interpreter_config: triton.Config, *, interpreted: bool = _INTERPRET,
                     autotune: bool = _AUTOTUNE) -> list[triton.Config]:
    """The configs a kernel autotunes over: the interpreter's one config, else the GPU's (only the first without
    autotuning)."""
    if interpreted:
        return [interpreter_config]
    return gpu if autotune else gpu[:1]


# The configs a GPU autotunes over. The interpreter runs only one small config per kernel (below), so
# tests/test_kernel_configs.py pins each of these in turn, under the interpreter, to check them too.
GPU_CONFIGS: dict[str, list[triton.Config]] = {
    # Four fp32 accumulators of BLOCK_P x BLOCK_CO live in registers: keep BLOCK_P * BLOCK_CO <= 4096 per 4 warps.
    "fwd": [
        triton.Config({"BLOCK_P": 64, "BLOCK_CO": 16, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_P": 64, "BLOCK_CO": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_P": 128, "BLOCK_CO": 32, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_P": 64, "BLOCK_CO": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_P": 128, "BLOCK_CO": 16, "BLOCK_K": 16}, num_warps=4, num_stages=3),
    ],
    "bwd_weight": [
        triton.Config({"BLOCK_P": 64, "BLOCK_CO": 16, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_P": 64, "BLOCK_CO": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_P": 128, "BLOCK_CO": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_P": 64, "BLOCK_CO": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    ],
    "bwd_input": [
        triton.Config({"BLOCK_Q": 64, "BLOCK_CI": 16, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_Q": 128, "BLOCK_CI": 16, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_Q": 64, "BLOCK_CI": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_Q": 128, "BLOCK_CI": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    ],
}
# Under the interpreter: one small config, so the autotuner has nothing to benchmark.
INTERPRETER_CONFIGS: dict[str, triton.Config] = {
    "fwd": triton.Config({"BLOCK_P": 32, "BLOCK_CO": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1),
    "bwd_weight": triton.Config({"BLOCK_P": 32, "BLOCK_CO": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1),
    "bwd_input": triton.Config({"BLOCK_Q": 32, "BLOCK_CI": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1),
}
_FWD_CONFIGS = autotune_configs(GPU_CONFIGS["fwd"], INTERPRETER_CONFIGS["fwd"])
_BWD_WEIGHT_CONFIGS = autotune_configs(GPU_CONFIGS["bwd_weight"], INTERPRETER_CONFIGS["bwd_weight"])
_BWD_INPUT_CONFIGS = autotune_configs(GPU_CONFIGS["bwd_input"], INTERPRETER_CONFIGS["bwd_input"])

# The batch size is left out of the key on purpose: the best tile hardly depends on it (the grid grows with it),
# and keying on it would autotune again, inside a timed epoch, for the smaller last batch.
_SHAPE_KEY = ["C_in", "H", "W", "C_out", "KSIZE", "PAD"]


# --------------------------------------------------------------------------------------------- forward


@triton.autotune(configs=_FWD_CONFIGS, key=_SHAPE_KEY)
@triton.jit
def conv_relu_pool_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, code_ptr,
    N, C_in, H, W, C_out, HP, WP, PAD,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    son, soc, soh, sow,
    scn, scc, sch, scw,
    KSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, CI_INNER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Implicit GEMM: rows are pooled positions (n, ph, pw), columns output channels, the reduction runs over
    # (ci, ky, kx). Each row carries four accumulators, one per 2x2 window position, sharing the weight tile.
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_p = offs_p < N * HP * WP
    mask_co = offs_co < C_out

    pw = offs_p % WP
    t = offs_p // WP
    ph = t % HP
    n = t // HP
    ih0 = 2 * ph - PAD  # input row under (window position 0, ky = 0)
    iw0 = 2 * pw - PAD
    x_row = n.to(tl.int64) * sxn + ih0 * sxh + iw0 * sxw

    KK: tl.constexpr = KSIZE * KSIZE
    K = C_in * KK
    acc00 = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    acc01 = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    acc10 = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    acc11 = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        # Channels-last input: channel innermost in K, so neighbouring K columns are neighbouring bytes.
        if CI_INNER:
            ci = offs_k % C_in
            r = offs_k // C_in
        else:
            ci = offs_k // KK
            r = offs_k % KK
        ky = r // KSIZE
        kx = r % KSIZE

        ih = ih0[:, None] + ky[None, :]
        iw = iw0[:, None] + kx[None, :]
        row0 = (ih >= 0) & (ih < H)
        row1 = (ih >= -1) & (ih < H - 1)
        col0 = (iw >= 0) & (iw < W)
        col1 = (iw >= -1) & (iw < W - 1)
        base = mask_p[:, None] & mask_k[None, :]
        ptrs = x_ptr + (x_row[:, None] + (ci * sxc + ky * sxh + kx * sxw)[None, :])
        a00 = tl.load(ptrs, mask=base & row0 & col0, other=0.0)
        a01 = tl.load(ptrs + sxw, mask=base & row0 & col1, other=0.0)
        a10 = tl.load(ptrs + sxh, mask=base & row1 & col0, other=0.0)
        a11 = tl.load(ptrs + sxh + sxw, mask=base & row1 & col1, other=0.0)

        w_off = (ci * swi + ky * swh + kx * sww)[:, None] + offs_co[None, :] * swo
        wt = tl.load(w_ptr + w_off, mask=mask_k[:, None] & mask_co[None, :], other=0.0)
        if DOT_IN_FP32:
            a00 = a00.to(tl.float32)
            a01 = a01.to(tl.float32)
            a10 = a10.to(tl.float32)
            a11 = a11.to(tl.float32)
            wt = wt.to(tl.float32)

        acc00 = tl.dot(a00, wt, acc00, input_precision=DOT_PRECISION)
        acc01 = tl.dot(a01, wt, acc01, input_precision=DOT_PRECISION)
        acc10 = tl.dot(a10, wt, acc10, input_precision=DOT_PRECISION)
        acc11 = tl.dot(a11, wt, acc11, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_co, mask=mask_co, other=0.0).to(tl.float32)
        acc00 += bias[None, :]
        acc01 += bias[None, :]
        acc10 += bias[None, :]
        acc11 += bias[None, :]

    # Round each pre-activation to the output dtype first: PyTorch's chain compares rounded values.
    out_ty = out_ptr.dtype.element_ty
    v00 = acc00.to(out_ty).to(tl.float32)
    v01 = acc01.to(out_ty).to(tl.float32)
    v10 = acc10.to(out_ty).to(tl.float32)
    v11 = acc11.to(out_ty).to(tl.float32)
    # relu = clamp_min(v, 0): keeps NaN, maps everything <= 0 to 0.
    v00 = tl.where(v00 <= 0.0, 0.0, v00)
    v01 = tl.where(v01 <= 0.0, 0.0, v01)
    v10 = tl.where(v10 <= 0.0, 0.0, v10)
    v11 = tl.where(v11 <= 0.0, 0.0, v11)
    # First maximum in row-major order; NaN wins (PyTorch: `val > maxval || isnan(val)`).
    best = v00
    idx = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.int32)
    upd = (v01 > best) | (v01 != v01)
    best = tl.where(upd, v01, best)
    idx = tl.where(upd, 1, idx)
    upd = (v10 > best) | (v10 != v10)
    best = tl.where(upd, v10, best)
    idx = tl.where(upd, 2, idx)
    upd = (v11 > best) | (v11 != v11)
    best = tl.where(upd, v11, best)
    idx = tl.where(upd, 3, idx)
    # threshold_backward: no gradient where the ReLU output is <= 0 (a NaN output passes it).
    code = idx + tl.where(best <= 0.0, 0, 4)

    mask = mask_p[:, None] & mask_co[None, :]
    n64 = n.to(tl.int64)
    out_off = (n64 * son + ph * soh + pw * sow)[:, None] + offs_co[None, :] * soc
    tl.store(out_ptr + out_off, best.to(out_ty), mask=mask)
    code_off = (n64 * scn + ph * sch + pw * scw)[:, None] + offs_co[None, :] * scc
    tl.store(code_ptr + code_off, code.to(tl.uint8), mask=mask)


# --------------------------------------------------------------------------------------------- backward


@triton.autotune(configs=_BWD_WEIGHT_CONFIGS, key=_SHAPE_KEY + ["SPLIT"])
@triton.jit
def conv_relu_pool_bwd_weight_kernel(
    x_ptr, g_ptr, code_ptr, gw_part_ptr, gb_part_ptr,
    N, C_in, H, W, C_out, HP, WP, PAD, SPLIT,
    sxn, sxc, sxh, sxw,
    sgn, sgc, sgh, sgw,
    scn, scc, sch, scw,
    KSIZE: tl.constexpr, CI_INNER: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grad_w[co, k] = sum over pooled rows p and window positions d of X_d[p, k] * G_d[p, co], where G_d is
    # grad_pooled kept only where the code says position d won and ReLU passes. Four GEMMs, the same FLOPs as
    # cuDNN's weight gradient, without the full-size gradient. Program (k-tile, co-tile, s) sums the row
    # blocks s, s + SPLIT, ... and writes its own partial sums; the caller adds the SPLIT partials in a fixed
    # order, so the result is deterministic (no atomics).
    pid_k = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_s = tl.program_id(2)
    KK: tl.constexpr = KSIZE * KSIZE
    K = C_in * KK
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_k = offs_k < K
    mask_co = offs_co < C_out
    if CI_INNER:
        ci = offs_k % C_in
        r = offs_k // C_in
    else:
        ci = offs_k // KK
        r = offs_k % KK
    ky = r // KSIZE
    kx = r % KSIZE
    x_col = ci * sxc + ky * sxh + kx * sxw

    P = N * HP * WP
    acc = tl.zeros((BLOCK_K, BLOCK_CO), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for p0 in range(pid_s * BLOCK_P, P, SPLIT * BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        pw = offs_p % WP
        t = offs_p // WP
        ph = t % HP
        n = t // HP
        n64 = n.to(tl.int64)
        pc_mask = mask_p[:, None] & mask_co[None, :]
        g = tl.load(g_ptr + (n64 * sgn + ph * sgh + pw * sgw)[:, None] + offs_co[None, :] * sgc,
                    mask=pc_mask, other=0.0)
        code = tl.load(code_ptr + (n64 * scn + ph * sch + pw * scw)[:, None] + offs_co[None, :] * scc,
                       mask=pc_mask, other=0).to(tl.int32)
        g = tl.where((code & 4) != 0, g, 0.0)
        win = code & 3
        bacc += tl.sum(g.to(tl.float32), axis=0)

        ih0 = 2 * ph - PAD
        iw0 = 2 * pw - PAD
        ih = ky[:, None] + ih0[None, :]  # [K, P]
        iw = kx[:, None] + iw0[None, :]
        base = mask_k[:, None] & mask_p[None, :]
        ptrs = x_ptr + (x_col[:, None] + (n64 * sxn + ih0 * sxh + iw0 * sxw)[None, :])
        for d in tl.static_range(4):
            # Plain names: d is a constexpr of the unrolled loop, so these are too; a `tl.constexpr`
            # annotation here is a reassignment on the next iteration, which the compiler rejects.
            dy = d // 2
            dx = d % 2
            m = base & (ih >= -dy) & (ih < H - dy) & (iw >= -dx) & (iw < W - dx)
            xt = tl.load(ptrs + (dy * sxh + dx * sxw), mask=m, other=0.0)
            gd = tl.where(win == d, g, 0.0).to(xt.dtype)
            if DOT_IN_FP32:
                xt = xt.to(tl.float32)
                gd = gd.to(tl.float32)
            acc = tl.dot(xt, gd, acc, input_precision=DOT_PRECISION)

    # Partials are laid out [SPLIT, C_out, K]: the caller's sum over SPLIT lands directly in weight order.
    part = gw_part_ptr + pid_s.to(tl.int64) * C_out * K
    tl.store(part + offs_co[None, :] * K + offs_k[:, None], acc, mask=mask_k[:, None] & mask_co[None, :])
    if pid_k == 0:
        tl.store(gb_part_ptr + pid_s.to(tl.int64) * C_out + offs_co, bacc, mask=mask_co)


@triton.autotune(configs=_BWD_INPUT_CONFIGS, key=_SHAPE_KEY)
@triton.jit
def conv_relu_pool_bwd_input_kernel(
    g_ptr, code_ptr, w_ptr, gx_ptr,
    N, C_in, H, W, C_out, HP, WP, PAD,
    sgn, sgc, sgh, sgw,
    scn, scc, sch, scw,
    swo, swi, swh, sww,
    sxn, sxc, sxh, sxw,
    KSIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grad_x[n, ci, ih, iw] = sum over (co, ky, kx) of
    #   gy[n, co, ih + PAD - ky, iw + PAD - kx] * w[co, ci, ky, kx],
    # where gy (the full-size conv-output gradient) is never stored: each element is read back from
    # grad_pooled and the code on the fly. Each program owns its output tile: deterministic, no atomics.
    pid_q = tl.program_id(0)
    pid_ci = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    mask_q = offs_q < N * H * W
    mask_ci = offs_ci < C_in
    iw = offs_q % W
    t = offs_q // W
    ih = t % H
    n = t // H
    n64 = n.to(tl.int64)
    g_row = n64 * sgn
    c_row = n64 * scn

    KK: tl.constexpr = KSIZE * KSIZE
    K = C_out * KK
    acc = tl.zeros((BLOCK_Q, BLOCK_CI), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        co = offs_k // KK
        r = offs_k % KK
        ky = r // KSIZE
        kx = r % KSIZE
        oh = ih[:, None] + PAD - ky[None, :]  # conv-output position that (ky, kx) maps this pixel to
        ow = iw[:, None] + PAD - kx[None, :]
        # Floor-mode pooling: rows/cols >= 2 * HP / 2 * WP belong to no window and get no gradient.
        valid = (mask_q[:, None] & mask_k[None, :] & (oh >= 0) & (oh < 2 * HP) & (ow >= 0) & (ow < 2 * WP))
        oh = tl.where(valid, oh, 0)
        ow = tl.where(valid, ow, 0)
        ph = oh // 2
        pw = ow // 2
        pos = (oh % 2) * 2 + (ow % 2)
        g = tl.load(g_ptr + (g_row[:, None] + (co * sgc)[None, :] + ph * sgh + pw * sgw),
                    mask=valid, other=0.0)
        code = tl.load(code_ptr + (c_row[:, None] + (co * scc)[None, :] + ph * sch + pw * scw),
                       mask=valid, other=0).to(tl.int32)
        wt = tl.load(w_ptr + ((co * swo + ky * swh + kx * sww)[:, None] + offs_ci[None, :] * swi),
                     mask=mask_k[:, None] & mask_ci[None, :], other=0.0)
        hit = ((code & 3) == pos) & ((code & 4) != 0)
        a = tl.where(hit, g, 0.0).to(wt.dtype)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(a, wt, acc, input_precision=DOT_PRECISION)

    gx_off = (n64 * sxn + ih * sxh + iw * sxw)[:, None] + offs_ci[None, :] * sxc
    tl.store(gx_ptr + gx_off, acc.to(gx_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_ci[None, :])


# --------------------------------------------------------------------------------------------- launchers


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: TF32 for fp32 exactly when cuDNN's convolution would use it."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for fp16/bf16 inputs


def dot_in_fp32(x: torch.Tensor) -> bool:
    """Whether to widen ``tl.dot`` operands to fp32 first: only for bf16 under the interpreter (CPU tensors),
    whose numpy ``matmul`` would multiply bf16's raw uint16 storage. bf16 x bf16 products are exact in fp32,
    so this computes what the bf16 tensor-core dot computes."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def conv_relu_pool_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int,
                           triton_kernel: Callable = conv_relu_pool_fwd_kernel) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled output (N, Cout, HP, WP) in x's dtype and layout, and its uint8 code (see module docstring).

    Inputs are assumed valid (``fastcnn.ops`` checks them against ``fastcnn.kernels.contract``).
    """
    n, c_in, h, w = x.shape
    c_out, _, ksize, _ = weight.shape
    hp, wp = pooled_size(h, w, ksize, padding)
    fmt = memory_format_of(x)
    out = torch.empty((n, c_out, hp, wp), dtype=x.dtype, device=x.device, memory_format=fmt)
    code = torch.empty((n, c_out, hp, wp), dtype=torch.uint8, device=x.device, memory_format=fmt)
    p = n * hp * wp

    def grid(meta):
        return (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(c_out, meta["BLOCK_CO"]))

    triton_kernel[grid](
        x, weight, bias if bias is not None else weight, out, code,
        n, c_in, h, w, c_out, hp, wp, padding,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        code.stride(0), code.stride(1), code.stride(2), code.stride(3),
        KSIZE=ksize, HAS_BIAS=bias is not None, CI_INNER=fmt == torch.channels_last and c_in > 1,
        DOT_PRECISION=dot_precision(x.dtype), DOT_IN_FP32=dot_in_fp32(x),
    )
    return out, code


def _weight_grad_split(p: int, k: int, c_out: int, device: torch.device) -> int:
    """How many partial sums the weight gradient's reduction over pooled rows is split into.

    Enough programs to fill the GPU (the grid is otherwise only (K / 32) x (Cout / 32) tiles), but each
    program still loops over several row blocks, and the partial buffers stay small.
    """
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(p, 256)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(k, 32) * triton.cdiv(c_out, 32)
    return max(1, min(triton.cdiv(4 * sms, tiles), triton.cdiv(p, 4 * 64)))


def conv_relu_pool_backward_weight(grad_out: torch.Tensor, code: torch.Tensor, x: torch.Tensor,
                                   weight: torch.Tensor, padding: int,
                                   triton_kernel: Callable = conv_relu_pool_bwd_weight_kernel,
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight like ``weight``, grad_bias (Cout,) in weight's dtype), accumulated in fp32."""
    n, c_in, h, w = x.shape
    c_out, _, ksize, _ = weight.shape
    hp, wp = grad_out.shape[2], grad_out.shape[3]
    k = c_in * ksize * ksize
    p = n * hp * wp
    split = _weight_grad_split(p, k, c_out, x.device)
    gw_part = torch.empty((split, c_out, k), dtype=torch.float32, device=x.device)
    gb_part = torch.empty((split, c_out), dtype=torch.float32, device=x.device)
    ci_inner = is_channels_last(x) and c_in > 1

    def grid(meta):
        return (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(c_out, meta["BLOCK_CO"]), split)

    triton_kernel[grid](
        x, grad_out, code, gw_part, gb_part,
        n, c_in, h, w, c_out, hp, wp, padding, split,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
        code.stride(0), code.stride(1), code.stride(2), code.stride(3),
        KSIZE=ksize, CI_INNER=ci_inner,
        DOT_PRECISION=dot_precision(x.dtype), DOT_IN_FP32=dot_in_fp32(x),
    )
    gw = gw_part.sum(0)
    if ci_inner:  # K ran (ky, kx, ci)
        gw = gw.view(c_out, ksize, ksize, c_in).permute(0, 3, 1, 2)
    else:  # K ran (ci, ky, kx)
        gw = gw.view(c_out, c_in, ksize, ksize)
    grad_weight = torch.empty_like(weight)
    grad_weight.copy_(gw)
    grad_bias = gb_part.sum(0).to(weight.dtype)
    return grad_weight, grad_bias


def conv_relu_pool_backward_input(grad_out: torch.Tensor, code: torch.Tensor, x: torch.Tensor,
                                  weight: torch.Tensor, padding: int,
                                  triton_kernel: Callable = conv_relu_pool_bwd_input_kernel) -> torch.Tensor:
    """grad_input with x's shape, dtype and layout (``x`` is read for its metadata only)."""
    n, c_in, h, w = x.shape
    c_out, _, ksize, _ = weight.shape
    hp, wp = grad_out.shape[2], grad_out.shape[3]
    grad_x = torch.empty((n, c_in, h, w), dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    q = n * h * w

    def grid(meta):
        return (triton.cdiv(q, meta["BLOCK_Q"]), triton.cdiv(c_in, meta["BLOCK_CI"]))

    triton_kernel[grid](
        grad_out, code, weight, grad_x,
        n, c_in, h, w, c_out, hp, wp, padding,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
        code.stride(0), code.stride(1), code.stride(2), code.stride(3),
        weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3),
        grad_x.stride(0), grad_x.stride(1), grad_x.stride(2), grad_x.stride(3),
        KSIZE=ksize, DOT_PRECISION=dot_precision(x.dtype), DOT_IN_FP32=dot_in_fp32(x),
    )
    return grad_x

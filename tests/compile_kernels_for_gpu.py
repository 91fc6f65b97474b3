"""Compile the fused kernels for a real GPU target, on a machine without a GPU.

The Triton interpreter, which the CPU tests run, accepts code that the compiler rejects (it once accepted a
``tl.constexpr`` reassigned in an unrolled loop, which fails to compile for any GPU). This runs the launchers
of ``fastcnn.kernels.conv_relu_pool`` with a stand-in for each kernel that compiles every autotune config
through Triton's real pipeline (TTIR, TTGIR, LLVM IR, PTX, and a cubin from the bundled ptxas) for the given
CUDA architecture, without launching anything. A stand-in driver reports that target, so no GPU is needed.

    TRITON_INTERPRET=0 python tests/compile_kernels_for_gpu.py --arch 90 [--case NAME ...]

Prints one line per case and exits non-zero on the first compile error (whose message names the kernel line).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_kernels_for_gpu: run with TRITON_INTERPRET=0 (the interpreter compiles nothing)")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

# (C_in, C_out, kernel, padding, dtype, channels_last, bias, fp32 dot precision): the models' layers in the
# layouts and dtypes fastcnn trains them in, plus the other code paths (NCHW, no bias, large kernels, IEEE fp32).
CASES = {
    "simplecnn-bf16-cl": (1, 32, 3, 0, torch.bfloat16, True, True, "tf32"),
    "lenet2-bf16-cl": (6, 12, 5, 0, torch.bfloat16, True, True, "tf32"),
    "fp32-nchw-k5-nobias": (3, 8, 5, 2, torch.float32, False, False, "tf32"),
    "fp16-cl-k7": (4, 6, 7, 3, torch.float16, True, True, "tf32"),
    "fp32-ieee-k1": (5, 7, 1, 0, torch.float32, False, True, "ieee"),
}


class TargetOnlyDriver:
    """The part of Triton's driver that compiling asks for: which GPU to build for (device 0, stream 0)."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        # triton <= 3.2 asks for it when @triton.autotune is applied; nothing here is ever timed.
        def refuse(*args, **kwargs):
            raise RuntimeError("compile_kernels_for_gpu compiles only; it cannot time kernels")

        return refuse


class CompileOnly:
    """Stands in for an autotuned kernel in ``kernel[grid](...)``: compiles every config, launches nothing."""

    def __init__(self, autotuner):
        self.autotuner = autotuner
        self.binaries = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.binaries += self.autotuner.warmup(*args, grid=grid, **kwargs)

        return launch


def compile_case(name: str) -> int:
    from fastcnn.kernels import conv_relu_pool as kernels

    c_in, c_out, ksize, padding, dtype, channels_last, has_bias, precision = CASES[name]
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, c_in, 13, 11, dtype=dtype).contiguous(memory_format=fmt)
    if channels_last:  # with one channel, .contiguous(channels_last) may keep NCHW strides
        x = torch.empty_strided(x.shape, (13 * 11 * c_in, 1, 11 * c_in, c_in), dtype=dtype).copy_(x)
    weight = torch.randn(c_out, c_in, ksize, ksize, dtype=dtype)
    bias = torch.randn(c_out, dtype=dtype) if has_bias else None
    # The launchers pick these from the tensors' device (CPU here); set them as a GPU run would.
    kernels.dot_in_fp32 = lambda tensor: False
    kernels.dot_precision = lambda dtype: precision
    stand_ins = [CompileOnly(kernels.conv_relu_pool_fwd_kernel), CompileOnly(kernels.conv_relu_pool_bwd_weight_kernel),
                 CompileOnly(kernels.conv_relu_pool_bwd_input_kernel)]
    out, code = kernels.conv_relu_pool_forward(x, weight, bias, padding, triton_kernel=stand_ins[0])
    kernels.conv_relu_pool_backward_weight(out, code, x, weight, padding, triton_kernel=stand_ins[1])
    kernels.conv_relu_pool_backward_input(out, code, x, weight, padding, triton_kernel=stand_ins[2])
    binaries = [binary for stand_in in stand_ins for binary in stand_in.binaries]
    missing = [b for b in binaries if not b.asm.get("cubin")]
    if missing:
        raise RuntimeError(f"{len(missing)} kernels compiled without a cubin")
    return len(binaries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="cases to compile (default: all)")
    args = parser.parse_args(argv)
    driver.set_active(TargetOnlyDriver(GPUTarget("cuda", args.arch, 32)))
    for name in args.case or list(CASES):
        started = time.perf_counter()
        count = compile_case(name)
        print(f"sm_{args.arch} {name}: {count} kernels compiled to cubin in {time.perf_counter() - started:.1f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU benchmarks of the fused Conv2d -> ReLU -> MaxPool2d op against cuDNN and torch.compile.

Run on a CUDA machine (skipped elsewhere):

    pytest bench/test_bench_conv_relu_pool.py --benchmark-json=bench/results/conv_relu_pool-<gpu>.json

Select a subset with ``-k``, e.g. ``-k "lenet and bf16 and not max_autotune"``: the max-autotune provider
compiles (and autotunes) once per shape and dtype, which takes most of the run's wall time. Every entry's
``extra_info`` records the device, the torch / triton / CUDA versions, the dtype, the layer shape and the
provider, so the JSON alone says what was measured. Compile and autotuning are paid in untimed warm-up calls.

Timing. One call of a layer is a few microseconds of GPU work, less than a host round-trip, so each timed round
runs ``CALLS_PER_ROUND`` calls back to back (as training issues them) and then ``torch.cuda.synchronize()``;
the entry's stats are per round and ``extra_info["calls_per_round"]`` says by how much to divide (the report
does). ``extra_info["do_bench_us"]`` adds a second opinion: ``triton.testing.do_bench``'s median of CUDA-event
times per call, with the L2 cache flushed in between.

The memory tests come first in the file, so that a run cut short by a time limit still has them.

Providers:
- ``fused``: ``fastcnn.conv_relu_pool`` (the Triton kernels: forward, and the fused backward).
- ``cudnn``: eager ``F.conv2d`` + ``F.relu`` + ``F.max_pool2d`` (cuDNN convolution).
- ``max_autotune``: ``torch.compile(mode="max-autotune")`` of that same chain.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo.config
import torch.nn.functional as F
from torch import nn

from fastcnn.nn import ConvReLUPool2d
from fastcnn.ops import conv_relu_pool, conv_relu_pool_reference, fused_kernel_status

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 would time the Triton interpreter; unset it"),
]

# name -> (in_channels, out_channels, kernel_size, height, width, padding) of the layers of the two models.
LAYERS = {
    "simplecnn.conv1": (1, 32, 3, 28, 28, 0),
    "lenet.conv1": (1, 6, 5, 28, 28, 0),
    "lenet.conv2": (6, 12, 5, 12, 12, 0),
}
BATCHES = (64, 512, 4096)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROVIDERS = ("fused", "cudnn", "max_autotune")
WARMUP_CALLS = 3
CALLS_PER_ROUND = 20

# One compiled function per (shape, dtype, pass) is more than dynamo's default recompile limit.
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 1024)


@pytest.fixture(scope="module", autouse=True)
def _require_fused_kernel():
    ok, why = fused_kernel_status(torch.device("cuda"))
    if not ok:
        pytest.skip(f"fused kernel unavailable: {why}")


def _versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()),
        "cudnn_allow_tf32": str(torch.backends.cudnn.allow_tf32),
    }


def _chain(provider: str):
    if provider == "fused":
        return conv_relu_pool
    if provider == "cudnn":
        return conv_relu_pool_reference

    # Dynamo caches compiled code per code object: every benchmark's shape is a recompile of this one function,
    # hence the raised recompile limit above.
    def chain(x, weight, bias, padding):
        return F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding=padding)), 2, 2)

    return torch.compile(chain, mode="max-autotune", dynamic=False)


def _run_and_time(benchmark, step, *, cudagraphs: bool, calls: int = CALLS_PER_ROUND):
    def call():
        if cudagraphs:  # max-autotune captures CUDA graphs: tell it each call is a new step
            torch.compiler.cudagraph_mark_step_begin()
        step()

    def timed():
        for _ in range(calls):
            call()
        torch.cuda.synchronize()

    for _ in range(WARMUP_CALLS):  # compile, autotune, cuDNN algorithm search: not timed
        call()
    torch.cuda.synchronize()
    import triton.testing

    benchmark.extra_info["calls_per_round"] = calls
    benchmark.extra_info["do_bench_us"] = round(
        1e3 * float(triton.testing.do_bench(call, warmup=10, rep=40, return_mode="median")), 3)
    benchmark(timed)


# --------------------------------------------------------------------------------------------- memory


def _model(name: str, kernel: str) -> nn.Module:
    if name == "simplecnn":
        return nn.Sequential(ConvReLUPool2d(1, 32, 3, kernel=kernel), nn.Flatten(),
                             nn.Linear(32 * 13 * 13, 10))
    return nn.Sequential(
        ConvReLUPool2d(1, 6, 5, kernel=kernel), ConvReLUPool2d(6, 12, 5, kernel=kernel), nn.Flatten(),
        nn.Linear(12 * 4 * 4, 120), nn.ReLU(), nn.Linear(120, 60), nn.ReLU(), nn.Linear(60, 10))


@pytest.mark.parametrize("amp", ["bf16", "fp32"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model_name", ["simplecnn", "lenet"])
@pytest.mark.parametrize("provider", ["fused", "cudnn"])
def test_training_step_peak_memory(benchmark, provider, model_name, batch, amp):
    """One training step (forward, loss, backward): peak allocated memory in extra_info, time as the entry."""
    torch.manual_seed(0)
    model = _model(model_name, "fused" if provider == "fused" else "aten").cuda()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 1, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(WARMUP_CALLS):
        step()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - baseline

    benchmark.group = f"train step {model_name} b{batch} {amp}"
    benchmark.extra_info.update(_versions())
    benchmark.extra_info.update({
        "provider": provider, "model": model_name, "batch": batch, "amp": amp, "layout": "channels_last",
        "peak_allocated_bytes": int(peak),
        "peak_allocated_note": "max_memory_allocated during one step minus what was allocated before it",
    })
    print(f"{provider} {model_name} batch {batch} {amp}: peak {peak / 2**20:.1f} MiB")
    _run_and_time(benchmark, step, cudagraphs=False)


# --------------------------------------------------------------------------------------------- time


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
def test_conv_relu_pool(benchmark, pass_, layer, batch, dtype_name, provider):
    c_in, c_out, k, h, w, padding = LAYERS[layer]
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    backward = pass_ == "forward_backward"
    # The first layer's input is data (no grad_input); later layers get one. Channels-last, as fastcnn trains.
    x = torch.randn(batch, c_in, h, w, device="cuda", dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(backward and c_in > 1)
    weight = torch.randn(c_out, c_in, k, k, device="cuda", dtype=dtype) / (c_in * k * k) ** 0.5
    weight.requires_grad_(backward)
    bias = torch.zeros(c_out, device="cuda", dtype=dtype, requires_grad=backward)
    fn = _chain(provider)
    hp, wp = (h + 2 * padding - k + 1) // 2, (w + 2 * padding - k + 1) // 2
    grad = torch.randn(batch, c_out, hp, wp, device="cuda", dtype=dtype)

    leaves = [t for t in (x, weight, bias) if t.requires_grad]
    if backward:
        def step():
            # Fresh gradients each call: accumulating into the last call's .grad would time an extra add, and with
            # max-autotune's CUDA graphs that .grad is the previous replay's output, overwritten by the next one.
            for leaf in leaves:
                leaf.grad = None
            fn(x, weight, bias, padding).backward(grad)
    else:
        def step():
            with torch.no_grad():
                fn(x, weight, bias, padding)

    benchmark.group = f"{pass_} {layer} b{batch} {dtype_name}"
    benchmark.extra_info.update(_versions())
    benchmark.extra_info.update({
        "provider": provider, "pass": pass_, "layer": layer, "dtype": dtype_name, "batch": batch,
        "shape": [batch, c_in, h, w], "weight": [c_out, c_in, k, k], "padding": padding,
        "layout": "channels_last", "input_requires_grad": x.requires_grad,
    })
    _run_and_time(benchmark, step, cudagraphs=provider == "max_autotune")

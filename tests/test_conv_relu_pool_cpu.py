"""The native CPU kernel (kernels/conv_relu_pool_cpu.c) beyond the shared op tests of test_conv_relu_pool.py: a
sweep of shapes the interpreter is too slow for, every instruction-set build, threads, torch.compile, and the
fallback when no build loads."""

from __future__ import annotations

import ctypes
import os
import pathlib
import platform
import subprocess
import sys

import pytest
import torch
from fastcnn.kernels import conv_relu_pool_cpu as native
from fused_blocks import TwoBlocks
from test_conv_relu_pool import assert_close, check_against_reference, forward_backward, make_inputs

import fastcnn.ops as ops
from fastcnn.kernel_choice import choose_kernels
from fastcnn.nn import resolve_kernel
from fastcnn.ops import conv_relu_pool, conv_relu_pool_reference

BUILT_HERE = sys.platform == "linux" and os.environ.get("FASTCNN_NATIVE_CPU", "1") != "0"
needs_native = pytest.mark.skipif(native.LIBRARY is None, reason=native.STATUS)


@pytest.fixture(autouse=True)
def native_backend(monkeypatch):
    """CPU calls run the native kernel (conftest turns the Triton interpreter on for the other tests)."""
    monkeypatch.setattr(ops, "INTERPRET_ON_CPU", False)
    monkeypatch.setattr(ops, "NATIVE_ON_CPU", native.LIBRARY is not None)


def test_the_native_kernel_is_built_and_loaded():
    # `pip install` builds it wherever gcc is there (setup.py); a silent fallback here would make every other
    # test of this file skip, and CPU training slow, without a word.
    if not BUILT_HERE:
        pytest.skip("the native build is only expected on Linux with FASTCNN_NATIVE_CPU unset")
    assert native.LIBRARY is not None, native.STATUS
    isa = native.LIBRARY.fastcnn_cpu_isa().decode()
    dot = ", bf16 dot products" if native.LIBRARY.fastcnn_cpu_dot_bf16() else ""
    assert native.STATUS == f"native CPU kernel ({isa} build{dot})"
    assert isa == {"avx512": "avx512", "avx2": "avx2"}.get(native.build_names()[0], isa)


# Every kernel size with every padding it allows, input channels 1..16, output channels on both sides of the
# 16-channel vector block, batch 1 and 3, odd and even sizes.
SWEEP = [
    (n, c_in, c_out, h, w, k, p)
    for i, (k, p) in enumerate([(k, p) for k in (1, 3, 5, 7) for p in range(k // 2 + 1)])
    for j, c_in in enumerate((1, 2, 3, 5, 8, 13, 16))
    for n, c_out, h, w in [((1, 3)[(i + j) % 2], (1, 7, 16, 17, 33)[(i + j) % 5], 9 + (i % 3), 8 + (j % 4))]
]


@needs_native
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SWEEP, ids=lambda s: "n{}_ci{}_co{}_{}x{}_k{}_p{}".format(*s))
def test_sweep_matches_reference(shape, dtype, channels_last):
    # bf16 on grid data: exact products, so both sides round the same values and route ties the same way.
    check_against_reference(*shape, dtype=dtype, channels_last=channels_last,
             data="randn" if dtype == torch.float32 else "grid")


@needs_native
@pytest.mark.parametrize("options", [0, 1], ids=["fma", "dot"])
@pytest.mark.parametrize("shape", SWEEP[::3], ids=lambda s: "n{}_ci{}_co{}_{}x{}_k{}_p{}".format(*s))
def test_bf16_on_both_paths_matches_reference(shape, options, monkeypatch):
    """bf16 takes AVX512-BF16 dot products where the CPU has them (OPTIONS bit 0) and fp32 FMAs otherwise: both
    paths against the reference, whichever this CPU runs (on one without the instruction both are the FMA path)."""
    monkeypatch.setattr(native, "OPTIONS", options)
    check_against_reference(*shape, dtype=torch.bfloat16, channels_last=True, data="grid")
    check_against_reference(*shape, dtype=torch.bfloat16, channels_last=False, data="grid")


@needs_native
def test_the_dot_product_path_is_there_where_the_cpu_has_it():
    flags = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    has_bf16 = " avx512_bf16" in flags
    if native.LIBRARY.fastcnn_cpu_isa().decode() != "avx512" or not has_bf16:
        pytest.skip("this CPU (or this build) has no AVX512-BF16")
    assert native.LIBRARY.fastcnn_cpu_dot_bf16() == 1 and "bf16 dot products" in native.STATUS


@needs_native
@pytest.mark.parametrize("n", [1, 256], ids=["batch1", "batch256"])
def test_tutorial_layers_tiny_and_large_batches(n):
    # At batch 256 the bias gradient sums 43,264 terms: randn data would compare two roundings of that sum (fp32
    # aten was measured 4x further from the float64 sum than the kernel), so the large batch takes grid data,
    # whose sums are exact in any order.
    check_against_reference(n, 1, 32, 28, 28, 3, 0, dtype=torch.float32, channels_last=True,
                            data="randn" if n == 1 else "grid", x_grad=False)
    check_against_reference(n, 6, 12, 12, 12, 5, 0, dtype=torch.bfloat16, channels_last=True, data="grid")


@needs_native
def test_integer_data_is_bitwise_equal_in_both_dtypes():
    for dtype in (torch.float32, torch.bfloat16):
        x, wt, b, draw_grad = make_inputs(3, 5, 20, 9, 11, 3, dtype=dtype, data="int", channels_last=True)
        grad = draw_grad((3, 20, 4, 5))
        out, grads = forward_backward(conv_relu_pool, x, wt, b, 1, grad)
        ref, ref_grads = forward_backward(conv_relu_pool_reference, x, wt, b, 1, grad)
        assert torch.equal(out, ref)
        for name in grads:
            assert torch.equal(grads[name], ref_grads[name]), (dtype, name)


@needs_native
def test_empty_batch():
    x, wt, b, _ = make_inputs(0, 3, 6, 8, 8, 3)
    out, grads = forward_backward(conv_relu_pool, x, wt, b, 1, torch.zeros(0, 6, 4, 4))
    assert out.shape == (0, 6, 4, 4)
    assert not grads["weight"].any() and not grads["bias"].any() and grads["x"].shape == x.shape


@needs_native
def test_threads_one_and_two_agree_and_each_repeats_bitwise():
    x, wt, b, draw_grad = make_inputs(5, 6, 20, 14, 13, 5, seed=4, channels_last=True)
    grad = draw_grad((5, 20, 7, 6))
    threads = torch.get_num_threads()
    results = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            runs = [forward_backward(conv_relu_pool, x, wt, b, 2, grad) for _ in range(2)]
            runs = [(out.clone(), {k: v.clone() for k, v in grads.items()}) for out, grads in runs]
            (out1, grads1), (out2, grads2) = runs
            assert torch.equal(out1, out2)
            for name in grads1:
                assert torch.equal(grads1[name], grads2[name]), (count, name)
            results[count] = runs[0]
    finally:
        torch.set_num_threads(threads)
    (out1, grads1), (out2, grads2) = results[1], results[2]
    # Forward and grad_input write disjoint outputs: the same bits on any thread count; grad_weight's per-thread
    # partials are added in another grouping.
    assert torch.equal(out1, out2) and torch.equal(grads1["x"], grads2["x"])
    for name in ("weight", "bias"):
        assert_close(grads1[name], grads2[name], torch.float32, name)


@needs_native
@pytest.mark.parametrize("build", ["avx512", "avx2", "baseline"])
def test_every_instruction_set_build_computes_the_same(build, monkeypatch):
    path = native.library_path(build)
    if not path.exists():
        pytest.skip(f"{path.name} is not built on this platform")
    if build not in native.build_names():
        pytest.skip(f"this CPU cannot run the {build} build")
    lib, status = native.load_library(path)
    assert lib is not None, status
    monkeypatch.setattr(native, "LIBRARY", lib)
    check_against_reference(3, 5, 17, 10, 9, 3, 1, dtype=torch.float32, channels_last=True, data="randn")
    check_against_reference(2, 8, 33, 9, 12, 5, 2, dtype=torch.bfloat16, channels_last=False, data="grid")


def test_one_openmp_runtime_in_the_process():
    # The library links libgomp.so.1 by soname: the dynamic loader binds it to the copy torch loaded, so the
    # kernel's threads are torch's and no second pool competes with them.
    if native.LIBRARY is None:
        pytest.skip(native.STATUS)
    maps = pathlib.Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps")
    runtimes = {line.split()[-1] for line in maps.read_text().splitlines()
                if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


# --------------------------------------------------------------------------------------------- compile, auto


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compile_runs_the_native_kernel(dtype, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    calls = {"forward": 0, "grad_weight": 0, "grad_input": 0}
    for name, key in (("conv_relu_pool_forward", "forward"), ("conv_relu_pool_backward_weight", "grad_weight"),
                      ("conv_relu_pool_backward_input", "grad_input")):
        real = getattr(native, name)

        def counted(*args, real=real, key=key):
            calls[key] += 1
            return real(*args)

        monkeypatch.setattr(native, name, counted)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TwoBlocks("auto").to(dtype)
    x = torch.randn(2, 3, 12, 12, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    before = dict(calls)

    backend = CompileCounterWithBackend("inductor")
    out = torch.compile(model, backend=backend, fullgraph=True)(x)
    out.sum().backward()
    nodes = [node.target for node in backend.graphs[0].graph.nodes if node.op == "call_function"]
    assert nodes.count(torch.ops.fastcnn.conv_relu_pool) == 2
    # Compiled forward and backward ran the native kernels (not the aten branch): 2 forwards, 2 weight
    # gradients, 1 input gradient (block1's input is a leaf that wants a gradient too: 2).
    assert {k: calls[k] - before[k] for k in calls} == {"forward": 2, "grad_weight": 2, "grad_input": 2}
    assert_close(out, eager, dtype, "output")
    for got, want in zip([p.grad for p in model.parameters()] + [x.grad], eager_grads, strict=True):
        assert_close(got, want, dtype, "grad")


@needs_native
def test_auto_is_the_native_kernel_on_cpu_and_choose_kernels_measures_it():
    cpu = torch.device("cpu")
    assert resolve_kernel("auto", cpu) == "fused"
    torch.manual_seed(0)
    model = TwoBlocks("auto")
    timings = choose_kernels(model, [torch.randn(4, 3, 12, 12)], [torch.randn(3, 3, 12, 12)])
    assert [(t.layer, t.key.training) for t in timings] == [
        ("block1", True), ("block2", True), ("block1", False), ("block2", False)]
    assert all(t.fused_ms > 0 and t.aten_ms > 0 for t in timings)
    # forward follows the measured winner of each call shape: training (the parameters want gradients) and eval
    assert model.block1.implementation(torch.randn(4, 3, 12, 12)) == timings[0].choice
    with torch.no_grad():
        assert model.block1.implementation(torch.randn(3, 3, 12, 12)) == timings[2].choice


# --------------------------------------------------------------------------------------------- fallback


def test_no_build_in_the_folder_means_no_library_and_a_reason(tmp_path):
    lib, status = native.load(tmp_path)
    assert lib is None
    assert status.startswith("the native CPU kernel is not available") and "not built" in status


def test_a_broken_library_file_is_refused_with_its_reason(tmp_path):
    for name in native.build_names():
        native.library_path(name, tmp_path).write_bytes(b"not an ELF file")
    lib, status = native.load(tmp_path)
    assert lib is None and "not available" in status and native.build_names()[0] in status


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("FASTCNN_NATIVE_CPU", "0")
    assert native.load() == (None, "the native CPU kernel is switched off (FASTCNN_NATIVE_CPU=0)")


def test_without_the_library_the_op_takes_the_aten_chain(monkeypatch):
    monkeypatch.setattr(ops, "NATIVE_ON_CPU", False)

    def fail(*args):
        raise AssertionError("the native kernel was called although it is not loaded")

    monkeypatch.setattr(native, "conv_relu_pool_forward", fail)
    assert resolve_kernel("auto", torch.device("cpu")) == "aten"
    x, wt, b, draw_grad = make_inputs(2, 3, 6, 9, 8, 3, data="int")
    out, grads = forward_backward(conv_relu_pool, x, wt, b, 1, draw_grad((2, 6, 4, 4)))
    ref, ref_grads = forward_backward(conv_relu_pool_reference, x, wt, b, 1, draw_grad((2, 6, 4, 4)))
    assert torch.equal(out, ref)
    assert ops.fused_kernel_status("cpu")[0] is False


def test_fastcnn_env_says_in_one_line_when_the_native_kernel_is_off():
    env = dict(os.environ, FASTCNN_NATIVE_CPU="0")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-m", "fastcnn", "env"], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout
    lines = [line for line in out.splitlines() if "native CPU kernel" in line]
    assert len(lines) == 1 and "switched off (FASTCNN_NATIVE_CPU=0)" in lines[0], out


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 dispatch")
def test_builds_follow_torchs_reading_of_the_cpu(monkeypatch):
    for capability, expected in (("AVX512", ["avx512", "avx2", "baseline"]), ("AVX2", ["avx2", "baseline"]),
                                 ("DEFAULT", ["baseline"])):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert native.build_names() == expected


def test_ctypes_signatures_cover_every_exported_kernel():
    if native.LIBRARY is None:
        pytest.skip(native.STATUS)
    for name in native._SIGNATURES:
        fn = getattr(native.LIBRARY, name)
        assert fn.restype is ctypes.c_int and len(fn.argtypes) in (18, 19)  # options last


@needs_native
def test_a_non_finite_gradient_reaches_only_the_patch_it_belongs_to():
    # grad_input sums whole vectors of zero-padded weights: inf * 0 must not spill NaN right of the k x k patch.
    x = torch.zeros(1, 1, 12, 12, requires_grad=True)
    wt = torch.ones(1, 1, 5, 5, requires_grad=True)
    b = torch.ones(1, requires_grad=True)  # every window passes
    grad = torch.zeros(1, 1, 4, 4)
    grad[0, 0, 0, 0] = float("inf")
    _, grads = forward_backward(conv_relu_pool, x, wt, b, 0, grad)
    _, ref_grads = forward_backward(conv_relu_pool_reference, x, wt, b, 0, grad)
    torch.testing.assert_close(grads["x"], ref_grads["x"], equal_nan=True)
    assert not grads["x"][0, 0, :, 5:].isnan().any()


def _through_the_op(x, weight, bias, padding):
    """conv_relu_pool by way of the registered op (what torch.compile traces), not the eager Function."""
    x, weight, bias = ops._autocast(x, weight, bias)
    out, _ = torch.ops.fastcnn.conv_relu_pool(x, weight, bias, padding)
    return out


@needs_native
@pytest.mark.parametrize("case", ["fp32", "bf16", "autocast-bf16", "autocast-no-input-grad", "no-bias"])
def test_eager_calls_give_the_ops_numbers_bit_for_bit(case):
    """Eager CPU calls run the native launchers from an autograd.Function (no op dispatch); the same kernels, the
    same casts: outputs and every gradient equal the op's exactly, also under autocast with fp32 parameters."""
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    x, wt, b, draw_grad = make_inputs(3, 5, 17, 11, 10, 3, dtype=dtype, channels_last=True, seed=2,
                                      bias=case != "no-bias", x_grad=case != "autocast-no-input-grad")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.startswith("autocast"))
    results, grad = [], draw_grad((3, 17, 5, 5))
    for fn in (conv_relu_pool, _through_the_op):
        with autocast:
            out = fn(x, wt, b, 1)
        grad = grad.to(out.dtype)
        for t in (x, wt, b):
            if t is not None:
                t.grad = None
        out.backward(grad)
        results.append((out, {name: t.grad.clone() for name, t in (("x", x), ("weight", wt), ("bias", b))
                              if t is not None and t.requires_grad}))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == ref.dtype and out.stride() == ref.stride() and torch.equal(out, ref)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].dtype == ref_grads[name].dtype and torch.equal(grads[name], ref_grads[name]), name


@needs_native
def test_eager_calls_skip_the_op_dispatch_and_dispatch_modes_see_the_op():
    from test_conv_relu_pool import RecordedOps
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    x, wt, b, draw_grad = make_inputs(2, 3, 8, 9, 9, 3, channels_last=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = conv_relu_pool(x, wt, b, 1)
        out.backward(draw_grad(out.shape))
    names = {event.name for event in prof.events()}
    assert "_NativeEager" in names and "fastcnn::native_cpu_forward" in names  # the Function, its kernel's range
    assert "fastcnn::conv_relu_pool" not in names, names  # and no op dispatch
    # a dispatch mode (recorders, FlopCounterMode, fake tensors) is shown the op, as before
    with RecordedOps() as recorded:
        out = conv_relu_pool(x, wt, b, 1)
        out.backward(draw_grad(out.shape))
    recorded_names = {str(func) for func, _ in recorded.calls}
    assert "fastcnn.conv_relu_pool.default" in recorded_names, recorded_names
    with FlopCounterMode(display=False):
        conv_relu_pool(x, wt, b, 1)
    with pytest.raises(ValueError, match="share one dtype"):  # mixed dtypes outside autocast: the op's one line
        conv_relu_pool(x, wt.detach().bfloat16(), b, 1)


@needs_native
def test_eager_calls_refuse_a_double_backward_in_words():
    x, wt, b, draw_grad = make_inputs(2, 3, 8, 9, 9, 3, channels_last=True)
    out = conv_relu_pool(x, wt, b, 1)
    (grad_x,) = torch.autograd.grad(out, x, draw_grad(out.shape), create_graph=True)
    # the kernels' gradients are not differentiable again: an error, not second derivatives silently zero
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        grad_x.sum().backward()


@needs_native
def test_bf16_ties_after_rounding_go_to_the_first_position():
    """Pre-activations that differ in fp32 but round to one bf16 value tie, and the first position wins; the
    rounding sends a midpoint to the even neighbour. Each window's four sums are base + offset (two input
    channels, 1x1 weights of 1), exact in fp32."""
    one, half_ulp, tiny = 1.0, 2.0 ** -8, 2.0 ** -10  # bf16's ulp at 1.0 is 2^-7
    # each position as (first channel, second channel): both exact in bf16, their sum is not
    windows = [
        [(one, 0), (one, tiny), (one, 0), (one, 0)],                # all round to 1.0: the first
        [(one, 0), (one, half_ulp), (one, 0), (one, 0)],            # a midpoint goes to the even 1.0: the first
        [(one, 0), (one, half_ulp + tiny), (one, 0), (one, 0)],     # up to 1.0078125: the second
        [(one, half_ulp), (one, 2 * half_ulp), (one, 0), (one, 0)],  # 1.0 (even) and 1.0078125 (odd): the second
        [(one, half_ulp + tiny), (one, 2 * half_ulp), (one, 0), (one, 0)],  # both 1.0078125: the first
        [(-one, 0), (0, -tiny), (0, 0), (0, -half_ulp)],            # nothing passes: code 0, no gradient
        [(0.5, 0), (one - half_ulp, half_ulp / 2), (one, 0), (0, 0)],  # 1 - 2^-9: the midpoint below 1.0
    ]                                                                # (even) rounds up to it: the second
    pairs = torch.tensor(windows)  # (windows, position, channel)
    x = pairs.view(len(windows), 2, 2, 2).permute(3, 1, 0, 2).reshape(1, 2, 2, 2 * len(windows))
    x = x.bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    wt = torch.ones(1, 2, 1, 1, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.arange(1.0, len(windows) + 1).view(1, 1, 1, -1).bfloat16()
    out, grads = forward_backward(conv_relu_pool, x, wt, None, 0, grad)
    ref, ref_grads = forward_backward(conv_relu_pool_reference, x, wt, None, 0, grad)
    assert torch.equal(out, ref)
    assert torch.equal(grads["x"], ref_grads["x"]) and torch.equal(grads["weight"], ref_grads["weight"])
    winners = grads["x"][0, 0].float().view(2, len(windows), 2).permute(1, 0, 2).reshape(len(windows), 4)
    assert winners.argmax(1).tolist()[:5] + winners.argmax(1).tolist()[6:] == [0, 0, 1, 1, 0, 1]
    assert not winners[5].any()

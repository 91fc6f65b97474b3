"""The fused Conv2d -> ReLU -> MaxPool2d op against its plain-PyTorch reference: forward and every gradient.

On CPU every test runs twice: on the real Triton kernel code under Triton's interpreter (conftest sets
TRITON_INTERPRET=1 before import), so shapes stay small, and on the native CPU kernel. On a GPU machine,
``TRITON_INTERPRET=0 pytest tests/...`` runs the same tests on CUDA with the compiled kernels.
"""

from __future__ import annotations

import re

import pytest
import torch
from fastcnn.kernels.contract import MAX_KERNEL_SIZE, call_problem, conv_problem, pool_problem
from fused_blocks import TwoBlocks  # also imported from here by test_conv_relu_pool_cpu.py
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastcnn.ops as ops
from fastcnn.nn import ConvReLUPool2d, fusion_problem, resolve_kernel
from fastcnn.ops import conv_relu_pool, conv_relu_pool_reference, fused_kernel_status

DEVICE = "cuda" if torch.cuda.is_available() and not ops.INTERPRET_ON_CPU else "cpu"

# Tolerances per dtype, as (rtol, atol relative to the largest reference magnitude). The kernel accumulates in
# fp32 and rounds once to the output dtype; the reference (oneDNN / cuDNN) accumulates in another order and
# may round the convolution and the bias add separately, so results may differ by a few units of roundoff u:
# fp32 u = 6e-8 (plus summation-order noise over up to a few hundred terms), fp16 u = 4.9e-4, bf16 u = 3.9e-3.
# The absolute part covers elements that cancel to near zero, whose error scales with the inputs, not with
# the element.
TOLERANCES = {
    torch.float32: (1e-5, 2e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    # On a GPU, fp32 compares IEEE against IEEE: the kernel follows cudnn.allow_tf32 like cuDNN does.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture(autouse=True, params=["interpreter", "native"] if DEVICE == "cpu" else ["cuda"])
def fused_backend(request, monkeypatch):
    """What runs the fused op's CPU calls in this test: the Triton interpreter or the native kernel."""
    if request.param == "native":
        if ops._native.LIBRARY is None:
            pytest.skip(ops._native.STATUS)  # test_conv_relu_pool_cpu.py fails where a build was expected
        monkeypatch.setattr(ops, "INTERPRET_ON_CPU", False)
        monkeypatch.setattr(ops, "NATIVE_ON_CPU", True)
    elif request.param == "interpreter" and not ops.INTERPRET_ON_CPU:
        pytest.skip("needs TRITON_INTERPRET=1 before import (tests/conftest.py sets it)")
    return request.param


@pytest.fixture
def aten_branch(monkeypatch, fused_backend):
    """The op's plain-PyTorch branch on CPU, as without TRITON_INTERPRET and the native kernel."""
    if fused_backend == "native":
        pytest.skip("the aten branch does not depend on the fused backend: tested once")
    monkeypatch.setattr(ops, "INTERPRET_ON_CPU", False)
    monkeypatch.setattr(ops, "NATIVE_ON_CPU", False)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol_rel = TOLERANCES[dtype]
    scale = expected.detach().abs().max().float().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol_rel * max(scale, 1.0),
                               msg=lambda m: f"{what}: {m}")


def make_inputs(n, c_in, c_out, h, w, k, *, dtype=torch.float32, channels_last=False, bias=True,
                x_grad=True, data="randn", seed=0):
    """x, weight, bias (or None) and a gradient for the pooled output.

    ``data="randn"``: generic values. ``data="grid"``: multiples of 1/8 (x) and 1/4 (weight, bias, grad) of
    magnitude <= 1, whose products and sums are exact in fp32 in any order; in fp16/bf16 both sides round the
    same exact value once, so the window maxima (and the gradient routing) agree exactly, and ties are common.
    ``data="int"``: small integers: every result is an exact integer, to compare routing bitwise.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape, step, lim):
        if data == "randn":
            return torch.randn(*shape, generator=gen)
        return torch.randint(-lim, lim + 1, shape, generator=gen).float() * step

    int_data = data == "int"
    x = draw(n, c_in, h, w, step=1 if int_data else 1 / 8, lim=2 if int_data else 8)
    wt = draw(c_out, c_in, k, k, step=1 if int_data else 1 / 4, lim=1 if int_data else 4)
    b = draw(c_out, step=1 if int_data else 1 / 4, lim=2 if int_data else 4) if bias else None
    x = x.to(DEVICE, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(x_grad)
    wt = wt.to(DEVICE, dtype).requires_grad_()
    if b is not None:
        b = b.to(DEVICE, dtype).requires_grad_()
    return x, wt, b, lambda shape: draw(*shape, step=1 if int_data else 1 / 4, lim=3 if int_data else 4).to(
        DEVICE, dtype)


def forward_backward(fn, x, wt, b, padding, grad):
    for t in (x, wt, b):
        if t is not None:
            t.grad = None
    out = fn(x, wt, b, padding)
    out.backward(grad)
    grads = {name: t.grad for name, t in (("x", x), ("weight", wt), ("bias", b))
             if t is not None and t.requires_grad}
    return out, grads


def check_against_reference(n, c_in, c_out, h, w, k, padding, *, dtype=torch.float32, channels_last=False,
                            bias=True, x_grad=True, data="randn", seed=0, exact=False):
    x, wt, b, draw_grad = make_inputs(n, c_in, c_out, h, w, k, dtype=dtype, channels_last=channels_last,
                                      bias=bias, x_grad=x_grad, data=data, seed=seed)
    with torch.no_grad():
        shape = conv_relu_pool_reference(x, wt, b, padding).shape
    grad = draw_grad(shape)
    out, grads = forward_backward(conv_relu_pool, x, wt, b, padding, grad)
    ref, ref_grads = forward_backward(conv_relu_pool_reference, x, wt, b, padding, grad)

    assert out.shape == ref.shape and out.dtype == ref.dtype
    expected_cl = channels_last and c_in > 1
    assert out.is_contiguous(memory_format=torch.channels_last if expected_cl else torch.contiguous_format)
    assert grads.keys() == ref_grads.keys()
    if not x_grad:
        assert "x" not in grads
    if exact:
        assert torch.equal(out, ref)
        for name in grads:
            assert torch.equal(grads[name], ref_grads[name]), name
    else:
        assert_close(out, ref, dtype, "output")
        for name in grads:
            assert grads[name].dtype == ref_grads[name].dtype
            assert_close(grads[name], ref_grads[name], dtype, f"grad {name}")


# --------------------------------------------------------------------------------------------- shapes

# (n, c_in, c_out, h, w, k, padding): a covering set, not the cross product. Odd batches and sizes, every
# required channel count, k 1/3/5/7 with paddings 0..k//2, 2x2 pooled outputs, weight-gradient splits > 1.
SHAPES = [
    (1, 1, 6, 12, 12, 5, 0),     # lenet conv1, 1x1... 4x4 pooled
    (3, 6, 12, 11, 9, 5, 0),     # lenet conv2 (odd sizes), 3x2 pooled
    (2, 1, 32, 9, 9, 3, 0),      # simplecnn conv1, odd conv output 7x7 -> 3x3
    (1, 3, 1, 7, 10, 3, 1),      # Cout 1
    (3, 32, 64, 6, 6, 3, 1),     # wide: Cin 32 (K = 288), Cout 64 (two column tiles)
    (5, 6, 12, 5, 4, 1, 0),      # k 1, 2x2 pooled, odd batch
    (2, 3, 6, 6, 7, 5, 2),       # k 5, padding 2
    (1, 6, 6, 9, 8, 7, 3),       # k 7, padding 3
    (1, 1, 6, 7, 5, 7, 2),       # k 7, padding 2, 2x1 pooled... odd
    (3, 1, 12, 24, 23, 3, 0),    # 363 pooled rows: weight gradient split over several programs
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}_ci{}_co{}_{}x{}_k{}_p{}".format(*s))
def test_matches_reference_fp32(shape):
    check_against_reference(*shape)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[6]], ids=["k5p0", "k5p2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_matches_reference_low_precision(shape, dtype):
    check_against_reference(*shape, dtype=dtype, data="grid")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_forward_low_precision_generic_values(dtype):
    # Generic values: the winner of a near-tie may differ after rounding, the pooled values may not.
    x, wt, b, _ = make_inputs(2, 3, 12, 9, 8, 3, dtype=dtype)
    with torch.no_grad():
        assert_close(conv_relu_pool(x, wt, b, 1), conv_relu_pool_reference(x, wt, b, 1), dtype, "output")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_channels_last(dtype):
    check_against_reference(3, 6, 12, 9, 10, 3, 1, dtype=dtype, channels_last=True, data="grid")


def test_channels_last_single_channel():
    check_against_reference(2, 1, 6, 8, 9, 3, 0, channels_last=True)


def test_no_bias():
    check_against_reference(2, 3, 6, 8, 8, 3, 1, bias=False)


class RecordedOps(TorchDispatchMode):
    """The operators dispatched while it is active, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def test_input_without_grad_skips_grad_input(monkeypatch):
    launched = []  # the native launchers called (eager CPU calls reach them without the op's backward ops)
    for name in ("conv_relu_pool_backward_input", "conv_relu_pool_backward_weight"):
        real = getattr(ops._native, name)
        monkeypatch.setattr(ops._native, name, lambda *args, real=real, name=name: launched.append(name) or real(*args))
    x, wt, b, draw_grad = make_inputs(3, 1, 6, 10, 10, 5, x_grad=False)
    out = conv_relu_pool(x, wt, b, 0)
    with RecordedOps() as recorded:
        out.backward(draw_grad(out.shape))
    names = [str(func) for func, _ in recorded.calls]
    # the recorder sees the op's backward, or the native launcher ran it
    assert "fastcnn.conv_relu_pool_backward_weight.default" in names or launched == ["conv_relu_pool_backward_weight"]
    assert "fastcnn.conv_relu_pool_backward_input.default" not in names, names
    assert "conv_relu_pool_backward_input" not in launched
    # The aten branch computes weight and bias gradients with convolution_backward: never the input's there either.
    masks = [args[-1] for func, args in recorded.calls if func is torch.ops.aten.convolution_backward.default]
    assert all(not mask[0] for mask in masks), masks
    assert x.grad is None and wt.grad is not None and b.grad is not None


def test_noncontiguous_input_and_grad():
    x, wt, b, _ = make_inputs(2, 3, 6, 10, 12, 3)
    x_view = x.detach()[:, :, 1:, ::2].requires_grad_()  # strided, neither NCHW nor channels-last
    grad = torch.randn(2, 6, 4, 1, device=DEVICE).expand(2, 6, 4, 3)  # stride 0
    out, grads = forward_backward(conv_relu_pool, x_view, wt, b, 1, grad)
    ref, ref_grads = forward_backward(conv_relu_pool_reference, x_view, wt, b, 1, grad)
    assert_close(out, ref, torch.float32, "output")
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], torch.float32, f"grad {name}")


# --------------------------------------------------------------------------------------------- exact ties


def test_integer_data_is_bitwise_equal():
    # Small integers: every sum is exact in any order, so outputs, routing and gradients match bit for bit.
    for seed, shape in enumerate([(2, 3, 6, 9, 9, 3, 1), (3, 1, 12, 8, 7, 5, 2), (1, 6, 4, 6, 6, 1, 0)]):
        check_against_reference(*shape, data="int", seed=seed, exact=True)


@pytest.mark.parametrize("bias_value", [-1.0, 0.0, 2.0])
def test_constant_image_zero_weight(bias_value):
    # Every window holds four equal values: the gradient goes to position 0, and only if the value is > 0.
    x = torch.ones(2, 3, 6, 7, device=DEVICE, requires_grad=True)
    wt = torch.zeros(4, 3, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.full((4,), bias_value, device=DEVICE, requires_grad=True)
    grad = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32, device=DEVICE).view(2, 4, 3, 3)
    out, grads = forward_backward(conv_relu_pool, x, wt, b, 1, grad)
    ref, ref_grads = forward_backward(conv_relu_pool_reference, x, wt, b, 1, grad)
    assert torch.equal(out, ref)
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    if bias_value <= 0:
        assert not grads["bias"].any() and not grads["weight"].any()


def test_all_negative_windows():
    x = torch.rand(2, 3, 8, 8, device=DEVICE) + 0.5
    x.requires_grad_()
    wt = (-torch.rand(5, 3, 3, 3, device=DEVICE)).requires_grad_()
    b = torch.zeros(5, device=DEVICE, requires_grad=True)
    out, grads = forward_backward(conv_relu_pool, x, wt, b, 0, torch.ones(2, 5, 3, 3, device=DEVICE))
    assert not out.any()
    for name, g in grads.items():
        assert not g.any(), name


def test_equal_maxima_route_to_first():
    # k = 1, weight 1: the conv output is the image, so each window's pattern decides the routing directly.
    windows = torch.tensor([
        [[1.0, 3.0], [3.0, 2.0]],  # first max at (0, 1)
        [[3.0, 3.0], [3.0, 3.0]],  # all equal: (0, 0)
        [[0.0, 0.0], [0.0, 2.0]],  # (1, 1)
        [[-1.0, 0.0], [-2.0, 0.0]],  # all <= 0 after ReLU: (0, 0), no gradient
        [[2.0, 1.0], [5.0, 5.0]],  # (1, 0)
    ])
    x = torch.cat(list(windows), dim=1).view(1, 1, 2, 10).to(DEVICE).requires_grad_()
    wt = torch.ones(1, 1, 1, 1, device=DEVICE, requires_grad=True)
    grad = torch.arange(1.0, 6.0, device=DEVICE).view(1, 1, 1, 5)
    _, grads = forward_backward(conv_relu_pool, x, wt, None, 0, grad)
    _, ref_grads = forward_backward(conv_relu_pool_reference, x, wt, None, 0, grad)
    assert torch.equal(grads["x"], ref_grads["x"])
    assert torch.equal(grads["weight"], ref_grads["weight"])
    expected = torch.zeros(2, 10, device=DEVICE)
    expected[0, 1], expected[0, 2], expected[1, 5], expected[1, 8] = 1.0, 2.0, 3.0, 5.0
    assert torch.equal(grads["x"].view(2, 10), expected)


def test_nan_routing_matches_pytorch():
    # PyTorch's pool takes a NaN over any number (`val > max || isnan(val)`), and ReLU keeps NaN.
    x = torch.zeros(1, 1, 2, 4, device=DEVICE)
    x[0, 0, 1, 0] = float("nan")
    x[0, 0, 0, 1] = 5.0
    x[0, 0, 1, 3] = float("nan")
    x.requires_grad_()
    wt = torch.ones(1, 1, 1, 1, device=DEVICE, requires_grad=True)
    grad = torch.tensor([[[[1.0, 2.0]]]], device=DEVICE)
    out, grads = forward_backward(conv_relu_pool, x, wt, None, 0, grad)
    ref, ref_grads = forward_backward(conv_relu_pool_reference, x, wt, None, 0, grad)
    torch.testing.assert_close(out, ref, equal_nan=True)
    torch.testing.assert_close(grads["x"], ref_grads["x"], equal_nan=True)


def test_backward_is_deterministic():
    x, wt, b, draw_grad = make_inputs(3, 1, 12, 24, 23, 3, seed=3)
    grad = draw_grad((3, 12, 11, 10))
    _, first = forward_backward(conv_relu_pool, x, wt, b, 0, grad)
    first = {k: v.clone() for k, v in first.items()}
    _, second = forward_backward(conv_relu_pool, x, wt, b, 0, grad)
    for name in first:
        assert torch.equal(first[name], second[name]), name


# --------------------------------------------------------------------------------------------- hypothesis


@st.composite
def layer_shapes(draw):
    k = draw(st.sampled_from([1, 3, 5]))
    padding = draw(st.integers(0, k // 2))
    smallest = k - 2 * padding + 1  # conv output at least 2x2, pooled at least 1x1
    h = draw(st.integers(smallest, smallest + 7))
    w = draw(st.integers(smallest, smallest + 7))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 7)), h, w, k, padding)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=layer_shapes(), channels_last=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes(shape, channels_last, bias, seed):
    check_against_reference(*shape, channels_last=channels_last, bias=bias, seed=seed)


# --------------------------------------------------------------------------------------------- op checks


def test_opcheck_fused_path(fused_backend):
    # test_aot_dispatch_dynamic is left out under the interpreter: it traces the op body with fake tensors
    # (AOTAutograd's FunctionalTensorMode decomposes triton_ops), and the interpreter cannot run on fake tensors.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if fused_backend != "interpreter":
        utils += ("test_aot_dispatch_dynamic",)
    x, wt, b, _ = make_inputs(2, 3, 4, 6, 7, 3)
    torch.library.opcheck(torch.ops.fastcnn.conv_relu_pool.default, (x, wt, b, 1), test_utils=utils)
    code = torch.randint(0, 8, (2, 4, 3, 3), dtype=torch.uint8, device=DEVICE)
    grad = torch.randn(2, 4, 3, 3, device=DEVICE)
    for op in (torch.ops.fastcnn.conv_relu_pool_backward_input.default,
               torch.ops.fastcnn.conv_relu_pool_backward_weight.default):
        torch.library.opcheck(op, (grad, code, x.detach(), wt.detach(), 1), test_utils=utils)


@pytest.mark.skipif(DEVICE != "cpu", reason="the aten branch is the CPU path")
def test_opcheck_aten_branch(aten_branch):
    x, wt, _, _ = make_inputs(2, 3, 4, 6, 7, 3, channels_last=True)
    torch.library.opcheck(torch.ops.fastcnn.conv_relu_pool.default, (x, wt, None, 1))
    code = torch.randint(0, 8, (2, 4, 3, 3), dtype=torch.uint8)
    grad = torch.randn(2, 4, 3, 3)
    for op in (torch.ops.fastcnn.conv_relu_pool_backward_input.default,
               torch.ops.fastcnn.conv_relu_pool_backward_weight.default):
        torch.library.opcheck(op, (grad, code, x.detach(), wt.detach(), 1))


@pytest.mark.skipif(DEVICE != "cpu", reason="the aten branch is the CPU path")
def test_aten_branch_matches_reference(aten_branch):
    check_against_reference(2, 3, 6, 9, 8, 3, 1, data="int", exact=True)
    check_against_reference(3, 6, 4, 7, 7, 5, 2, channels_last=True)


def test_code_matches_between_branches(monkeypatch):
    # The kernel's code and the aten branch's code must mean the same thing (backward may mix them).
    x, wt, b, _ = make_inputs(2, 3, 6, 9, 8, 3, data="int", x_grad=False)
    out, code = torch.ops.fastcnn.conv_relu_pool(x, wt.detach(), b.detach(), 1)
    monkeypatch.setattr(ops, "INTERPRET_ON_CPU", False)
    monkeypatch.setattr(ops, "NATIVE_ON_CPU", False)
    out_aten, code_aten = torch.ops.fastcnn.conv_relu_pool(x.cpu(), wt.detach().cpu(), b.detach().cpu(), 1)
    assert torch.equal(out.cpu(), out_aten)
    assert torch.equal(code.cpu(), code_aten)


# --------------------------------------------------------------------------------------------- compile, AMP


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU compile of the op's aten branch")
def test_compile_fullgraph_traces_the_op(aten_branch):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = TwoBlocks("fused")
    x = torch.randn(2, 3, 12, 12)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    backend = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    ops_in_graph = [node.target for node in backend.graphs[0].graph.nodes if node.op == "call_function"]
    assert ops_in_graph.count(torch.ops.fastcnn.conv_relu_pool) == 2
    torch.testing.assert_close(out, eager)
    for p, g in zip(model.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU compile of the reference chain")
def test_compile_auto_model_on_cpu():
    torch.manual_seed(0)
    model = TwoBlocks("auto")
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


def test_autocast_casts_like_conv2d():
    amp_dtype = torch.bfloat16
    x, wt, b, _ = make_inputs(2, 3, 6, 8, 8, 3, data="grid")
    with torch.autocast(DEVICE, dtype=amp_dtype):
        out = conv_relu_pool(x, wt, b, 1)
        ref = conv_relu_pool_reference(x, wt, b, 1)
    assert out.dtype == ref.dtype == amp_dtype
    assert_close(out, ref, amp_dtype, "output")
    out.float().sum().backward()
    assert wt.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


# --------------------------------------------------------------------------------------------- module, status


def test_resolve_kernel(fused_backend):
    cpu = torch.device("cpu")
    # auto is the native kernel where it runs, and never the interpreter for training, even when it is on
    assert resolve_kernel("auto", cpu) == ("fused" if fused_backend == "native" else "aten")
    assert resolve_kernel("aten", cpu) == "aten"
    assert resolve_kernel("fused", cpu) == "fused"
    # the old names of the two implementations are still taken, and answered in the new ones
    assert (resolve_kernel("torch", cpu), resolve_kernel("triton", cpu)) == ("aten", "fused")
    assert resolve_kernel("aten", torch.device("meta")) == "aten"
    with pytest.raises(ValueError, match="unknown kernel 'cudnn'"):
        resolve_kernel("cudnn", cpu)


def test_module_takes_old_and_new_kernel_names_and_keeps_the_new_one():
    assert [ConvReLUPool2d(1, 2, 3, kernel=name).kernel for name in ("auto", "fused", "aten", "triton", "torch")] == [
        "auto", "fused", "aten", "fused", "aten"]
    assert "kernel='fused'" in repr(ConvReLUPool2d(1, 2, 3, kernel="triton"))
    with pytest.raises(ValueError, match="unknown kernel 'cuda'"):
        ConvReLUPool2d(1, 2, 3, kernel="cuda")


def test_auto_module_on_cpu_runs_the_reference_chain(monkeypatch, fused_backend):
    import fastcnn.nn

    if fused_backend == "native":
        pytest.skip("with the native kernel, auto runs the fused op on CPU (test_conv_relu_pool_cpu.py)")

    def fail(*args, **kwargs):
        raise AssertionError("kernel='auto' called the fused op on CPU")

    monkeypatch.setattr(fastcnn.nn, "conv_relu_pool", fail)
    block = ConvReLUPool2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(block(x), conv_relu_pool_reference(x, block.weight, block.bias))


def test_module_state_dict_and_from_conv():
    conv = nn.Conv2d(3, 6, 5, padding=2)
    fused = ConvReLUPool2d.from_conv(conv, kernel="fused").to(DEVICE)
    assert fused.weight is conv.weight and fused.kernel == "fused"
    plain = nn.Conv2d(3, 6, 5, padding=2)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    assert_close(fused(x), conv_relu_pool_reference(x, conv.weight, conv.bias, 2), torch.float32, "output")
    with pytest.raises(ValueError, match=r"cannot fuse .*stride \(2, 2\), needs 1 \(the fused op takes stride 1"):
        ConvReLUPool2d.from_conv(nn.Conv2d(3, 6, 3, stride=2))
    # the kernels' rule, not only the module's arguments: a 9x9 kernel fuses no more than it runs
    with pytest.raises(ValueError, match="kernel 9x9 larger than 7x7"):
        ConvReLUPool2d.from_conv(nn.Conv2d(3, 6, 9))
    with pytest.raises(ValueError, match="string padding"):
        ConvReLUPool2d.from_conv(nn.Conv2d(3, 6, 3, padding="same"))


def test_fused_kernel_status(monkeypatch, fused_backend):
    ok, why = fused_kernel_status("cpu")
    if fused_backend == "native":
        assert ok and "native CPU kernel" in why and "build" in why
    else:
        assert ok == (ops.INTERPRET_ON_CPU and ops._TRITON_ERROR is None) and why
    monkeypatch.setattr(ops, "INTERPRET_ON_CPU", False)
    monkeypatch.setattr(ops, "NATIVE_ON_CPU", False)
    ok, why = fused_kernel_status("cpu")
    assert not ok and "plain PyTorch" in why
    assert fused_kernel_status("meta")[0] is False


# --------------------------------------------------------------------------------------------- bad inputs


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


@pytest.mark.parametrize("args, match", [
    ((_t(1, 3, 8, 8), _t(4, 3, 3, 5), None, 0), "square"),
    ((_t(1, 3, 12, 12), _t(4, 3, 9, 9), None, 0), "kernel 9x9 larger than 7x7"),
    ((_t(1, 3, 8, 8), _t(4, 3, 3, 3), None, 2), "padding"),
    ((_t(1, 3, 8, 8), _t(4, 3, 3, 3), None, -1), "negative padding -1"),
    ((_t(1, 3, 8, 8), _t(4, 3, 3, 3), None, 1.0), "padding=1.0, needs an int"),
    ((_t(1, 3, 8, 8), _t(4, 3, 3, 3), None, True), "padding=True, needs an int"),
    ((_t(1, 2, 8, 8), _t(4, 3, 3, 3), None, 0), "channels"),
    ((_t(1, 3, 8, 8, dtype=torch.float64), _t(4, 3, 3, 3, dtype=torch.float64), None, 0), "float32"),
    ((_t(1, 3, 8, 8), _t(4, 3, 3, 3, dtype=torch.float16), None, 0), "dtype"),
    ((_t(1, 3, 8, 8), _t(4, 3, 3, 3), _t(4, dtype=torch.bfloat16), 0), "dtype"),
    ((_t(1, 3, 8, 8), _t(4, 3, 3, 3), _t(5), 0), "bias"),
    ((_t(1, 3, 3, 8), _t(4, 3, 3, 3), None, 0), "at least 1x1"),
    ((_t(3, 8, 8), _t(4, 3, 3, 3), None, 0), "4-d"),
], ids=["nonsquare", "k9", "pad2k3", "negpad", "floatpad", "boolpad", "cin", "fp64", "mixed", "biasdtype",
        "biasshape", "tiny", "3d"])
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match) as raised:
        conv_relu_pool(*args)
    assert str(raised.value).startswith("conv_relu_pool: ") and "\n" not in str(raised.value)


# --------------------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("conv, reason", [
    (dict(kernel_size=3), None),
    (dict(kernel_size=(7, 7), padding=(3, 3), stride=(1, 1), dilation=[1]), None),
    (dict(kernel_size=1, padding=0), None),
    (dict(kernel_size=(3, 5)), "non-square kernel 3x5"),
    (dict(kernel_size=8), "kernel 8x8 larger than 7x7"),
    (dict(kernel_size=0), "empty kernel 0x0"),
    (dict(kernel_size=3.0), "kernel_size=3.0, needs an int"),
    (dict(kernel_size=3, stride=(1, 2)), "stride (1, 2), needs 1"),
    (dict(kernel_size=3, dilation=2), "dilation (2, 2), needs 1"),
    (dict(kernel_size=3, groups=3), "groups=3, needs 1"),
    (dict(kernel_size=3, padding="same"), "padding='same' (string padding)"),
    (dict(kernel_size=3, padding=(0, 1)), "asymmetric padding (0, 1)"),
    (dict(kernel_size=3, padding=-1), "negative padding -1"),
    (dict(kernel_size=1, padding=1), "padding 1 larger than kernel_size // 2 = 0"),
    (dict(kernel_size=4, padding=2), None),  # even kernels: padding up to k // 2 still leaves a valid output
    (dict(kernel_size=3, padding=1, padding_mode="circular"), "padding_mode='circular', needs 'zeros'"),
    (dict(kernel_size=True), "kernel_size=True, needs an int"),
], ids=lambda v: str(v))
def test_the_conv_rule_on_awkward_arguments(conv, reason):
    arguments = dict(conv)
    problem = conv_problem(arguments.pop("kernel_size"), **arguments)
    if reason is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(reason), problem


def test_one_rule_for_the_op_the_module_and_accelerate():
    # Every nn.Conv2d the rule accepts, from_conv fuses and the op computes; everything else is refused by all
    # three with the rule's own words.
    assert MAX_KERNEL_SIZE == 7
    for k in range(1, MAX_KERNEL_SIZE + 2):
        for padding in (0, k // 2, k // 2 + 1):
            conv = nn.Conv2d(2, 3, k, padding=padding)
            problem = fusion_problem(conv)
            x = torch.zeros(1, 2, 2 * k + 2, 2 * k + 2)
            assert problem == call_problem(x, conv.weight, conv.bias, padding), (k, padding)
            if problem is None:
                ConvReLUPool2d.from_conv(conv)
            else:
                with pytest.raises(ValueError, match=re.escape(problem)):
                    ConvReLUPool2d.from_conv(conv)
            assert (problem is None) == (k <= MAX_KERNEL_SIZE and padding <= k // 2)


@pytest.mark.parametrize("pool, reason", [
    (dict(kernel_size=2), None),
    (dict(kernel_size=(2, 2), stride=(2, 2)), None),
    (dict(kernel_size=2, stride=()), None),  # what nn.MaxPool2d(2) hands F.max_pool2d: the default stride
    (dict(kernel_size=2, stride=[2]), None),
    (dict(kernel_size=3), "max pool kernel_size=3, needs 2"),
    (dict(kernel_size=2, stride=1), "max pool stride=1, needs 2"),
    (dict(kernel_size=2, padding=1), "max pool padding=1, needs 0"),
    (dict(kernel_size=2, dilation=2), "max pool dilation=2, needs 1"),
    (dict(kernel_size=2, ceil_mode=True), "max pool ceil_mode=True"),
    (dict(kernel_size=2, return_indices=True), "max pool return_indices=True"),
], ids=lambda v: str(v))
def test_the_pool_rule(pool, reason):
    assert pool_problem(**pool) == reason

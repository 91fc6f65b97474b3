"""Every autotune config a GPU may pick computes the same results.

Under the interpreter each kernel has one small config (the autotuner then has nothing to benchmark), so the other
kernel tests never run the tile sizes a GPU autotunes over, whose masks and loop bounds differ; and on a GPU the
autotuner keeps whichever config is fastest, so a wrong one could hide until another GPU picks it. Here each GPU
config is pinned in turn (under the interpreter on CPU, compiled on CUDA with TRITON_INTERPRET=0) and its
launcher's results are compared with the op's plain-PyTorch branch, run in float64 on the CPU, on a shape that
leaves partial tiles along every blocked axis. The inputs are small multiples of powers of two, so every product
and sum is exact in fp32 (and TF32) in any order: fp32 results must be bitwise equal, and bf16 ones round the same
exact values once.
"""

import pytest
import torch

from fastcnn import ops

DEVICE = "cuda" if torch.cuda.is_available() and not ops.INTERPRET_ON_CPU else "cpu"
_RUNS, _WHY = ops.fused_kernel_status(DEVICE)
if not _RUNS:
    pytest.skip(f"the Triton kernels do not run here: {_WHY}", allow_module_level=True)

from fastcnn.kernels import conv_relu_pool as kernels  # noqa: E402  (after the skip: it may fail to load)


class Pinned:
    """Stands in for an autotuned kernel in ``kernel[grid](...)``: launches its function with one config."""

    def __init__(self, autotuned, config):
        self.fn, self.config = autotuned.fn, config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = dict(kwargs, **self.config.kwargs)
            return self.fn[grid(meta)](*args, **kwargs, **self.config.kwargs, num_warps=self.config.num_warps,
                                       num_stages=self.config.num_stages)

        return launch


def grid_values(shape, step, generator):
    return torch.randint(-8, 9, shape, generator=generator).float() * step


def inputs(dtype, channels_last, *, n=3, c_in=5, c_out=19, size=(13, 12), k=3, padding=1):
    # 19 output channels and 5 input channels: partial tiles for every BLOCK_CO / BLOCK_CI; N * HP * WP = 108 and
    # N * H * W = 468 pooled / input positions: partial tiles for BLOCK_P / BLOCK_Q of 64 and 128; K = 45.
    generator = torch.Generator().manual_seed(0)
    x = grid_values((n, c_in, *size), 1 / 8, generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = grid_values((c_out, c_in, k, k), 1 / 4, generator) / 8
    bias = grid_values((c_out,), 1 / 4, generator) / 8
    # The reference in float64 on the CPU: exact for these values (cuDNN could pick a rounding algorithm, such as
    # Winograd), then rounded once to the dtype, as the kernel rounds its fp32 accumulator once.
    out, code = ops._aten_forward(x.double(), weight.double(), bias.double(), padding)
    grad_out = grid_values(tuple(out.shape), 1 / 4, generator)

    def on_device(t):
        return t.to(DEVICE, dtype)

    return (on_device(x), on_device(weight), on_device(bias), padding, on_device(out), code.to(DEVICE),
            on_device(grad_out))


def reference_backward(grad_out, code, x, weight, padding, output_mask):
    """ops._aten_backward in float64 on the CPU (exact here), each result rounded once to the input's dtype."""
    grads = ops._aten_backward(grad_out.double().cpu(), code.cpu(), x.double().cpu(), weight.double().cpu(),
                               padding, output_mask)
    return [None if g is None else g.to(x.device, x.dtype) for g in grads]


def assert_equal_or_close(actual, expected, dtype, what):
    if dtype == torch.float32:
        assert torch.equal(actual, expected), f"{what}: max |diff| {(actual - expected).abs().max()}"
    else:  # bf16: the same exact values, rounded once on each side; the reference may round conv and bias apart
        scale = expected.abs().max().float().item()
        torch.testing.assert_close(actual.float(), expected.float(), rtol=1.6e-2, atol=1.6e-2 * max(scale, 1.0),
                                   msg=lambda m: f"{what}: {m}")


CASES = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)]


def config_id(config):
    return "-".join(f"{name[6:].lower()}{value}" for name, value in config.kwargs.items()) + f"-w{config.num_warps}"


@pytest.mark.parametrize("config", kernels.GPU_CONFIGS["fwd"], ids=config_id)
@pytest.mark.parametrize(("dtype", "channels_last"), CASES, ids=["fp32-nchw", "fp32-cl", "bf16-cl"])
def test_forward_config(config, dtype, channels_last):
    x, weight, bias, padding, out_ref, code_ref, _ = inputs(dtype, channels_last)
    out, code = kernels.conv_relu_pool_forward(x, weight, bias, padding,
                                               triton_kernel=Pinned(kernels.conv_relu_pool_fwd_kernel, config))
    assert_equal_or_close(out, out_ref, dtype, "output")
    if dtype == torch.float32:  # exact values: the same window wins, and ReLU passes the same ones
        assert torch.equal(code, code_ref)


@pytest.mark.parametrize("config", kernels.GPU_CONFIGS["bwd_weight"], ids=config_id)
@pytest.mark.parametrize(("dtype", "channels_last"), CASES, ids=["fp32-nchw", "fp32-cl", "bf16-cl"])
def test_backward_weight_config(config, dtype, channels_last):
    x, weight, _, padding, _, code, grad_out = inputs(dtype, channels_last)
    _, gw_ref, gb_ref = reference_backward(grad_out, code, x, weight, padding, [False, True, True])
    gw, gb = kernels.conv_relu_pool_backward_weight(
        grad_out, code, x, weight, padding, triton_kernel=Pinned(kernels.conv_relu_pool_bwd_weight_kernel, config))
    assert_equal_or_close(gw, gw_ref, dtype, "grad weight")
    assert_equal_or_close(gb, gb_ref, dtype, "grad bias")


@pytest.mark.parametrize("config", kernels.GPU_CONFIGS["bwd_input"], ids=config_id)
@pytest.mark.parametrize(("dtype", "channels_last"), CASES, ids=["fp32-nchw", "fp32-cl", "bf16-cl"])
def test_backward_input_config(config, dtype, channels_last):
    x, weight, _, padding, _, code, grad_out = inputs(dtype, channels_last)
    gx_ref = reference_backward(grad_out, code, x, weight, padding, [True, False, False])[0]
    gx = kernels.conv_relu_pool_backward_input(
        grad_out, code, x, weight, padding, triton_kernel=Pinned(kernels.conv_relu_pool_bwd_input_kernel, config))
    assert gx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_equal_or_close(gx, gx_ref, dtype, "grad input")


def test_every_kernel_autotunes_over_its_gpu_configs_except_under_the_interpreter():
    assert {name: len(configs) > 1 for name, configs in kernels.GPU_CONFIGS.items()} == {
        "fwd": True, "bwd_weight": True, "bwd_input": True}
    for name, autotuned in (("fwd", kernels.conv_relu_pool_fwd_kernel),
                            ("bwd_weight", kernels.conv_relu_pool_bwd_weight_kernel),
                            ("bwd_input", kernels.conv_relu_pool_bwd_input_kernel)):
        gpu = kernels.GPU_CONFIGS[name] if kernels._AUTOTUNE else kernels.GPU_CONFIGS[name][:1]
        assert autotuned.configs == ([kernels.INTERPRETER_CONFIGS[name]] if DEVICE == "cpu" else gpu)


def test_autotuning_can_be_turned_off_for_test_runs():
    gpu, small = kernels.GPU_CONFIGS["fwd"], kernels.INTERPRETER_CONFIGS["fwd"]
    assert kernels.autotune_configs(gpu, small, interpreted=False, autotune=True) == gpu
    assert kernels.autotune_configs(gpu, small, interpreted=False, autotune=False) == gpu[:1]  # FASTCNN_AUTOTUNE=0
    assert kernels.autotune_configs(gpu, small, interpreted=True, autotune=True) == [small]

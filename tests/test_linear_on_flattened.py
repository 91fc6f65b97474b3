"""``fastcnn.nn.linear_on_flattened`` against its reference twin ``linear(features.flatten(1))``: the same logits
and the same gradients for the features, the weight and the bias, on channels-last and NCHW features, odd shapes,
batches of 1 and 3, fp32 and bf16 autocast; and it leaves the weights (and the state_dict) as they are."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcnn.nn import linear_on_flattened

# (N, C, H, W): odd sides, one channel, one pixel, the SimpleCNN features
SHAPES = [(3, 5, 7, 3), (1, 7, 3, 5), (3, 1, 4, 6), (2, 6, 1, 1), (64, 32, 13, 13)]


def _pair(shape, seed=0):
    torch.manual_seed(seed)
    n, c, h, w = shape
    linear = nn.Linear(c * h * w, 7)
    features = torch.randn(shape)
    return linear, features


def _run(fn, linear, features, memory_format, autocast):
    linear.zero_grad(set_to_none=True)
    x = features.to(memory_format=memory_format).detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(x, linear)
    torch.manual_seed(1)
    out.float().mul(torch.randn(out.shape)).sum().backward()
    return out, x.grad, linear.weight.grad, linear.bias.grad


def _reference(x, linear):
    return linear(x.flatten(1))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["cl", "nchw"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_same_logits_and_gradients_as_flatten_then_linear(shape, memory_format, autocast):
    linear, features = _pair(shape)
    got = _run(linear_on_flattened, linear, features, memory_format, autocast)
    expected = _run(_reference, linear, features, memory_format, autocast)
    # bf16: the same products, summed in another order, each result rounded to bf16 once
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("logits", "grad_features", "grad_weight", "grad_bias"), got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")
    assert got[1].stride() == expected[1].stride()  # the features' gradient keeps their layout


def test_channels_last_features_take_no_copy_of_the_activation():
    """The permuted route reads the features through a view: the linear's input shares their storage."""
    linear, features = _pair((4, 8, 5, 5))
    features = features.to(memory_format=torch.channels_last)
    seen = {}
    hook = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        seen["input"] = x
        return hook(x, weight, bias)

    torch.nn.functional.linear = spy
    try:
        linear_on_flattened(features, linear)
    finally:
        torch.nn.functional.linear = hook
    assert seen["input"].untyped_storage().data_ptr() == features.untyped_storage().data_ptr()


def test_the_weights_and_state_dict_are_left_as_they_are():
    linear, features = _pair((3, 4, 3, 5))
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    linear_on_flattened(features.to(memory_format=torch.channels_last), linear).sum().backward()
    for key, value in linear.state_dict().items():
        assert torch.equal(value, before[key]), key
        assert value.is_contiguous()
    assert linear.weight.grad.shape == linear.weight.shape and linear.weight.grad.is_contiguous()


def test_a_hooked_lazy_or_subclassed_layer_is_called_as_itself():
    features = torch.randn(3, 4, 3, 5).to(memory_format=torch.channels_last)
    linear, _ = _pair((3, 4, 3, 5))
    seen = []
    handle = linear.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    torch.testing.assert_close(linear_on_flattened(features, linear), linear(features.flatten(1)))
    handle.remove()
    assert seen == [(3, 7), (3, 7)]  # the hook ran for linear_on_flattened's call too

    lazy = nn.LazyLinear(7)
    assert linear_on_flattened(features, lazy).shape == (3, 7)  # its weight is made by its own pre-hook

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(60, 7)
    torch.testing.assert_close(linear_on_flattened(features, doubled), 2 * F.linear(features.flatten(1),
                                                                                     doubled.weight, doubled.bias))

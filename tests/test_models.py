"""The model registry: fastcnn models and their tutorial twins share state_dicts and outputs."""

import pytest
import torch

from fastcnn.models import MODELS, build_model
from fastcnn.reference import get_num_correct


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_loads_both_ways_and_outputs_match(name):
    torch.manual_seed(0)
    fast = build_model(name)
    reference = build_model(name, reference_impl=True)
    assert fast.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-6)
    fast2 = build_model(name)
    fast2.load_state_dict(reference.state_dict())
    torch.testing.assert_close(fast2(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_channels_last_input_gives_the_same_logits(name):
    torch.manual_seed(0)
    model = build_model(name)
    x = torch.randn(4, 1, 28, 28)
    expected = model(x)
    got = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_get_num_correct():
    preds = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert get_num_correct(preds, torch.tensor([1, 0, 0])) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_then_relu_equals_relu_then_pool_bitwise_with_ties(dtype):
    """The plain path runs ReLU after the pool; values and gradients must equal the literal chain's."""
    from fastcnn.ops import conv_pool_relu, conv_relu_pool_reference

    gen = torch.Generator().manual_seed(0)
    # small integers make exact ties and exact zeros common; negative bias makes all-negative windows
    x = torch.randint(-2, 3, (3, 2, 9, 8), generator=gen).to(dtype)
    w = torch.randint(-1, 2, (5, 2, 3, 3), generator=gen).to(dtype)
    b = torch.tensor([0.0, -1.0, 1.0, -3.0, 0.0], dtype=dtype)
    x[0, :, :4, :4] = 0  # a zero region: windows where everything ties at 0 after ReLU
    outs, grads = [], []
    for fn in (conv_relu_pool_reference, conv_pool_relu):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        out = fn(xs, ws, bs, 1)
        out.backward(torch.arange(out.numel(), dtype=dtype).view_as(out) % 7 - 3)
        outs.append(out)
        grads.append((xs.grad, ws.grad, bs.grad))
    assert torch.equal(outs[0], outs[1])
    for g_ref, g_new in zip(*grads, strict=True):
        assert torch.equal(g_ref, g_new)

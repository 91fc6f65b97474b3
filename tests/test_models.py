"""The model registry: fastcnn models and their tutorial twins share state_dicts and outputs, at the tutorials'
1x28x28 / 10 classes and at any other input shape."""

import pytest
import torch

import fastcnn
from fastcnn.errors import UsageError
from fastcnn.models import MODELS, build_model
from fastcnn.ops import conv_relu_pool_aten, conv_relu_pool_reference
from fastcnn.reference import get_num_correct

# (channels, height, width, classes): the tutorials', CIFAR's, odd rectangles, each model's smallest input
SHAPES = [(1, 28, 28, 10), (3, 32, 32, 10), (3, 17, 23, 3), (1, 64, 48, 2), (3, 16, 16, 100)]


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


def test_at_28x28_the_models_are_exactly_the_tutorials():
    """The parameter shapes of the tutorials' programs (the 5408 and 192 flatten sizes), in both versions."""
    for reference in (False, True):
        simple = build_model("simplecnn", reference_impl=reference)
        assert tuple(simple.fc1.weight.shape) == (10, 32 * 13 * 13)
        assert tuple(simple.conv1.weight.shape) == (32, 1, 3, 3)
        lenet = build_model("lenet", reference_impl=reference)
        assert tuple(lenet.fc1.weight.shape) == (120, 12 * 4 * 4) and tuple(lenet.out.weight.shape) == (10, 60)
        fastnet = build_model("fastnet", reference_impl=reference)
        assert tuple(fastnet.fc1.weight.shape) == (128, 32 * 5 * 5)
        public = build_model("mnistfast", reference_impl=reference)
        assert tuple(public.fc1.weight.shape) == (256, 32 * 5 * 5) and tuple(public.conv1.weight.shape) == (24, 1, 5, 5)
    assert sum(p.numel() for p in fastcnn.reference.SimpleCNN().parameters()) == 32 * 9 + 32 + 5408 * 10 + 10


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_model_fits_any_input_shape(name, shape):
    """Forward and backward at the shape, the twin's state_dict both ways, channels-last and accelerate() give the
    same logits."""
    channels, height, width, classes = shape
    if min(height, width) < MODELS[name].smallest_input:
        pytest.skip("smaller than the model's smallest input (tested below)")
    torch.manual_seed(0)
    image_shape = (channels, height, width)
    fast = build_model(name, image_shape=image_shape, num_classes=classes, kernel="aten")
    reference = build_model(name, image_shape=image_shape, num_classes=classes, reference_impl=True)
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(3, *image_shape, requires_grad=True)
    logits = fast(x)
    assert logits.shape == (3, classes)
    torch.testing.assert_close(reference(x), logits, rtol=1e-5, atol=1e-5)
    logits.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters() if p.requires_grad)
    fast.load_state_dict(reference.state_dict())
    with torch.no_grad():
        plain = x.detach()
        expected = reference(plain)
        accelerated = fastcnn.accelerate(reference)
        torch.testing.assert_close(accelerated(plain), expected, rtol=1e-5, atol=1e-5)
        assert accelerated.state_dict().keys() == reference.state_dict().keys()
        layout = build_model(name, image_shape=image_shape, num_classes=classes, kernel="aten")
        layout.load_state_dict(fast.state_dict())
        layout = layout.to(memory_format=torch.channels_last)
        torch.testing.assert_close(layout(plain.contiguous(memory_format=torch.channels_last)), expected,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, least", [("simplecnn", 4), ("lenet", 16), ("fastnet", 12), ("mnistfast", 12),
                                         ("cifarnet", 8)])
def test_too_small_an_input_is_one_line_naming_the_smallest_size(name, least):
    assert MODELS[name].smallest_input == least
    build_model(name, image_shape=(1, least, least))(torch.rand(2, 1, least, least))  # the smallest works
    with pytest.raises(UsageError) as caught:
        build_model(name, image_shape=(3, least - 1, 40))
    message = str(caught.value)
    assert f"needs images of at least {least}x{least} pixels; these are {least - 1}x40" in message
    assert f"--image-size {least}" in message and "\n" not in message
    twin = MODELS[name].build_reference
    with pytest.raises(ValueError, match=f"at least {least}x{least}"):
        twin(image_size=(least - 1, least - 1))


def test_get_num_correct():
    preds = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert get_num_correct(preds, torch.tensor([1, 0, 0])) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_then_relu_equals_relu_then_pool_bitwise_with_ties(dtype):
    """The aten implementation runs ReLU after the pool; values and gradients must equal the literal chain's."""
    gen = torch.Generator().manual_seed(0)
    # small integers make exact ties and exact zeros common; negative bias makes all-negative windows
    x = torch.randint(-2, 3, (3, 2, 9, 8), generator=gen).to(dtype)
    w = torch.randint(-1, 2, (5, 2, 3, 3), generator=gen).to(dtype)
    b = torch.tensor([0.0, -1.0, 1.0, -3.0, 0.0], dtype=dtype)
    x[0, :, :4, :4] = 0  # a zero region: windows where everything ties at 0 after ReLU
    outs, grads = [], []
    for fn in (conv_relu_pool_reference, conv_relu_pool_aten):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        out = fn(xs, ws, bs, 1)
        out.backward(torch.arange(out.numel(), dtype=dtype).view_as(out) % 7 - 3)
        outs.append(out)
        grads.append((xs.grad, ws.grad, bs.grad))
    assert torch.equal(outs[0], outs[1])
    for g_ref, g_new in zip(*grads, strict=True):
        assert torch.equal(g_ref, g_new)

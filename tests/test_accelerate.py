"""fastcnn.accelerate: every fusable Conv2d -> ReLU -> MaxPool2d(2, 2) chain becomes one ConvReLUPool2d,
every other chain stays as written and is reported, and the result computes the same outputs and gradients
with the same parameters and state_dict as the model it came from. CPU only: kernel="auto" runs the plain
chain there."""

from __future__ import annotations

import copy
import io
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fastcnn
from fastcnn.accelerate import AccelerateReport, accelerate, accelerate_report
from fastcnn.nn import ConvReLUPool2d
from fastcnn.reference import Network, SimpleCNN


def assert_same_function(original: nn.Module, accelerated: nn.Module, x: torch.Tensor) -> None:
    """Same outputs, and the same gradients for every parameter and for the input."""
    params = list(original.parameters())
    assert [id(p) for p in accelerated.parameters()] == [id(p) for p in params], "parameters are not shared"
    results = []
    for model in (original, accelerated):
        torch.manual_seed(0)
        inp = x.clone().requires_grad_(True)
        out = model(inp)
        weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        grads = torch.autograd.grad((out * weights).sum(), [inp, *params], allow_unused=True)
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a)
    for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
        if grad_a is None:
            assert grad_b is None
        else:
            torch.testing.assert_close(grad_b, grad_a)


def assert_same_state_dict(original: nn.Module, accelerated: nn.Module) -> None:
    sd_a, sd_b = original.state_dict(), accelerated.state_dict()
    assert list(sd_b) == list(sd_a)
    for key in sd_a:
        assert torch.equal(sd_b[key], sd_a[key]), key
    accelerated.load_state_dict(original.state_dict())
    original.load_state_dict(accelerated.state_dict())


def fused_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, ConvReLUPool2d)]


# ------------------------------------------------------------------------------------ the tutorial models


def test_simple_cnn_is_fused_by_module_swap():
    torch.manual_seed(0)
    model = SimpleCNN()
    fast = accelerate(model)
    assert fused_modules(fast) == ["conv1"]
    assert [(e.module, e.reason) for e in fast.fastcnn_report.fused] == [("conv1", "module swap")]
    assert fast.fastcnn_report.skipped == [] and fast.fastcnn_report.traced
    assert type(fast) is SimpleCNN  # no generated class: the forward is untouched
    assert_same_function(model, fast, torch.randn(3, 1, 28, 28))
    assert_same_state_dict(model, fast)


def test_network_functional_chains_are_fused_by_rewriting_forward():
    torch.manual_seed(0)
    model = Network()
    fast = accelerate(model)
    assert fused_modules(fast) == ["conv1", "conv2"]
    assert {e.reason for e in fast.fastcnn_report.fused} == {"forward rewrite"}
    assert {e.pattern for e in fast.fastcnn_report.fused} == {"Conv2d -> F.relu -> F.max_pool2d"}
    assert isinstance(fast, Network) and type(model) is Network
    assert "max_pool2d" not in fast.fastcnn_code
    assert_same_function(model, fast, torch.randn(4, 1, 28, 28))
    assert_same_state_dict(model, fast)


def test_original_model_object_is_not_modified():
    model = Network()
    children = dict(model.named_children())
    x = torch.randn(2, 1, 28, 28)
    expected = model(x)
    fast = accelerate(model)
    assert fast is not model and type(model) is Network and "forward" not in vars(model)
    assert dict(model.named_children()) == children and not fused_modules(model)
    assert not hasattr(model, "fastcnn_report")
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ functional variants


class Block(nn.Module):
    """A custom submodule with its own functional chain (pool first, then an in-place ReLU)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return F.max_pool2d(self.conv(x), 2).relu_()


class FunctionalNet(nn.Module):
    """Every spelling of the chain: torch.relu, x.relu(), F.max_pool2d keywords, torch.max_pool2d
    positional, in-place ReLUs, pool-then-ReLU order, ReLU and pool modules shared by two chains, a
    Sequential, a Block."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(8, 8, 5, padding=2)
        self.c4 = nn.Conv2d(8, 8, 1)
        self.c5 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d((2, 2), stride=None)
        self.seq = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2, 2), nn.ReLU())
        self.block = Block(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.c1(x)), kernel_size=(2, 2), stride=2)
        x = self.c2(x).relu()
        x = F.max_pool2d(x, 2, 2, 0, 1, False, False)
        x = torch.relu_(torch.max_pool2d(self.c3(x), 2, 2))
        x = self.pool(self.relu(self.c4(x)))
        x = self.relu(self.pool(self.c5(x)))
        x = self.block(self.seq(x))
        return self.head(x.mean((2, 3)))


def test_functional_spellings_and_pool_then_relu_are_fused():
    torch.manual_seed(0)
    model = FunctionalNet()
    fast = accelerate(model)
    report = fast.fastcnn_report
    assert sorted(fused_modules(fast)) == ["block.conv", "c1", "c2", "c3", "c4", "c5", "seq.0"]
    assert report.skipped == [] and len(report.fused) == 7
    how = {e.module: e.reason for e in report.fused}
    assert how["seq.0"] == "module swap" and how["block.conv"] == "forward rewrite"
    assert how["c4"] == how["c5"] == "forward rewrite"  # self.relu / self.pool serve two chains
    assert {e.pattern for e in report.fused} >= {"Conv2d -> torch.relu -> F.max_pool2d",
                                                 "Conv2d -> Tensor.relu -> F.max_pool2d",
                                                 "Conv2d -> torch.max_pool2d -> torch.relu_",
                                                 "Conv2d -> MaxPool2d -> ReLU",
                                                 "Conv2d -> F.max_pool2d -> Tensor.relu_"}
    assert_same_function(model, fast, torch.randn(2, 3, 128, 128))
    assert_same_state_dict(model, fast)
    # Every rewritten module is consistent on its own, not only through the root's forward.
    block_in = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(fast.block(block_in), model.block(block_in))
    torch.testing.assert_close(fast.seq(block_in), model.seq(block_in))


def test_sequential_with_shared_relu_and_pool_objects_uses_slots():
    relu, pool = nn.ReLU(), nn.MaxPool2d(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), relu, pool, nn.Conv2d(4, 4, 3), relu, pool, nn.Flatten())
    fast = accelerate(model)
    assert [(e.module, e.reason) for e in fast.fastcnn_report.fused] == [("0", "sequential slots"),
                                                                         ("3", "sequential slots")]
    assert [type(m).__name__ for m in fast] == ["ConvReLUPool2d", "Identity", "Identity"] * 2 + ["Flatten"]
    assert_same_function(model, fast, torch.randn(2, 1, 16, 16))
    assert_same_state_dict(model, fast)


# ------------------------------------------------------------------------------------ what is not fused


class OneChain(nn.Module):
    """A conv followed by ``tail(self, conv_output)``; extra modules are registered for the tail to use."""

    def __init__(self, conv: nn.Conv2d, tail, **modules: nn.Module):
        super().__init__()
        self.conv = conv
        for name, module in modules.items():
            self.add_module(name, module)
        self.tail = tail

    def forward(self, x):
        return self.tail(self, self.conv(x))


def _hooked_conv():
    conv = nn.Conv2d(2, 4, 3)
    conv.register_forward_hook(lambda module, args, out: None)
    return conv


def _relu_pool(m, y):
    return F.max_pool2d(F.relu(y), 2)


def _relu_used_twice(m, y):
    r = F.relu(y)
    return F.max_pool2d(r, 2).sum() + r.sum()


UNFUSABLE = {  # case: (model factory, words the report must give as the reason)
    "dilation": (lambda: OneChain(nn.Conv2d(2, 4, 3, dilation=2), _relu_pool), "dilation (2, 2)"),
    "groups": (lambda: OneChain(nn.Conv2d(2, 4, 3, groups=2), _relu_pool), "groups=2"),
    "stride": (lambda: OneChain(nn.Conv2d(2, 4, 3, stride=2), _relu_pool), "stride (2, 2)"),
    "non-square kernel": (lambda: OneChain(nn.Conv2d(2, 4, (3, 5)), _relu_pool), "non-square kernel 3x5"),
    "kernel > 7": (lambda: OneChain(nn.Conv2d(2, 4, 9), _relu_pool), "larger than 7x7"),
    "padding > k//2": (lambda: OneChain(nn.Conv2d(2, 4, 3, padding=2), _relu_pool),
                       "padding 2 larger than kernel_size // 2"),
    "padding_mode": (lambda: OneChain(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), _relu_pool),
                     "padding_mode='reflect'"),
    "conv hook": (lambda: OneChain(_hooked_conv(), _relu_pool), "hooks"),
    "avg pool module": (lambda: OneChain(nn.Conv2d(2, 4, 3), lambda m, y: m.pool(m.relu(y)), relu=nn.ReLU(),
                                         pool=nn.AvgPool2d(2)), "AvgPool2d is not a 2x2 max pool"),
    "avg pool function": (lambda: OneChain(nn.Conv2d(2, 4, 3), lambda m, y: F.avg_pool2d(F.relu(y), 2)),
                          "avg_pool2d is not a 2x2 max pool"),
    "pool of size 3": (lambda: OneChain(nn.Conv2d(2, 4, 3), lambda m, y: m.pool(F.relu(y)),
                                        pool=nn.MaxPool2d(3)), "kernel_size=3"),
    "pool stride 1": (lambda: OneChain(nn.Conv2d(2, 4, 3), lambda m, y: F.max_pool2d(F.relu(y), 2, stride=1)),
                      "stride=1"),
    "pool padding": (lambda: OneChain(nn.Conv2d(2, 4, 3), lambda m, y: F.max_pool2d(F.relu(y), 2, padding=1)),
                     "padding=1"),
    "ceil_mode": (lambda: OneChain(nn.Conv2d(2, 4, 3), lambda m, y: m.pool(y).relu(),
                                   pool=nn.MaxPool2d(2, ceil_mode=True)), "ceil_mode=True"),
    "relu without pool": (lambda: OneChain(nn.Conv2d(2, 4, 3), lambda m, y: F.relu(y) * 2),
                          "not to a 2x2 max pool"),
    "conv output used elsewhere": (lambda: OneChain(nn.Conv2d(2, 4, 3),
                                                    lambda m, y: _relu_pool(m, y).sum() + y.sum()),
                                   "Conv2d output is also used by"),
    "relu output used elsewhere": (lambda: OneChain(nn.Conv2d(2, 4, 3), _relu_used_twice),
                                   "F.relu output is also used by"),
    "conv called twice": (lambda: OneChain(nn.Conv2d(4, 4, 3, padding=1),
                                           lambda m, y: _relu_pool(m, m.conv(y))),
                          "conv module is called from 2 places"),
}


def test_every_unfusable_chain_is_reported_and_left_as_written():
    for case, (build, reason) in UNFUSABLE.items():
        torch.manual_seed(0)
        model = build()
        fast = accelerate(model)
        report = fast.fastcnn_report
        assert report.fused == [] and not fused_modules(fast), case
        assert report.skipped, case
        assert all(e.module == "conv" for e in report.skipped), case
        assert any(reason in e.reason for e in report.skipped), (case, report.skipped)
        assert reason in str(report), case
        channels = model.conv.in_channels
        assert_same_function(model, fast, torch.randn(2, channels, 12, 12))
        assert_same_state_dict(model, fast)


def test_forward_reading_self_training_is_not_rewritten():
    class TrainingDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv(x)), 2)
            return x * 2 if self.training else x

    model = TrainingDependent()
    fast = accelerate(model)
    assert "self.training" in fast.fastcnn_report.skipped[0].reason
    x = torch.randn(1, 1, 10, 10)
    for mode in (True, False):
        model.train(mode)
        fast.train(mode)
        torch.testing.assert_close(fast(x), model(x))


def test_sequential_iterated_by_the_parent_counts_as_a_second_caller():
    class Iterates(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2))

        def forward(self, x):
            for layer in self.features:
                x = layer(x)
            return x

    model = Iterates()
    fast = accelerate(model)
    assert fast.fastcnn_report.fused == []
    assert all("called from 2 places" in e.reason for e in fast.fastcnn_report.skipped)
    assert_same_function(model, fast, torch.randn(2, 1, 10, 10))


# ------------------------------------------------------------------------------------ fallback


class DataDependent(nn.Module):
    """fx cannot trace this forward (a branch on a tensor value): only Sequential items are fused."""

    def __init__(self):
        super().__init__()
        relu = nn.ReLU(inplace=True)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), relu, nn.MaxPool2d(2),
                                      nn.Conv2d(4, 8, 3, padding=1), nn.MaxPool2d(2), relu)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 3 * 3, 3)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:
            x = F.max_pool2d(F.relu(self.conv(x)), 2)
        else:
            x = F.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


def test_untraceable_model_falls_back_to_sequential_rewriting():
    torch.manual_seed(0)
    model = DataDependent()
    fast = accelerate(model)
    report = fast.fastcnn_report
    assert not report.traced
    [failure] = report.trace_failures
    assert failure.module == "" and failure.class_name == "DataDependent" and "control flow" in failure.reason
    assert "tracing failed for <root> (DataDependent)" in str(report) and "\n" not in failure.reason
    assert sorted(fused_modules(fast)) == ["features.0", "features.3"]
    assert {e.reason for e in report.fused} == {"sequential slots"}
    for sign in (1.0, -1.0):  # both branches
        x = sign * torch.rand(2, 1, 30, 30)
        assert_same_function(model, fast, x)
    assert_same_state_dict(model, fast)


# ------------------------------------------------------------------------------------ module behaviour


def test_result_behaves_like_a_module_sharing_the_original_weights():
    torch.manual_seed(0)
    model = Network()
    fast = fastcnn.accelerate(model)
    fast.eval()
    assert not fast.training and not fast.conv1.training and model.training  # modes are per tree
    fast.train()
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.1)  # built after accelerate
    before = model.conv1.weight.detach().clone()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    F.cross_entropy(fast(x), y).backward()
    optimizer.step()
    assert not torch.equal(model.conv1.weight, before)  # one set of weights: the original trained too
    fast.to(torch.float64)
    assert model.conv1.weight.dtype == torch.float64
    torch.testing.assert_close(fast(x.double()), model(x.double()))


def test_channels_last_fuse_false_and_kernel_option():
    torch.manual_seed(0)
    model = SimpleCNN()
    x = torch.randn(2, 1, 28, 28)
    expected = model(x)
    fast = accelerate(model, channels_last=True, kernel="aten")
    assert fast.conv1.kernel == "aten" and fast.fastcnn_report.kernel == "aten"
    assert "kernel='aten'" in str(fast.fastcnn_report)
    old_name = accelerate(SimpleCNN(), kernel="torch")  # the old name of aten, still taken and reported as aten
    assert old_name.conv1.kernel == "aten" and old_name.fastcnn_report.kernel == "aten"
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x.to(memory_format=torch.channels_last)), expected)
    plain = accelerate(SimpleCNN(), fuse=False)
    assert not fused_modules(plain) and plain.fastcnn_report.fused == [] and not plain.fastcnn_report.fuse
    assert "fuse=False" in str(plain.fastcnn_report)
    with pytest.raises(ValueError, match="unknown kernel 'cuda'"):
        accelerate(SimpleCNN(), kernel="cuda")


def test_rewritten_model_survives_deepcopy_and_torch_save():
    torch.manual_seed(0)
    model = Network()
    fast = accelerate(model)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(fast), torch.load(buffer, weights_only=False)):
        assert isinstance(copied, Network) and fused_modules(copied) == ["conv1", "conv2"]
        assert copied.conv1.weight is not model.conv1.weight  # a real copy this time
        assert "max_pool2d" not in copied.fastcnn_code
        assert_same_state_dict(model, copied)
        x = torch.randn(2, 1, 28, 28)
        torch.testing.assert_close(copied(x), model(x))


def test_triton_kernel_on_one_tiny_input():
    # Under TRITON_INTERPRET=1 (conftest) this runs the fused op's real kernel code, so the input stays tiny.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    fast = accelerate(model, kernel="triton")  # the old name of fused
    assert fast[0].kernel == "fused" and fast.fastcnn_report.kernel == "fused"
    x = torch.randn(1, 1, 6, 6, requires_grad=True)
    out, expected = fast(x), model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (grad_expected,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-4, atol=1e-5)


def test_accelerating_twice_changes_nothing_more():
    torch.manual_seed(0)
    model = Network()
    once = accelerate(model)
    twice = accelerate(once)
    assert twice.fastcnn_report.fused == [] and twice.fastcnn_report.skipped == []
    assert fused_modules(twice) == ["conv1", "conv2"]
    assert_same_function(model, twice, torch.randn(2, 1, 28, 28))


def test_report_is_reachable_printed_and_exported(capsys):
    fast = fastcnn.accelerate(Network(), verbose=True)
    printed = capsys.readouterr().out
    assert "2 chain(s) fused, 0 skipped" in printed and "conv2" in printed
    assert printed == str(fast.fastcnn_report) + "\n"  # verbose prints the report once, and nothing else
    assert isinstance(accelerate_report(fast), AccelerateReport)
    assert accelerate_report(fast) is fast.fastcnn_report
    assert capsys.readouterr().out == ""  # reading the report back prints nothing: printing it is the user's call
    print(accelerate_report(fast))
    assert capsys.readouterr().out == printed
    assert fastcnn.accelerate(SimpleCNN()).fastcnn_report.fused
    assert capsys.readouterr().out == ""  # not verbose: silent
    with pytest.raises(ValueError, match=r"Network was not returned by fastcnn\.accelerate\(\)"):
        accelerate_report(Network())


def test_compile_on_cpu_matches_eager():
    torch.manual_seed(0)
    model = SimpleCNN()
    fast = accelerate(model, compile=True)
    assert accelerate_report(fast).compiled and fused_modules(fast) == ["conv1"]
    assert list(fast.state_dict()) == list(model.state_dict())  # no _orig_mod. prefix
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_the_function_and_the_package_share_the_name_fastcnn_accelerate():
    # fastcnn.accelerate is the function once fastcnn is imported; the package of the same name still imports.
    from fastcnn.accelerate import accelerate as from_the_package
    from fastcnn.accelerate import match, report, rewrite

    assert fastcnn.accelerate is from_the_package is accelerate and callable(fastcnn.accelerate)
    assert sys.modules["fastcnn.accelerate"].accelerate is accelerate
    assert (match.__name__, report.__name__, rewrite.__name__) == (
        "fastcnn.accelerate.match", "fastcnn.accelerate.report", "fastcnn.accelerate.rewrite")
    assert fused_modules(fastcnn.accelerate(SimpleCNN())) == fused_modules(from_the_package(SimpleCNN())) == ["conv1"]


def test_a_pickle_from_before_the_package_split_still_loads():
    # Such pickles name the loader of a rewritten class fastcnn.accelerate._new_rewritten (protocol 2 writes the
    # name as text, so an old one can be made from a new one).
    torch.manual_seed(0)
    model = Network()
    fast = accelerate(model)
    data = pickle.dumps(fast, protocol=2)
    assert b"fastcnn.accelerate.rewrite\n_new_rewritten" in data
    old = data.replace(b"fastcnn.accelerate.rewrite\n_new_rewritten", b"fastcnn.accelerate\n_new_rewritten")
    loaded = pickle.loads(old)
    assert fused_modules(loaded) == ["conv1", "conv2"] and "max_pool2d" not in loaded.fastcnn_code
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x))


# ------------------------------------------------------------------------------------ property


@settings(max_examples=25, deadline=None)
@given(kernel=st.integers(1, 9), padding=st.integers(0, 5), stride=st.sampled_from([1, 1, 2]),
       bias=st.booleans(), pool_first=st.booleans(), relu_style=st.sampled_from(["module", "F", "method_"]),
       pool_style=st.sampled_from(["module", "F", "torch"]), size=st.integers(20, 23))
def test_fused_exactly_when_fusable_and_always_equal(kernel, padding, stride, bias, pool_first, relu_style,
                                                     pool_style, size):
    relu = {"module": lambda m, t: m.relu(t), "F": lambda m, t: F.relu(t), "method_": lambda m, t: t.relu_()}
    pool = {"module": lambda m, t: m.pool(t), "F": lambda m, t: F.max_pool2d(t, kernel_size=2),
            "torch": lambda m, t: torch.max_pool2d(t, (2, 2), 2)}
    r, p = relu[relu_style], pool[pool_style]
    tail = (lambda m, y: r(m, p(m, y))) if pool_first else (lambda m, y: p(m, r(m, y)))
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding, bias=bias)
    model = OneChain(conv, tail, relu=nn.ReLU(), pool=nn.MaxPool2d(2))
    fast = accelerate(model)
    fusable = kernel <= 7 and padding <= kernel // 2 and stride == 1
    assert len(fast.fastcnn_report.fused) == int(fusable)
    assert len(fast.fastcnn_report.skipped) == int(not fusable)
    assert_same_function(model, fast, torch.randn(2, 2, size, size))
    assert_same_state_dict(model, fast)

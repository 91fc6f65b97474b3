"""``kernel="auto"`` decided by measurement: per layer call shape, on the device that runs it.

Whether the fused kernel (``fused``) beats PyTorch's conv + max-pool + ReLU (``aten``: cuDNN's convolution on a
GPU) depends on the layer's shape, the batch size, the dtype, the layout, whether the input needs a gradient, and
the GPU. A table written on one GPU would be wrong on another, so ``choose_kernels`` times both implementations of
every ``ConvReLUPool2d`` call that a model makes on example batches, forward and backward as training runs them
(forward alone for evaluation), on the caller's own device, and tells each module which one to use for that call
shape. Calls of a shape that was never measured keep ``auto``'s default (``resolve_kernel``). The measurements are
reported, so a user sees what was chosen and by how much.

The trainer runs this during warm-up, off the clock, before torch.compile traces the model (a module's choices
are plain Python state, so a compiled forward specializes on them). With ``compile=True`` the aten chain is
compiled before it is timed, because Inductor fuses its ReLU and pool, which changes the contest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch._dynamo.config as dynamo_config
from torch import nn

from fastcnn.env import device_name, package_version
from fastcnn.kernels.layout import is_channels_last
from fastcnn.ops import conv_relu_pool, conv_relu_pool_aten, fused_kernel_status, native_runs_on_cpu
from fastcnn.vocabulary import canonical_kernel

# The two contestants, by the names that kernel= takes.
CANDIDATES = {"fused": conv_relu_pool, "aten": conv_relu_pool_aten}


class CallKey(NamedTuple):
    """What makes two calls of one layer the same contest: input shape and layout, compute dtype, and whether a
    backward pass follows (and must produce the input's gradient). A tuple, so that a compiled forward can look
    it up."""

    shape: tuple[int, ...]
    channels_last: bool
    dtype: torch.dtype
    training: bool
    input_grad: bool

    @classmethod
    def of(cls, x: torch.Tensor, weight: torch.Tensor) -> CallKey:
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):  # the op computes in the autocast dtype, as conv2d would
            dtype = torch.get_autocast_dtype(x.device.type)
        training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        return cls(tuple(x.shape), is_channels_last(x), dtype, training, training and x.requires_grad)

    def describe(self) -> str:
        layout = "channels-last" if self.channels_last else "NCHW"
        mode = ("fwd+bwd" if self.input_grad else "fwd+bwd, no input grad") if self.training else "fwd"
        return f"{'x'.join(map(str, self.shape))} {str(self.dtype).removeprefix('torch.')} {layout} {mode}"


@torch.compiler.assume_constant_result
def _fused_available(device_type: str, index: int) -> bool:
    # Asked from forward: under torch.compile the answer is computed once while tracing, never in the graph.
    device = torch.device(device_type) if index < 0 else torch.device(device_type, index)
    return fused_kernel_status(device)[0]


@torch.compiler.assume_constant_result
def _native_available() -> bool:
    return native_runs_on_cpu()


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The implementation a ``kernel`` choice means on ``device``: ``"fused"`` or ``"aten"``.

    ``"fused"`` and ``"aten"`` (or their old names ``"triton"`` and ``"torch"``) mean themselves. ``"fused"`` is the
    fused op whatever runs it: Triton kernels on CUDA; on a CPU the native kernel
    (``fastcnn.kernels.conv_relu_pool_cpu``), or the Triton interpreter when TRITON_INTERPRET=1 was set before
    import, or the op's plain-PyTorch branch when neither is there. ``"auto"`` picks the fused op on CUDA when its
    kernels can run there and on a CPU when the native kernel runs there; otherwise aten: the interpreter is for
    tests, never for training a model. This is ``auto``'s default, for call shapes that ``choose_kernels`` has not
    measured; a measured shape takes the measured winner (``ChoosableLayer.implementation``).
    """
    kernel = canonical_kernel(kernel)
    if kernel != "auto":
        return kernel
    if device.type == "cpu":
        return "fused" if _native_available() else "aten"
    if device.type != "cuda":
        return "aten"
    if not _fused_available(device.type, -1 if device.index is None else device.index):
        return "aten"
    return "fused"


class ChoosableLayer:
    """A layer whose implementation ``choose_kernels`` chooses per call shape; ``fastcnn.nn.ConvReLUPool2d`` mixes
    it in. Such a layer has a ``weight``, a ``kernel`` (``"auto"``, ``"fused"`` or ``"aten"``) and
    ``kernel_choices`` (CallKey -> ``"fused"`` | ``"aten"``), which ``choose_kernels`` fills and which counts only
    when ``kernel`` is ``"auto"``."""

    kernel: str
    kernel_choices: dict[CallKey, str]
    weight: torch.Tensor

    def implementation(self, x: torch.Tensor) -> str:
        """``"fused"`` or ``"aten"``: what forward runs for this input."""
        if self.kernel == "auto" and self.kernel_choices:
            measured = self.kernel_choices.get(CallKey.of(x, self.weight))
            if measured is not None:
                return measured
        return resolve_kernel(self.kernel, x.device)


@dataclasses.dataclass(frozen=True)
class KernelTiming:
    """One measured contest: milliseconds per call of each implementation and the one chosen. ``origin`` says
    where the measurement was made: ``measured`` in this run, or read back from a ``checkpoint``."""

    layer: str
    key: CallKey
    fused_ms: float
    aten_ms: float
    origin: str = "measured"

    @property
    def torch_ms(self) -> float:
        """``aten_ms`` by its old name, kept for importers outside this module until they move."""
        return self.aten_ms

    @property
    def choice(self) -> str:
        """``"fused"`` or ``"aten"``: the faster one (the fused kernel on a tie)."""
        return "fused" if self.fused_ms <= self.aten_ms else "aten"

    @property
    def speedup(self) -> float:
        """How much faster the chosen implementation is than the other one."""
        return max(self.fused_ms, self.aten_ms) / max(min(self.fused_ms, self.aten_ms), 1e-12)

    def to_dict(self) -> dict:
        # torch_ms repeats aten_ms under its old key, kept for readers outside this module until they move
        return dict(layer=self.layer, call=self.key.describe(), fused_ms=round(self.fused_ms, 5),
                    aten_ms=round(self.aten_ms, 5), torch_ms=round(self.aten_ms, 5), choice=self.choice,
                    origin=self.origin)

    def to_state(self) -> dict:
        """Plain values only, so that a checkpoint holding it still loads with ``weights_only=True``."""
        return dict(layer=self.layer, shape=list(self.key.shape), channels_last=self.key.channels_last,
                    dtype=str(self.key.dtype).removeprefix("torch."), training=self.key.training,
                    input_grad=self.key.input_grad, fused_ms=self.fused_ms, aten_ms=self.aten_ms)

    @classmethod
    def from_state(cls, state: dict) -> KernelTiming:
        """Back from ``to_state``; also a checkpoint written before the aten name (``torch_ms``)."""
        key = CallKey(tuple(state["shape"]), bool(state["channels_last"]), getattr(torch, state["dtype"]),
                      bool(state["training"]), bool(state["input_grad"]))
        aten_ms = state["aten_ms"] if "aten_ms" in state else state["torch_ms"]
        return cls(state["layer"], key, float(state["fused_ms"]), float(aten_ms), origin="checkpoint")

    def describe(self) -> str:
        loser = "aten" if self.choice == "fused" else "fused"
        return (f"{self.layer} [{self.key.describe()}]: {self.choice} {min(self.fused_ms, self.aten_ms):.4f} ms vs "
                f"{loser} {max(self.fused_ms, self.aten_ms):.4f} ms")


Timer = Callable[[Callable[[], object], torch.device], float]


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds per call of ``fn``: CUDA events via triton.testing.do_bench (which also flushes the L2
    cache between calls) on a GPU, the host clock elsewhere. Warm-up calls are not counted."""
    if device.type == "cuda":
        import triton.testing  # triton is optional (absent where it has no wheel); only GPU timing needs it

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    for _ in range(2):
        fn()
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def time_pair_ms(fused: Callable[[], object], aten: Callable[[], object], rounds: int = 7) -> tuple[float, float]:
    """Median milliseconds per call of the two contestants on a CPU, timed in alternation (fused, aten, then aten,
    fused, ...), warm-up calls not counted. Timed one after the other, a burst of a shared machine's drift lands on
    one contestant only: on the 2-core VM that once made ``auto`` take aten at 1.53 vs 1.14 ms, where fused is the
    faster (0.77-1.20 vs 1.17-1.43 ms in the other runs)."""
    for _ in range(2):
        fused()
        aten()
    samples: dict[str, list[float]] = {"fused": [], "aten": []}
    for round_ in range(rounds):
        for name, fn in ((("fused", fused), ("aten", aten)) if round_ % 2 == 0 else (("aten", aten), ("fused", fused))):
            started = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples["fused"]), statistics.median(samples["aten"])


def measure_pair(fused: Callable[[], object], aten: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """The two contestants' milliseconds per call on ``device``: each with ``time_ms`` on a GPU (CUDA events), in
    alternation with ``time_pair_ms`` on the host clock."""
    if device.type == "cuda":
        return time_ms(fused, device), time_ms(aten, device)
    return time_pair_ms(fused, aten)


def _contestants(module: nn.Conv2d, key: CallKey, device: torch.device, compile: bool):
    """For each candidate, a closure that runs one call shaped like ``key`` (and its backward when training)."""
    fmt = torch.channels_last if key.channels_last else torch.contiguous_format
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(key.shape, generator=generator).to(device=device, dtype=_input_dtype(module, key))
    # .to, not .contiguous: on one channel, contiguous(memory_format=channels_last) keeps NCHW strides (they
    # qualify for both), so the contest would time the layout the call does not have.
    x = x.to(memory_format=fmt).requires_grad_(key.input_grad)
    weight = module.weight.detach().clone().requires_grad_(key.training)
    bias = None if module.bias is None else module.bias.detach().clone().requires_grad_(key.training)
    padding = module.padding[0]
    leaves = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    autocast = (torch.autocast(device.type, dtype=key.dtype) if key.dtype != weight.dtype
                else contextlib.nullcontext())
    runs = {}
    for name, op in CANDIDATES.items():
        # Compiling changes only the aten chain (Inductor fuses its ReLU and pool); the fused op is one custom op
        # whose Triton kernels run the same compiled or not, so it is timed eagerly and costs no compile time.
        op = torch.compile(op, dynamic=False) if compile and name == "aten" else op
        with autocast, torch.set_grad_enabled(key.training):
            grad_out = torch.randn_like(op(x, weight, bias, padding)) if key.training else None

        def run(op=op, grad_out=grad_out):
            with autocast, torch.set_grad_enabled(key.training):
                out = op(x, weight, bias, padding)
            if grad_out is not None:
                for leaf in leaves:
                    leaf.grad = None
                out.backward(grad_out)

        runs[name] = run
    return runs


def _input_dtype(module: nn.Conv2d, key: CallKey) -> torch.dtype:
    # Under autocast the input may arrive in the parameters' dtype (a first layer fed fp32 images) and be cast by
    # the op; timing it in the compute dtype measures the same kernels, and the cast costs both sides alike.
    return key.dtype if key.dtype in (torch.float16, torch.bfloat16) else module.weight.dtype


# Tests set it to True to let the Triton interpreter on a CPU take part in contests as a GPU's kernels would (a
# switch read at each call, so that every module that imported fused_is_an_option sees it).
CONTEST_ON_INTERPRETER: bool = False


def fused_is_an_option(device: torch.device) -> bool:
    """Whether ``auto`` may pick the fused kernel on ``device``: on CUDA where its Triton kernels run, on a CPU
    where the native kernel runs. Never where only the Triton interpreter could run it, unless tests ask for it
    (``CONTEST_ON_INTERPRETER``)."""
    if CONTEST_ON_INTERPRETER and device.type == "cpu" and fused_kernel_status(device)[0]:
        return True
    return resolve_kernel("auto", device) == "fused"


def _auto_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, ChoosableLayer) and module.kernel == "auto"}


def record_calls(model: nn.Module, run: Callable[[], object]) -> list[tuple[str, nn.Module, CallKey]]:
    """The distinct (layer, call shape) pairs of the model's ``kernel="auto"`` layers (ConvReLUPool2d) seen while
    ``run()`` runs the model, in call order."""
    seen: dict[tuple[str, CallKey], nn.Module] = {}
    handles = []
    for name, module in _auto_layers(model).items():
        def hook(mod, args, name=name):
            seen.setdefault((name, CallKey.of(args[0], mod.weight)), mod)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return [(name, module, key) for (name, key), module in seen.items()]


def choose_kernels(model: nn.Module, train_batches: Iterable[torch.Tensor] = (),
                   eval_batches: Iterable[torch.Tensor] = (), *, autocast: Callable[[], object] | None = None,
                   compile: bool = False, timer: Timer | None = None,
                   known: Iterable[KernelTiming] = ()) -> list[KernelTiming]:
    """Measure and set, for each ``kernel="auto"`` ConvReLUPool2d in ``model``, the faster implementation of
    every call it makes on ``train_batches`` (forward and backward) and ``eval_batches`` (forward, no grad).

    ``autocast``: a context-manager factory (the trainer's), so that calls are measured in the dtype training
    uses; an autocast for another device type than the batches' is a ValueError (it would measure nothing in
    that dtype). ``compile``: time the aten chain torch.compile'd (use it when the model will be compiled). ``timer``:
    milliseconds per call of a closure (by default ``measure_pair``: ``time_ms`` on a GPU; on a CPU the two
    contestants timed in alternation). ``known``: earlier measurements (a resumed
    run's, on the same GPU); calls they cover are not measured again, so a resumed run keeps its kernels even
    where two timings are close. Returns the measurements, also kept in each module's ``kernel_choices``.
    Nothing is measured where ``auto`` never picks the fused kernel (a CPU without the native kernel): it means
    aten there anyway. Model parameters and their gradients are left untouched: the contests run on copies.
    """
    autocast = autocast or contextlib.nullcontext
    train_batches, eval_batches = list(train_batches), list(eval_batches)
    first = (train_batches or eval_batches or [None])[0]
    if first is None:
        return []
    _check_autocast_device(autocast, first.device)
    if not fused_is_an_option(first.device):
        return []

    def measure(runs: dict) -> tuple[float, float]:
        if timer is None:
            return measure_pair(runs["fused"], runs["aten"], first.device)
        return timer(runs["fused"], first.device), timer(runs["aten"], first.device)

    def run_model():
        was_training = model.training
        try:
            model.train()
            for images in train_batches:
                with autocast(), torch.enable_grad():
                    model(images)  # builds the graph and drops it: no backward, no gradient touched
            model.eval()
            for images in eval_batches:
                with autocast(), torch.no_grad():
                    model(images)
        finally:
            model.train(was_training)

    known_by_call = {(timing.layer, timing.key): timing for timing in known}
    timings = []
    with _room_for_recompiles(compile):
        for name, module, key in record_calls(model, run_model):
            timing = known_by_call.get((name, key))
            if timing is None:
                runs = _contestants(module, key, first.device, compile)
                fused_ms, aten_ms = measure(runs)
                timing = KernelTiming(name, key, fused_ms=fused_ms, aten_ms=aten_ms)
            module.kernel_choices[key] = timing.choice
            timings.append(timing)
    return timings


def _check_autocast_device(autocast: Callable[[], object], device: torch.device) -> None:
    """ValueError when ``autocast()`` is a ``torch.autocast`` for another device type than ``device``'s: on those
    batches it would cast nothing, so the contests would be timed in another dtype than the one asked for."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.autocast("cuda") on a machine without CUDA warns that it is off
        context = autocast()
    if isinstance(context, torch.autocast) and context.device != device.type:
        raise ValueError(f"choose_kernels got an autocast for {context.device} but batches on {device.type}: pass "
                         f"autocast=lambda: torch.autocast({device.type!r}, dtype=...), or batches on "
                         f"{context.device}")


def apply_choices(model: nn.Module, timings: Iterable[KernelTiming]) -> None:
    """Make ``model``'s ``kernel="auto"`` layers use the winners of ``timings`` (measured elsewhere: by rank 0
    of a data-parallel run), and nothing else: earlier choices of those layers are dropped."""
    modules = _auto_layers(model)
    for module in modules.values():
        module.kernel_choices.clear()
    for timing in timings:
        if timing.layer in modules:
            modules[timing.layer].kernel_choices[timing.key] = timing.choice


def measured_where(device: torch.device) -> str:
    """What a measurement holds for: the device's name and the software that made both contestants' kernels (an
    upgrade of any of them can change the winner)."""
    cudnn = torch.backends.cudnn.version() if device.type == "cuda" else None
    triton = package_version("triton", "pytorch-triton")
    return f"{device_name(device)} | torch {torch.__version__} | triton {triton} | cudnn {cudnn}"


def choices_to_state(timings: Iterable[KernelTiming], where: str) -> dict:
    """The choices of a run, for its checkpoint; ``where``: ``measured_where`` of the device that measured them."""
    return dict(measured_where=where, calls=[timing.to_state() for timing in timings])


def choices_from_state(state: dict | None, where: str) -> list[KernelTiming]:
    """A checkpoint's choices when they were measured on the same GPU with the same software, else none (measure
    again)."""
    if not state or state.get("measured_where") != where:
        return []
    return [KernelTiming.from_state(call) for call in state.get("calls", [])]


def _room_for_recompiles(compile: bool):
    """Every compiled contestant is the same function at another shape, i.e. a recompile of one code object;
    past dynamo's limit (8) it would silently run eagerly and the contest would time the wrong thing."""
    if not compile:
        return contextlib.nullcontext()
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    return dynamo_config.patch(**{name: max(getattr(dynamo_config, name), 1024)})

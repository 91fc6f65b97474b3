"""``kernel="auto"`` by measurement (fastcnn.kernel_choice). On a GPU the contest is the fused Triton kernel
against cuDNN; here (CPU) the fused side runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1),
which is enough to test that calls are recorded, timed on copies, chosen per call shape, and used by forward."""

import itertools
import warnings

import pytest
import torch
from fused_blocks import TwoBlocks

from fastcnn import choose_kernels, conv_relu_pool_reference, kernel_choice, ops
from fastcnn.engine import Trainer
from fastcnn.kernel_choice import CallKey, KernelTiming

# One input channel: the calls of block1 are then channels-last by their strides alone (see the autocast test).
GRAY = (1, 3, 2)


@pytest.fixture
def measurable_on_cpu(monkeypatch):
    """Let the CPU (the Triton interpreter) take part in the contest, as a GPU would."""
    if not ops.INTERPRET_ON_CPU:
        pytest.skip("needs TRITON_INTERPRET=1 before import (tests/conftest.py sets it)")
    monkeypatch.setattr(kernel_choice, "CONTEST_ON_INTERPRETER", True)


def scripted_timer(fused_wins):
    """A timer that declares the fused kernel faster for the contests whose index is in ``fused_wins``. The
    contests come in call order, fused first, then aten; each closure is run once, so that a broken
    contestant fails the test."""
    counter = itertools.count()

    def timer(fn, device):
        fn()
        index = next(counter)
        contest, is_plain = divmod(index, 2)
        fused_faster = contest in fused_wins
        return 1.0 if (is_plain != fused_faster) else 2.0

    return timer


def scripted_pair(fused_wins):
    """``scripted_timer`` in the shape of ``kernel_choice.measure_pair`` (what choose_kernels times with by default)."""
    timer = scripted_timer(fused_wins)
    return lambda fused, aten, device: (timer(fused, device), timer(aten, device))


def test_each_call_shape_gets_the_measured_winner_and_forward_uses_it(measurable_on_cpu):
    torch.manual_seed(0)
    model = TwoBlocks(channels=GRAY)
    train, evaluation = torch.randn(4, 1, 9, 9), torch.randn(3, 1, 9, 9)
    timings = choose_kernels(model, [train], [evaluation], timer=scripted_timer(fused_wins={1, 2}))
    # block1 and block2 in training, then both in evaluation: four contests
    assert [(t.layer, t.key.training) for t in timings] == [
        ("block1", True), ("block2", True), ("block1", False), ("block2", False)]
    assert [t.choice for t in timings] == ["aten", "fused", "fused", "aten"]
    # block1's input is the images (no gradient wanted); block2's input comes from block1 (it needs one)
    assert timings[0].key.input_grad is False and timings[1].key.input_grad is True
    assert timings[0].key == CallKey((4, 1, 9, 9), False, torch.float32, True, False)

    assert model.block1.implementation(train) == "aten"
    hidden = model.block1(train)
    assert model.block2.implementation(hidden) == "fused"
    with torch.no_grad():
        assert model.block1.implementation(evaluation) == "fused"
        assert model.block1.implementation(train) == "aten"  # not measured without grad: auto's CPU default
    assert model.block1.implementation(torch.randn(5, 1, 9, 9)) == "aten"  # an unmeasured batch size


def test_outputs_and_gradients_do_not_depend_on_the_choice(measurable_on_cpu):
    torch.manual_seed(0)
    x = torch.randint(-3, 4, (3, 1, 11, 10)).float()  # integer values: exact ties in the pool windows
    results = []
    for fused_wins in ({0, 1}, set()):
        torch.manual_seed(1)
        model = TwoBlocks(channels=GRAY)
        choose_kernels(model, [x], timer=scripted_timer(fused_wins))
        assert {model.block1.kernel_choices[k] for k in model.block1.kernel_choices} == (
            {"fused"} if fused_wins else {"aten"})
        out = model(x)
        out.square().sum().backward()
        results.append((out, [p.grad for p in model.parameters()]))
    (out_fused, grads_fused), (out_plain, grads_plain) = results
    torch.testing.assert_close(out_fused, out_plain)
    for fused, plain in zip(grads_fused, grads_plain, strict=True):
        torch.testing.assert_close(fused, plain)


def test_the_contest_runs_on_copies_and_leaves_the_model_alone(measurable_on_cpu):
    torch.manual_seed(0)
    model = TwoBlocks(channels=GRAY)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    choose_kernels(model, [torch.randn(2, 1, 8, 8)], timer=scripted_timer({0}))
    assert not model.training  # the mode is put back
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_real_timer_measures_both_implementations(measurable_on_cpu):
    # Which one wins is the machine's business (a unit test asserts no timing): the winner follows the numbers.
    torch.manual_seed(0)
    model = TwoBlocks(channels=GRAY)
    x = torch.randn(2, 1, 8, 8)
    timings = choose_kernels(model, [x])
    assert len(timings) == 2 and all(t.fused_ms > 0 and t.aten_ms > 0 for t in timings)
    for timing in timings:
        assert timing.choice == ("fused" if timing.fused_ms <= timing.aten_ms else "aten") and timing.speedup >= 1
        loser = {"fused": "aten", "aten": "fused"}[timing.choice]
        assert f": {timing.choice} " in timing.describe() and f" ms vs {loser} " in timing.describe()
    assert model.block1.implementation(x) == timings[0].choice
    row = timings[0].to_dict()
    assert row["layer"] == "block1" and row["choice"] == timings[0].choice and "2x1x8x8 float32 NCHW" in row["call"]
    assert row["aten_ms"] == row["torch_ms"] == round(timings[0].aten_ms, 5)  # the old key, for older readers
    assert timings[0].describe().startswith("block1 [2x1x8x8 float32 NCHW fwd+bwd, no input grad]: ")


def test_autocast_calls_are_keyed_and_timed_in_the_compute_dtype(measurable_on_cpu):
    torch.manual_seed(0)
    model = TwoBlocks(channels=GRAY)
    # channels-last by its strides (with one channel, .contiguous(memory_format=...) may keep NCHW's strides)
    x = torch.empty_strided((2, 1, 8, 8), (64, 1, 8, 1)).normal_()
    timings = choose_kernels(model, [x], autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                             timer=scripted_timer({0, 1}))
    assert [t.key.dtype for t in timings] == [torch.bfloat16, torch.bfloat16]
    assert timings[0].key.channels_last
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.block1.implementation(x) == "fused"
    assert model.block1.implementation(x) == "aten"  # fp32 calls were not measured


def test_nothing_is_measured_where_auto_never_fuses():
    # The real gate: on the CPU, auto is aten, so there is no contest (and no interpreter run).
    model = TwoBlocks(channels=GRAY)
    assert choose_kernels(model, [torch.randn(2, 1, 8, 8)], timer=scripted_timer(set())) == []
    assert model.block1.kernel_choices == {}


def test_explicit_kernels_are_not_measured(measurable_on_cpu):
    model = TwoBlocks("aten", channels=GRAY)
    assert choose_kernels(model, [torch.randn(2, 1, 8, 8)], timer=scripted_timer(set())) == []


@pytest.mark.parametrize("fused_here", [True, False], ids=["fused-kernel-here", "no-fused-kernel-here"])
def test_an_autocast_for_another_device_is_refused_in_one_line(fused_here, monkeypatch):
    # The README's GPU snippet run on a CPU: its CUDA autocast casts nothing here, so the contests would be timed in
    # float32 (where the fused kernel runs) or nothing measured at all (where it does not), without a word.
    monkeypatch.setattr(kernel_choice, "fused_is_an_option", lambda device: fused_here)
    model = TwoBlocks(channels=GRAY)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError) as refused:
        warnings.simplefilter("always")
        choose_kernels(model, [torch.randn(2, 1, 8, 8)], timer=scripted_timer(set()),
                       autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    message = str(refused.value)
    assert "an autocast for cuda but batches on cpu" in message and "torch.autocast('cpu'" in message, message
    assert "\n" not in message and model.block1.kernel_choices == {}
    assert not [w for w in caught if "autocast" in str(w.message)]  # the error alone says it, no torch warning


def test_a_checkpoint_written_before_the_aten_name_still_loads():
    old = dict(layer="block1", shape=[4, 1, 9, 9], channels_last=False, dtype="float32", training=True,
               input_grad=False, fused_ms=2.0, torch_ms=1.0)
    timing = KernelTiming.from_state(old)
    assert (timing.key, timing.aten_ms, timing.torch_ms, timing.choice, timing.origin) == (
        CallKey((4, 1, 9, 9), False, torch.float32, True, False), 1.0, 1.0, "aten", "checkpoint")
    assert "torch_ms" not in timing.to_state() and KernelTiming.from_state(timing.to_state()) == timing


def test_compiled_forward_follows_the_choices(monkeypatch):
    # torch.compile cannot trace the interpreter: the aten branch stands in for the fused op (same values).
    monkeypatch.setattr(ops, "INTERPRET_ON_CPU", False)
    monkeypatch.setattr(kernel_choice, "fused_is_an_option", lambda device: True)
    torch.manual_seed(0)
    model = TwoBlocks(channels=GRAY)
    x = torch.randn(2, 1, 10, 10)
    choose_kernels(model, [x], timer=scripted_timer({1}), compile=True)
    assert [model.block1.implementation(x), model.block2.implementation(model.block1(x))] == ["aten", "fused"]
    expected = conv_relu_pool_reference(conv_relu_pool_reference(x, model.block1.weight, model.block1.bias, 1),
                                        model.block2.weight, model.block2.bias).flatten(1)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), expected)


def test_trainer_warm_up_measures_except_in_deterministic_mode(measurable_on_cpu, monkeypatch):
    monkeypatch.setattr(kernel_choice, "measure_pair", scripted_pair({0, 1, 2, 3}))
    batches = [(torch.randn(4, 1, 8, 8), torch.randint(0, 2, (4,)))]
    for deterministic in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(TwoBlocks(channels=GRAY), device=torch.device("cpu"))
        torch.use_deterministic_algorithms(deterministic)
        try:
            trainer.warm_up(batches, [])
        finally:
            torch.use_deterministic_algorithms(False)
        timings = trainer.kernel_timings
        assert (len(timings), all(isinstance(t, KernelTiming) for t in timings)) == ((0, True) if deterministic
                                                                                     else (2, True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or ops.INTERPRET_ON_CPU,
                    reason="needs a CUDA GPU and compiled Triton kernels (TRITON_INTERPRET=0)")
def test_measured_on_the_gpu_for_simplecnn_shapes():
    from fastcnn.models import build_model

    torch.manual_seed(0)
    model = build_model("simplecnn").cuda().to(memory_format=torch.channels_last)
    images = torch.randn(512, 1, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    timings = choose_kernels(model, [images, images[:96]], [images], autocast=bf16)
    assert len(timings) == 3  # conv1 at batch 512 and 96 in training, 512 in evaluation
    for timing in timings:
        print(timing.describe())
        assert timing.fused_ms > 0 and timing.aten_ms > 0
    with bf16():
        out = model(images)
    assert out.shape == (512, 10) and torch.isfinite(out).all()


def test_known_choices_are_used_without_measuring_again(measurable_on_cpu):
    # A resumed run: block1's training call was measured before (and aten won by little); only
    # block2's call is new. The earlier winner stands even if a new measurement would say otherwise.
    torch.manual_seed(0)
    x = torch.randn(4, 1, 9, 9)
    first = choose_kernels(TwoBlocks(channels=GRAY), [x], timer=scripted_timer(fused_wins=set()))
    saved = [KernelTiming.from_state(first[0].to_state())]
    calls = []

    def timer(fn, device):
        calls.append(fn)
        return 1.0  # both equally fast: the fused kernel would win a tie

    model = TwoBlocks(channels=GRAY)
    timings = choose_kernels(model, [x], timer=timer, known=saved)
    assert len(calls) == 2  # one contest (block2), two contestants
    assert [(t.layer, t.origin, t.choice) for t in timings] == [("block1", "checkpoint", "aten"),
                                                               ("block2", "measured", "fused")]
    assert model.block1.implementation(x) == "aten"
    assert timings[0].to_dict()["origin"] == "checkpoint"


def test_choices_survive_a_checkpoint_and_only_on_the_same_gpu(measurable_on_cpu, tmp_path):
    from fastcnn.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    x = torch.empty_strided((2, 1, 8, 8), (64, 1, 8, 1)).normal_()  # channels-last, under bf16 autocast
    timings = choose_kernels(TwoBlocks(channels=GRAY), [x], timer=scripted_timer({1}),
                             autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    h100 = "NVIDIA H100 80GB HBM3 | torch 2.11.0 | triton 3.6.0 | cudnn 91000"
    save_checkpoint(tmp_path / "c.pt", dict(kernel_choices=kernel_choice.choices_to_state(timings, h100)))
    state = load_checkpoint(tmp_path / "c.pt")["kernel_choices"]  # weights_only=True: plain values only
    restored = kernel_choice.choices_from_state(state, h100)
    assert [(t.layer, t.key, t.fused_ms, t.aten_ms, t.choice) for t in restored] == [
        (t.layer, t.key, t.fused_ms, t.aten_ms, t.choice) for t in timings]
    assert all(t.origin == "checkpoint" for t in restored)
    # another GPU, or the same GPU with other software: measure again
    assert kernel_choice.choices_from_state(state, h100.replace("H100 80GB HBM3", "A100-SXM4-80GB")) == []
    assert kernel_choice.choices_from_state(state, h100.replace("triton 3.6.0", "triton 3.8.0")) == []
    assert kernel_choice.choices_from_state(None, h100) == []  # a checkpoint from before choices
    where = kernel_choice.measured_where(torch.device("cpu"))
    assert where.startswith("CPU") and f"torch {torch.__version__}" in where


def test_rank_zero_measures_and_every_rank_takes_its_choices(measurable_on_cpu, monkeypatch):
    # Data parallel, as build.pay_one_time_costs wires it: the other ranks do not measure; the agreement (a
    # broadcast from rank 0 in a real group) hands them rank 0's timings, which replace whatever the layers chose.
    monkeypatch.setattr(kernel_choice, "measure_pair", lambda *args: pytest.fail("a non-zero rank measured"))
    x = torch.randn(4, 1, 8, 8)
    rank0 = choose_kernels(TwoBlocks(channels=GRAY), [x], timer=scripted_timer({0}))
    torch.manual_seed(0)
    trainer = Trainer(TwoBlocks(channels=GRAY), device=torch.device("cpu"))
    trainer.model.block2.kernel_choices[CallKey.of(torch.randn(4, 3, 4, 4), trainer.model.block2.weight)] = "x"
    received = []
    trainer.warm_up([(x, torch.randint(0, 2, (4,)))], [], measure_kernels=False,
                    agree_on_kernels=lambda timings: received.append(timings) or rank0)
    assert received == [[]]
    assert trainer.kernel_timings == rank0
    assert trainer.model.block1.implementation(x) == "fused"
    assert trainer.model.block2.kernel_choices == {rank0[1].key: rank0[1].choice}


BROADCAST_WORKER = """
import datetime, pickle, sys
import torch
import torch.distributed as dist
from fastcnn.distributed import DistributedContext
from fastcnn.kernel_choice import CallKey, KernelTiming

rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
try:
    ctx = DistributedContext(rank=rank, world_size=2, backend="gloo")
    key = CallKey((rank + 1, 1, 8, 8), False, torch.bfloat16, True, False)
    mine = [KernelTiming(f"layer-of-rank-{rank}", key, 1.0, 2.0)] if rank == 0 else []
    with open(f"{out}/{rank}.pkl", "wb") as file:
        pickle.dump(ctx.from_main(mine), file)
    dist.barrier()  # neither rank tears the group down while the other is still in the broadcast
finally:
    dist.destroy_process_group()
"""


def test_from_main_hands_rank_zeros_timings_to_every_rank_of_a_gloo_group(tmp_path):
    # Two real processes (plain subprocesses with a deadline, so that a stuck rendezvous fails the test instead of
    # hanging the suite).
    import pickle
    import subprocess
    import sys

    ranks = [subprocess.Popen([sys.executable, "-c", BROADCAST_WORKER, str(rank), str(tmp_path / "store"),
                               str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    try:
        outputs = [process.communicate(timeout=180)[0] for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    assert [process.returncode for process in ranks] == [0, 0], "\n".join(outputs)[-3000:]
    results = [pickle.loads((tmp_path / f"{rank}.pkl").read_bytes()) for rank in (0, 1)]
    assert results[0] == results[1] == [KernelTiming(
        "layer-of-rank-0", CallKey((1, 1, 8, 8), False, torch.bfloat16, True, False), 1.0, 2.0)]


def test_a_resumed_run_trains_with_the_checkpoints_choices_without_measuring(measurable_on_cpu, monkeypatch,
                                                                                tmp_path, capsys):
    # End to end through `fastcnn train`: the first run measures (a scripted timer: aten wins, so training runs
    # aten) and its checkpoint keeps the choices; the resumed run takes them and measures nothing.
    import json

    from fastcnn.cli import main

    monkeypatch.setattr(kernel_choice, "measure_pair", scripted_pair(fused_wins=set()))
    out = tmp_path / "run"
    common = ["--dataset", "synthetic", "--synthetic-size", "256,64", "-b", "64", "--no-progress", "--device", "cpu"]
    assert main(["train", *common, "--epochs", "1", "--output", str(out)]) == 0
    first = json.loads((out / "summary.json").read_text())["kernel_choices"]
    assert first and {row["origin"] for row in first} == {"measured"} and {row["choice"] for row in first} == {
        "aten"}
    monkeypatch.setattr(kernel_choice, "measure_pair", lambda *args: pytest.fail("a resumed run measured again"))
    assert main(["train", "--resume", str(out / "checkpoint.pt"), "--epochs", "2", "--no-progress"]) == 0
    resumed = json.loads((out / "summary.json").read_text())["kernel_choices"]
    assert [(row["layer"], row["call"], row["choice"]) for row in resumed] == [
        (row["layer"], row["call"], row["choice"]) for row in first]
    assert {row["origin"] for row in resumed} == {"checkpoint"}


def test_on_a_cpu_the_two_contestants_are_timed_in_alternation(monkeypatch):
    calls = []
    clock = itertools.count()
    monkeypatch.setattr(kernel_choice.time, "perf_counter", lambda: next(clock) / 1e3)  # each reading 1 ms later
    fused_ms, aten_ms = kernel_choice.measure_pair(lambda: calls.append("f"), lambda: calls.append("a"),
                                                   torch.device("cpu"))
    assert "".join(calls) == "fafa" + "fa" "af" "fa" "af" "fa" "af" "fa"  # 2 warm-ups each, then rounds in turn
    assert (fused_ms, aten_ms) == pytest.approx((1.0, 1.0))  # one tick per timed call; warm-ups not counted


@pytest.mark.parametrize("strides,channels_last", [((64, 1, 8, 1), True), ((64, 64, 8, 1), False)],
                         ids=["channels-last", "nchw"])
def test_the_contest_times_the_layout_the_call_has(monkeypatch, strides, channels_last):
    # One channel: both stride patterns are valid for both layouts, and contiguous(memory_format=channels_last)
    # would keep the NCHW ones, so the contest would time a layout (and a kernel path) the call does not have.
    seen = []

    def spy(name, op):
        def run(x, weight, bias, padding):
            seen.append((name, x.stride()))
            return op(x, weight, bias, padding)
        return run

    monkeypatch.setattr(kernel_choice, "CANDIDATES",
                        {name: spy(name, op) for name, op in kernel_choice.CANDIDATES.items()})
    monkeypatch.setattr(kernel_choice, "fused_is_an_option", lambda device: True)
    model = TwoBlocks(channels=GRAY)
    x = torch.empty_strided((2, 1, 8, 8), strides).normal_()
    choose_kernels(model, [x], timer=scripted_timer({0, 1}))
    first_layer = {stride for name, stride in seen if len(stride) == 4 and stride[0] == 64}
    assert first_layer == {strides}, seen

"""The training step's two strategies (fastcnn.steps), and whole-step CUDA graphs (fastcnn.cuda_graph).

What a graphed step must guarantee is the eager step's results: the same losses, right predictions and weights,
step after step and epoch after epoch, with batches of another shape run eagerly, a warm-up undone, and a failed
capture falling back (or failing the run with several processes). On a CPU the real GraphedStep runs over a
recorder that replays its step function eagerly (EagerRecorder): everything but the CUDA capture itself, which the
tests marked gpu check against eager steps on a GPU. The in-place restores capture relies on are tested everywhere.
"""

import copy
import math

import pytest
import torch
from helpers import requires_cuda

from fastcnn.cuda_graph import WARMUP_STEPS, restore_optimizer_in_place, run_then_undo, snapshot_optimizer
from fastcnn.data import DeviceLoader, synthetic_dataset
from fastcnn.engine import EpochProgress, Trainer, build_optimizer, build_schedule
from fastcnn.fault_injection import TEST_FAULT_ENV, install_test_fault
from fastcnn.models import build_model
from fastcnn.steps import EagerStep, GraphedStep, GraphPolicy, graph_policy
from fastcnn.train import StepLosses

CPU = torch.device("cpu")


class EagerRecorder:
    """A GraphedStep recorder for any device, standing in for a CUDA graph: recording runs nothing (a capture runs
    no kernels either), and each replay runs the step function again, its gradients allocated afresh (as the
    graph's, which its backward writes rather than adds to)."""

    def __init__(self, optimizer):
        self.optimizer, self.replays = optimizer, 0

    def __call__(self, run_step):
        def replay():
            self.replays += 1
            self.optimizer.zero_grad(set_to_none=True)
            return run_step()

        return replay


class FailingCapture:
    """A recorder that fails as a CUDA capture can: after its warm-up steps (which change the weights, and which
    run_then_undo takes back, as capture_cuda_graph does), with a capture error."""

    def __init__(self, parts):
        self.parts = parts

    def __call__(self, run_step):
        run_then_undo(run_step, WARMUP_STEPS, model=self.parts.model, optimizer=self.parts.optimizer)
        raise RuntimeError("operation not permitted when stream is capturing")


def graphed_anywhere(parts):
    """Trainer(make_step=...): the real GraphedStep over an EagerRecorder."""
    return GraphedStep(parts, record=EagerRecorder(parts.optimizer))


class WatchedLoader:
    """A loader that keeps what it yields, and offers serve_into as the loader it wraps does."""

    def __init__(self, loader):
        self.loader, self.yielded = loader, []

    def __len__(self):
        return len(self.loader)

    def serve_into(self, images, labels=None):
        return self.loader.serve_into(images, labels)

    def __iter__(self):
        for images, labels in self.loader:
            self.yielded.append((images, labels))
            yield images, labels


def test_optimizer_restore_keeps_tensors_and_values():
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer("adam", model.parameters(), 1e-2, (0.7, 0.9))
    schedule = build_schedule("onecycle", optimizer, 1e-2, 10)
    fresh = snapshot_optimizer(optimizer)
    lr_before = optimizer.param_groups[0]["lr"]

    def step():
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        schedule.step()

    step()
    after_one = snapshot_optimizer(optimizer)
    tensors = {id(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)}
    step()
    step()
    restore_optimizer_in_place(optimizer, after_one)
    for index, param in enumerate(model.parameters()):
        for key, value in optimizer.state[param].items():
            assert torch.equal(value, after_one["state"][index][key])
    assert tensors == {id(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)}
    restore_optimizer_in_place(optimizer, fresh)  # state made since the snapshot goes back to zeros
    assert all(float(v.abs().sum()) == 0 for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    assert optimizer.param_groups[0]["lr"] == lr_before


def test_optimizer_snapshot_copies_a_tensor_learning_rate():
    # With graphs the lr is a device tensor that schedules overwrite in place; state_dict() hands out that very
    # tensor, so a snapshot that kept it would "restore" whatever the lr had become.
    optimizer = torch.optim.Adam(torch.nn.Linear(4, 3).parameters(), lr=torch.tensor(0.01))
    lr = optimizer.param_groups[0]["lr"]
    saved = snapshot_optimizer(optimizer)
    lr.fill_(0.5)
    restore_optimizer_in_place(optimizer, saved)
    assert optimizer.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.01)


def test_run_then_undo_puts_model_and_optimizer_back_in_place_also_when_a_step_fails():
    # What capture's warm-up relies on: the same tensors afterwards (a graph captured next keeps their addresses),
    # holding the values from before, and no gradients left for the captured backward to add to.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = build_optimizer("adam", model.parameters(), 1e-2)
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()  # state to put back, not only to zero
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = snapshot_optimizer(optimizer)
    storage = [value.data_ptr() for value in model.state_dict().values()]  # state_dict() hands out new views
    optimizer_tensors = [id(v) for s in optimizer.state.values() for v in s.values()]
    calls = []

    def step():
        calls.append(1)
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
        if len(calls) == 2:
            raise RuntimeError("a warm-up step failed")

    with pytest.raises(RuntimeError, match="warm-up step failed"):
        run_then_undo(step, 3, model=model, optimizer=optimizer)
    assert len(calls) == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for index, param in enumerate(model.parameters()):
        assert param.grad is None
        for key, value in optimizer.state[param].items():
            assert torch.equal(value, state_before["state"][index][key])
    assert [value.data_ptr() for value in model.state_dict().values()] == storage
    assert [id(v) for s in optimizer.state.values() for v in s.values()] == optimizer_tensors


def test_cuda_graph_is_refused_where_it_cannot_run():
    from fastcnn.config import TrainConfig, resolve
    from fastcnn.errors import NotAvailableError

    with pytest.raises(ValueError, match="CUDA"):
        Trainer(torch.nn.Linear(2, 2), device=CPU, cuda_graph=True)
    # The Trainer API refuses what the CLI's configuration refuses, on any device
    with pytest.raises(ValueError, match="float16"):
        Trainer(torch.nn.Linear(2, 2), device=CPU, cuda_graph=True, amp_dtype=torch.float16)
    with pytest.raises(ValueError, match="adam"):
        Trainer(torch.nn.Linear(2, 2), device=CPU, cuda_graph=True, opt="sgd")
    with pytest.raises(NotAvailableError, match="CUDA GPU"):
        resolve(TrainConfig(device="cpu", cuda_graph=True))


def test_graph_policy_decides_once_how_a_graphed_step_warms_up_and_what_a_failed_capture_does():
    cuda = torch.device("cuda")  # a device name: no GPU is needed to decide
    assert graph_policy(False, device=cuda, amp_dtype=None, opt="adam") is None
    assert graph_policy(False, device=CPU, amp_dtype=torch.float16, opt="sgd") is None  # nothing to refuse
    alone = graph_policy(True, device=cuda, amp_dtype=torch.bfloat16, opt="adam")
    assert alone == GraphPolicy(warmup_steps=WARMUP_STEPS, fail_on_capture_failure=False)
    # Data parallel: DDP's 11 eager iterations before capture, and no eager fallback on one rank alone
    ranks = graph_policy(True, device=cuda, amp_dtype=None, opt="adam", distributed=True)
    assert ranks == GraphPolicy(warmup_steps=11, fail_on_capture_failure=True)
    for refused, match in ((dict(amp_dtype=torch.float16), "float16"), (dict(opt="sgd"), "adam"),
                           (dict(device=CPU), "CUDA device")):
        with pytest.raises(ValueError, match=match):
            graph_policy(True, **{**dict(device=cuda, amp_dtype=None, opt="adam"), **refused})
    # What the Trainer builds from it: the eager step unless graphs are asked for
    trainer = Trainer(torch.nn.Linear(2, 2), device=CPU)
    assert isinstance(trainer.step, EagerStep) and trainer.graph_status == "off" and not trainer.cuda_graph


def _two_trainers(model, **options):
    """An eager trainer and one running the real GraphedStep over an EagerRecorder, from the same weights."""
    plain = Trainer(copy.deepcopy(model), device=CPU, **options)
    graphed = Trainer(copy.deepcopy(model), device=CPU, make_step=graphed_anywhere, **options)
    return plain, graphed


@pytest.mark.parametrize("schedule", ["constant", "onecycle"])
def test_a_graphed_step_gives_the_eager_steps_losses_and_weights(schedule):
    torch.manual_seed(0)
    loader = DeviceLoader(synthetic_dataset(4 * 32 + 9), 32, mean=0.13, std=0.31)
    plain, graphed = _two_trainers(build_model("simplecnn", kernel="aten"), schedule=schedule, lr=1e-2,
                                   total_steps=2 * len(loader), label_smoothing=0.1)
    replayed = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        for images, labels in loader:  # four full batches (replayed), then a smaller one (eager)
            loss_e, correct_e = plain.train_step(images, labels)
            loss_g, correct_g = graphed.train_step(images, labels)
            assert torch.equal(loss_g, loss_e) and torch.equal(correct_g, correct_e)
            replayed.append(graphed.step.replayed_last)
    assert replayed == [True, True, True, True, False] * 2 and graphed.step.record.replays == 8
    assert graphed.graph_status == "captured" and graphed.cuda_graph
    assert plain.optimizer.param_groups[0]["lr"] == graphed.optimizer.param_groups[0]["lr"]
    for (name, p_e), p_g in zip(plain.model.named_parameters(), graphed.model.parameters(), strict=True):
        assert torch.equal(p_g, p_e), name


def test_a_failed_capture_falls_back_to_eager_steps_from_the_same_state(capsys):
    # The capture fails after warm-up steps that changed the weights: the run goes on eagerly from the state before
    # them, with an eager run's results, and says so once.
    torch.manual_seed(0)
    model = build_model("simplecnn", kernel="aten")
    reference = Trainer(copy.deepcopy(model), device=CPU)
    trainer = Trainer(copy.deepcopy(model), device=CPU,
                      make_step=lambda parts: GraphedStep(parts, GraphPolicy(), record=FailingCapture(parts)))
    assert trainer.graph_status == "on" and trainer.cuda_graph
    loader = DeviceLoader(synthetic_dataset(96), 32, mean=0.13, std=0.31)
    for images, labels in loader:
        loss_r, correct_r = reference.train_step(images, labels)
        loss_t, correct_t = trainer.train_step(images, labels)
        assert torch.equal(loss_t, loss_r) and torch.equal(correct_t, correct_r)
        assert not trainer.step.replayed_last
    assert not trainer.cuda_graph and trainer.graph_status.startswith("capture failed (RuntimeError")
    assert trainer.graph_status.endswith("; eager steps") and trainer.step.captured is None
    assert capsys.readouterr().err.count("CUDA graph capture failed") == 1
    for p_r, p_t in zip(reference.model.parameters(), trainer.model.parameters(), strict=True):
        assert torch.equal(p_r, p_t)


def test_fast_preset_turns_graphs_on_for_cuda_unless_the_run_asks_for_what_cannot_be_captured(monkeypatch):
    from fastcnn import config
    from fastcnn.config import TrainConfig, resolve
    from fastcnn.errors import NotAvailableError

    assert config.preset_defaults("fast", "cuda")["cuda_graph"] is True
    assert config.preset_defaults("fast", "cpu")["cuda_graph"] is False
    assert config.preset_defaults("reference", "cuda")["cuda_graph"] is False
    # No GPU here: answer what resolve would ask one.
    monkeypatch.setattr(config, "pick_device", lambda requested: "cuda")
    monkeypatch.setattr(config, "default_amp_dtype", lambda device: "bfloat16")
    base = dict(device="cuda", dataset="synthetic")
    assert resolve(TrainConfig(**base)).cuda_graph
    for conflict in (dict(opt="sgd"), dict(amp_dtype="float16"), dict(compile_mode="reduce-overhead")):
        assert not resolve(TrainConfig(**base, **conflict)).cuda_graph, conflict  # the default yields...
        with pytest.raises(NotAvailableError, match="--cuda-graph"):  # ...an explicit request is refused
            resolve(TrainConfig(**base, **conflict, cuda_graph=True))
    assert not resolve(TrainConfig(**base, cuda_graph=False)).cuda_graph


def test_a_failed_capture_with_several_processes_fails_the_run():
    # Other ranks' captured all-reduces would not pair with this rank's eager ones: no fallback there.
    policy = graph_policy(True, device=torch.device("cuda"), amp_dtype=None, opt="adam", distributed=True)
    trainer = Trainer(build_model("simplecnn", kernel="aten"), device=CPU,
                      make_step=lambda parts: GraphedStep(parts, policy, record=FailingCapture(parts)))
    images, labels = next(iter(DeviceLoader(synthetic_dataset(32), 32, mean=0.13, std=0.31)))
    with pytest.raises(RuntimeError, match="capture failed on this rank.*--no-cuda-graph"):
        trainer.train_step(images, labels)


def test_the_epoch_loop_has_the_loader_gather_straight_into_the_graph_inputs():
    # After the first (captured) step of an epoch the loader gathers each full batch into the graph's inputs, so a
    # replay copies nothing, and the graph's running sums are the epoch's, so the loop adds nothing; the run, warm-up
    # included, trains and reports exactly as an eager one, and loader and sums are let go afterwards.
    torch.manual_seed(0)
    model = build_model("simplecnn", kernel="aten")
    options = dict(mean=0.13, std=0.31, channels_last=True, seed=3)
    data = synthetic_dataset(4 * 32 + 9)
    plain_loader, loader = DeviceLoader(data, 32, **options), WatchedLoader(DeviceLoader(data, 32, **options))
    plain, trainer = _two_trainers(model, channels_last=True)
    warm_up_batch = [next(iter(plain_loader))]
    plain.warm_up(warm_up_batch, [], steps=2)
    trainer.warm_up(warm_up_batch, [], steps=2)  # captures, replays, and puts everything back in place
    captured = trainer.step.captured
    assert trainer.step.record.replays == 2
    # Put back in place (the graph keeps pointers): Adam's state stays, as zeros, where the eager trainer's is new
    moments = [v for state in trainer.optimizer.state.values() for v in state.values()]
    assert len(trainer.optimizer.state) == len(list(model.parameters())) and not plain.optimizer.state
    assert all(float(v.abs().sum()) == 0 for v in moments)
    for epoch in (0, 1):
        plain_loader.set_epoch(epoch)
        loader.loader.set_epoch(epoch)
        loader.yielded.clear()
        expected = plain.train_epoch(plain_loader)
        stats = trainer.train_epoch(loader)
        assert (stats.loss, stats.accuracy, stats.samples) == (expected.loss, expected.accuracy, expected.samples)
        # The first batch comes in new tensors (copied in), the next three straight in the graph's inputs; the
        # smaller last batch is a new tensor again, and runs eagerly.
        served = [x is captured.static_images and y is captured.static_labels for x, y in loader.yielded]
        assert served == [False, True, True, True, False]
        assert next(iter(loader.loader))[0] is not captured.static_images  # let go at the end of the epoch
    assert trainer.step.record.replays == 2 + 2 * 4
    for p_plain, p_graph in zip(plain.model.parameters(), trainer.model.parameters(), strict=True):
        assert torch.equal(p_plain, p_graph)
    # The sums an epoch returns with are its own: later replays add to the graph's, not to a past epoch's.
    progress = EpochProgress.start(CPU)
    trainer.train_epoch(loader, progress=progress)
    done = progress.to_dict()
    trainer.train_step(*next(iter(loader)))
    assert progress.to_dict() == done and progress.loss_sum is not captured.loss_sum


def test_step_losses_of_graphed_epochs_are_the_eager_epochs():
    # From its first step the graph keeps the epoch's running sums and adds to them in every replay: StepLosses
    # copies whichever sums the epoch has at that step, so a graphed run draws the eager run's curve.
    torch.manual_seed(0)
    data = synthetic_dataset(8 * 16 + 5)
    plain, graphed = _two_trainers(build_model("simplecnn", kernel="aten"))
    rows = {}
    for name, trainer in (("eager", plain), ("graphed", graphed)):
        loader, rows[name] = DeviceLoader(data, 16, mean=0.13, std=0.31, seed=2), []
        losses = StepLosses(rows[name], len(loader))  # 9 steps: a row after each
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            progress = EpochProgress.start(CPU)
            losses.start(epoch, progress)
            trainer.train_epoch(loader, progress=progress, on_batch=losses.after_step)
            losses.flush()
    assert graphed.graph_status == "captured" and graphed.step.record.replays == 2 * 8
    assert len(rows["eager"]) == 2 * 9 and rows["graphed"] == rows["eager"]


def test_a_nan_fault_reaches_the_sums_a_graphed_epoch_keeps_in_its_graph(monkeypatch):
    # The test hook of the distributed tests (fastcnn.fault_injection): a replayed step's loss is added to the
    # epoch's sums by the graph itself, so the hook poisons the graph's sums (trainer.step.captured).
    monkeypatch.setenv(TEST_FAULT_ENV, "0:3:nan")
    torch.manual_seed(0)
    trainer = Trainer(build_model("simplecnn", kernel="aten"), device=CPU, make_step=graphed_anywhere)
    install_test_fault(trainer, rank=0)
    stats = trainer.train_epoch(DeviceLoader(synthetic_dataset(5 * 16), 16, mean=0.13, std=0.31), check_loss=False)
    assert trainer.step.replayed_last and math.isnan(stats.loss)


def test_an_eager_step_serves_nothing_into_and_leaves_the_loader_as_it_was():
    loader = WatchedLoader(DeviceLoader(synthetic_dataset(3 * 16), 16, mean=0.13, std=0.31))
    calls = []
    loader.serve_into = lambda *tensors: calls.append(tensors) or False
    Trainer(build_model("simplecnn", kernel="aten"), device=CPU).train_epoch(loader)
    assert calls == [] and len(loader.yielded) == 3


def _trainers(kernel="aten", **options):
    torch.manual_seed(0)
    model = build_model("simplecnn", kernel=kernel)
    device = torch.device("cuda")
    eager = Trainer(copy.deepcopy(model), device=device, **options)
    graphed = Trainer(copy.deepcopy(model), device=device, cuda_graph=True, **options)
    return eager, graphed


@pytest.mark.parametrize("fused_optimizer", [False, True], ids=["foreach-adam", "fused-adam"])
@pytest.mark.parametrize("schedule", ["constant", "onecycle"])
@pytest.mark.gpu
@requires_cuda
def test_graph_replayed_steps_give_the_same_parameters_as_eager_steps(schedule, fused_optimizer, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    loader = DeviceLoader(synthetic_dataset(8 * 32 + 7), 32, device="cuda", mean=0.13, std=0.31)
    # one scheduler step per batch, the partial one included (OneCycleLR refuses a step past total_steps)
    eager, graphed = _trainers(opt="adam", lr=1e-3, schedule=schedule, total_steps=len(loader),
                               fused_optimizer=fused_optimizer)
    for images, labels in loader:  # 8 full batches, then a partial one (eager fallback)
        loss_e, _ = eager.train_step(images, labels)
        loss_g, _ = graphed.train_step(images, labels)
        torch.testing.assert_close(loss_g, loss_e, rtol=1e-5, atol=1e-6)
    assert graphed.graph_status == "captured" and eager.graph_status == "off"
    for (name, p_e), p_g in zip(eager.model.named_parameters(), graphed.model.parameters(), strict=True):
        torch.testing.assert_close(p_g, p_e, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
@requires_cuda
def test_graph_with_compile_and_fused_kernel_and_bf16_matches_eager_steps(monkeypatch):
    # The fast preset's step (compiled, the fused kernel, bf16, channels-last) captured: each replay's loss and
    # right predictions, and the weights after 31 steps, are the same compiled eager step's, within bf16's rounding.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    eager, graphed = _trainers(kernel="fused", compile=True, amp_dtype=torch.bfloat16, channels_last=True)
    loader = DeviceLoader(synthetic_dataset(2000), 64, device="cuda", mean=0.13, std=0.31, channels_last=True,
                          dtype=torch.bfloat16)
    for images, labels in loader:  # 31 full batches, then a smaller one (eager)
        loss_e, correct_e = eager.train_step(images, labels)
        loss_g, correct_g = graphed.train_step(images, labels)
        torch.testing.assert_close(loss_g, loss_e, rtol=2e-2, atol=2e-3)
        assert abs(int(correct_g) - int(correct_e)) <= 2
    assert graphed.graph_status == "captured"
    for (name, p_e), p_g in zip(eager.model.named_parameters(), graphed.model.parameters(), strict=True):
        torch.testing.assert_close(p_g, p_e, rtol=2e-2, atol=2e-3, msg=name)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("fast", [False, True], ids=["fp32-eager", "bf16-compiled"])
def test_graph_replayed_epochs_with_the_loader_serving_into_the_graph_equal_eager_epochs(monkeypatch, fast):
    # The real capture, with DeviceLoader.serve_into feeding the graph's inputs in place and the graph keeping the
    # epoch's sums (in the compiled loss, with `fast`): two epochs (each with a smaller last batch, eager) give the
    # eager run's statistics and parameters.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    dtype = torch.bfloat16 if fast else torch.float32
    options = dict(device="cuda", mean=0.13, std=0.31, channels_last=True, seed=1, dtype=dtype)
    data = synthetic_dataset(6 * 32 + 11)
    eager_loader, graph_loader = DeviceLoader(data, 32, **options), WatchedLoader(DeviceLoader(data, 32, **options))
    speed = dict(compile=True, amp_dtype=torch.bfloat16) if fast else {}
    eager, graphed = _trainers(opt="adam", lr=1e-3, channels_last=True, fused_optimizer=True, **speed)
    tolerance = dict(rtol=2e-2, atol=2e-3) if fast else dict(rtol=1e-4, atol=1e-5)
    for epoch in (0, 1):
        eager_loader.set_epoch(epoch)
        graph_loader.loader.set_epoch(epoch)
        graph_loader.yielded.clear()
        expected, stats = eager.train_epoch(eager_loader), graphed.train_epoch(graph_loader)
        assert stats.samples == expected.samples and stats.accuracy == pytest.approx(expected.accuracy, abs=2.0)
        assert stats.loss == pytest.approx(expected.loss, rel=tolerance["rtol"])
        captured = graphed.step.captured
        served = [x is captured.static_images for x, _ in graph_loader.yielded]
        assert served == [False, True, True, True, True, True, False]
    assert graphed.graph_status == "captured"
    for (name, p_e), p_g in zip(eager.model.named_parameters(), graphed.model.parameters(), strict=True):
        torch.testing.assert_close(p_g, p_e, **tolerance, msg=name)

"""Whole-step CUDA graphs. The capture tests need CUDA (they skip without it); the in-place optimizer
restore that capture relies on is tested everywhere."""

import copy

import pytest
import torch
from helpers import requires_cuda

from fastcnn.data import DeviceLoader, synthetic_dataset
from fastcnn.engine import EpochProgress, Trainer
from fastcnn.models import build_model


def test_optimizer_restore_keeps_tensors_and_values():
    from fastcnn.cuda_graph import restore_optimizer_in_place, snapshot_optimizer
    from fastcnn.engine import build_optimizer, build_schedule

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
    from fastcnn.cuda_graph import restore_optimizer_in_place, snapshot_optimizer

    optimizer = torch.optim.Adam(torch.nn.Linear(4, 3).parameters(), lr=torch.tensor(0.01))
    lr = optimizer.param_groups[0]["lr"]
    saved = snapshot_optimizer(optimizer)
    lr.fill_(0.5)
    restore_optimizer_in_place(optimizer, saved)
    assert optimizer.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.01)


def test_cuda_graph_is_refused_where_it_cannot_run():
    from fastcnn.config import TrainConfig, resolve
    from fastcnn.errors import NotAvailableError

    with pytest.raises(ValueError, match="CUDA"):
        Trainer(torch.nn.Linear(2, 2), device=torch.device("cpu"), cuda_graph=True)
    # The Trainer API refuses what the CLI's configuration refuses, on any device
    with pytest.raises(ValueError, match="float16"):
        Trainer(torch.nn.Linear(2, 2), device=torch.device("cpu"), cuda_graph=True, amp_dtype=torch.float16)
    with pytest.raises(ValueError, match="adam"):
        Trainer(torch.nn.Linear(2, 2), device=torch.device("cpu"), cuda_graph=True, opt="sgd")
    with pytest.raises(NotAvailableError, match="CUDA GPU"):
        resolve(TrainConfig(device="cpu", cuda_graph=True))


def _trainers(**options):
    torch.manual_seed(0)
    model = build_model("simplecnn", kernel="torch")
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
def test_graph_with_compile_and_fused_kernel_and_bf16_trains():
    torch.manual_seed(0)
    trainer = Trainer(build_model("simplecnn", kernel="triton"), device=torch.device("cuda"), compile=True,
                      amp_dtype=torch.bfloat16, channels_last=True, cuda_graph=True)
    loader = DeviceLoader(synthetic_dataset(2048), 64, device="cuda", mean=0.13, std=0.31, channels_last=True,
                          dtype=torch.bfloat16)
    losses = [float(trainer.train_step(x, y)[0]) for x, y in loader]
    assert trainer.graph_status == "captured"
    assert losses[-1] < losses[0]


def test_a_failed_capture_falls_back_to_eager_steps_from_the_same_state(monkeypatch, capsys):
    # Runs on CPU: the graph class is replaced by one whose capture fails after changing the weights, as a warm-up
    # that breaks half-way would; the trainer must go on eagerly from the state before it, and say so.
    import fastcnn.cuda_graph

    torch.manual_seed(0)
    model = build_model("simplecnn", kernel="torch")
    reference = Trainer(copy.deepcopy(model), device=torch.device("cpu"))
    trainer = Trainer(copy.deepcopy(model), device=torch.device("cpu"))
    trainer.cuda_graph, trainer.graph_status = True, "on"  # as if built for a GPU

    class BrokenCapture:
        def __init__(self, owner, images, labels):
            snapshot = {k: v.clone() for k, v in owner.model.state_dict().items()}
            try:
                owner.eager_step(images, labels)  # "warm-up" that changes the weights, then fails
                raise RuntimeError("operation not permitted when stream is capturing")
            finally:
                owner.model.load_state_dict(snapshot)
                owner.optimizer.state.clear()

    monkeypatch.setattr(fastcnn.cuda_graph, "GraphedTrainStep", BrokenCapture)
    loader = DeviceLoader(synthetic_dataset(96), 32, mean=0.13, std=0.31)
    for images, labels in loader:
        loss_r, correct_r = reference.train_step(images, labels)
        loss_t, correct_t = trainer.train_step(images, labels)
        assert torch.equal(loss_t, loss_r) and torch.equal(correct_t, correct_r)
    assert not trainer.cuda_graph and trainer.graph_status.startswith("capture failed (RuntimeError")
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


def test_a_failed_capture_with_several_processes_fails_the_run(monkeypatch):
    # Other ranks' captured all-reduces would not pair with this rank's eager ones: no fallback there.
    import fastcnn.cuda_graph

    def broken(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    trainer = Trainer(build_model("simplecnn", kernel="torch"), device=torch.device("cpu"))
    trainer.cuda_graph, trainer.distributed = True, True  # as if built for DDP on GPUs
    monkeypatch.setattr(fastcnn.cuda_graph, "GraphedTrainStep", broken)
    images, labels = next(iter(DeviceLoader(synthetic_dataset(32), 32, mean=0.13, std=0.31)))
    with pytest.raises(RuntimeError, match="capture failed on this rank.*--no-cuda-graph"):
        trainer.train_step(images, labels)


def test_the_epoch_loop_has_the_loader_gather_straight_into_the_graph_inputs(monkeypatch):
    # Runs on CPU: GraphedTrainStep's own replay(), accepts() and step function, over a stand-in "graph" that runs
    # that step function eagerly. After the first (captured) step the loader gathers each full batch into the
    # graph's inputs, so replay copies nothing, and the graph's running sums are the epoch's, so the loop adds
    # nothing; the run trains and reports exactly as an eager one, and loader and sums are let go afterwards.
    import fastcnn.cuda_graph

    received = []

    class EagerGraph:
        def __init__(self, step):
            self.step = step

        def replay(self):  # what capture recorded: the real step function, its grads allocated afresh
            self.step.trainer.optimizer.zero_grad(set_to_none=True)
            self.step.static_loss, self.step.static_correct = self.step._step()

    class StandIn(fastcnn.cuda_graph.GraphedTrainStep):
        def __init__(self, trainer, images, labels):  # no capture: buffers as the real one makes them
            self.trainer = trainer
            self.static_images = images.detach().clone(memory_format=torch.preserve_format)
            self.static_labels = labels.detach().clone()
            self.loss_sum = torch.full((), 1e6, dtype=torch.float64)  # whatever warm-up and past epochs left
            self.correct_sum = torch.full((), 12345, dtype=torch.int64)
            self.graph = EagerGraph(self)

        def replay(self, images, labels):
            received.append(images is self.static_images and labels is self.static_labels)
            return super().replay(images, labels)

    monkeypatch.setattr(fastcnn.cuda_graph, "GraphedTrainStep", StandIn)
    torch.manual_seed(0)
    model = build_model("simplecnn", kernel="torch")
    options = dict(mean=0.13, std=0.31, channels_last=True, seed=3)
    data = synthetic_dataset(4 * 32 + 9)
    plain_loader, loader = DeviceLoader(data, 32, **options), DeviceLoader(data, 32, **options)
    plain = Trainer(copy.deepcopy(model), device=torch.device("cpu"), channels_last=True)
    trainer = Trainer(copy.deepcopy(model), device=torch.device("cpu"), channels_last=True)
    trainer.cuda_graph, trainer.graph_status = True, "on"  # as if built for a GPU
    for epoch in (0, 1):
        plain_loader.set_epoch(epoch)
        loader.set_epoch(epoch)
        expected = plain.train_epoch(plain_loader)
        stats = trainer.train_epoch(loader)
        assert (stats.loss, stats.accuracy, stats.samples) == (expected.loss, expected.accuracy, expected.samples)
        assert loader._destination is None  # let go at the end of the epoch
    # Each epoch: the first batch comes in new tensors (copied in; in epoch 0 it is also the one captured), the
    # next three straight in the graph's inputs; the smaller last batch runs eagerly (no replay).
    assert received == [False, True, True, True] * 2
    for p_plain, p_graph in zip(plain.model.parameters(), trainer.model.parameters(), strict=True):
        assert torch.equal(p_plain, p_graph)
    # The sums an epoch returns with are its own: later replays add to the graph's, not to a past epoch's.
    progress = EpochProgress.start(torch.device("cpu"))
    trainer.train_epoch(loader, progress=progress)
    done = progress.to_dict()
    trainer.train_step(*next(iter(loader)))
    assert progress.to_dict() == done and progress.loss_sum is not trainer.graphed_step.loss_sum


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
    eager_loader, graph_loader = DeviceLoader(data, 32, **options), DeviceLoader(data, 32, **options)
    speed = dict(compile=True, amp_dtype=torch.bfloat16) if fast else {}
    eager, graphed = _trainers(opt="adam", lr=1e-3, channels_last=True, fused_optimizer=True, **speed)
    tolerance = dict(rtol=2e-2, atol=2e-3) if fast else dict(rtol=1e-4, atol=1e-5)
    for epoch in (0, 1):
        eager_loader.set_epoch(epoch)
        graph_loader.set_epoch(epoch)
        expected, stats = eager.train_epoch(eager_loader), graphed.train_epoch(graph_loader)
        assert stats.samples == expected.samples and stats.accuracy == pytest.approx(expected.accuracy, abs=2.0)
        assert stats.loss == pytest.approx(expected.loss, rel=tolerance["rtol"])
    assert graphed.graph_status == "captured" and graph_loader._destination is None
    for (name, p_e), p_g in zip(eager.model.named_parameters(), graphed.model.parameters(), strict=True):
        torch.testing.assert_close(p_g, p_e, **tolerance, msg=name)

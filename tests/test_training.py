"""Training: the reference path learns like the tutorial, and the fast path computes the same thing."""

import dataclasses
import io
import json
import shutil
import sys

import pytest
import torch
from helpers import Unpicklable, assert_one_line_error, run_cli

from fastcnn.checkpoint import RunRecord, checkpoint_file, load_checkpoint
from fastcnn.cli import main
from fastcnn.config import TrainConfig, preset_defaults, resolve
from fastcnn.data import DeviceLoader, TorchLoader, load_dataset
from fastcnn.engine import EpochProgress, Trainer
from fastcnn.errors import FastcnnError
from fastcnn.fault_injection import TEST_FAULT_ENV
from fastcnn.models import build_model, get_spec
from fastcnn.run_folder import remove_run_outputs, run_outputs
from fastcnn.train import StepLosses, run_training, step_loss_every


def train_summary(args, tmp_path, capsys):
    code = main(["train", "--no-progress", "--output", str(tmp_path / "run"), *args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.mark.slow
def test_reference_preset_reaches_97_percent_on_mnist_in_one_epoch(data_root, tmp_path, capsys):
    summary = train_summary(["--preset", "reference", "--data-dir", str(data_root)], tmp_path, capsys)
    assert summary["config"]["loader"] == "torch" and summary["config"]["reference_model"]
    assert summary["test_acc"] >= 97.0, summary["test_acc"]


@pytest.mark.slow
def test_fast_preset_reaches_97_percent_on_mnist_in_one_epoch(data_root, tmp_path, capsys):
    summary = train_summary(["--data-dir", str(data_root)], tmp_path, capsys)
    assert summary["config"]["loader"] == "device" and summary["config"]["amp"]
    assert summary["test_acc"] >= 97.0, summary["test_acc"]


@pytest.mark.parametrize("name", ["simplecnn", "lenet"])
def test_fast_path_tracks_reference_loss_for_20_steps(name, data_root):
    """Same initial weights, same batch order: fastcnn's model + DeviceLoader + channels-last (fp32, eager)
    follows the tutorial program's losses within 1e-5."""
    spec = get_spec(name)
    recipe = spec.recipe
    train = load_dataset(recipe.dataset, True, root=data_root, download=False).subset(20 * recipe.batch_size)
    torch.manual_seed(0)
    reference_model = build_model(name, reference_impl=True)
    fast_model = build_model(name)
    fast_model.load_state_dict(reference_model.state_dict())
    device = torch.device("cpu")
    reference = Trainer(reference_model, device=device, opt=recipe.opt, lr=recipe.lr)
    fast = Trainer(fast_model, device=device, opt=recipe.opt, lr=recipe.lr, channels_last=True)
    options = dict(seed=3, mean=recipe.mean, std=recipe.std)
    reference_batches = TorchLoader(train, recipe.batch_size, **options)
    fast_batches = DeviceLoader(train, recipe.batch_size, channels_last=True, **options)
    steps = 0
    for (x_ref, y_ref), (x_fast, y_fast) in zip(reference_batches, fast_batches, strict=True):
        loss_ref, _ = reference.train_step(x_ref, y_ref)
        loss_fast, _ = fast.train_step(x_fast, y_fast)
        assert abs(loss_ref.item() - loss_fast.item()) <= 1e-5, (steps, loss_ref.item(), loss_fast.item())
        steps += 1
    assert steps == 20


def test_preset_resolution_and_overrides():
    fast = resolve(TrainConfig(device="cpu"))
    assert (fast.loader, fast.amp, fast.amp_dtype, fast.channels_last, fast.compile) == (
        "device", True, "bfloat16", True, False)
    ref = resolve(TrainConfig(preset="reference", device="cpu"))
    assert (ref.loader, ref.amp, ref.channels_last, ref.kernel, ref.reference_model) == (
        "torch", False, False, "aten", True)
    custom = resolve(TrainConfig(device="cpu", amp=False, loader="torch", batch_size=7, model="lenet"))
    assert (custom.amp, custom.loader, custom.batch_size, custom.dataset, custom.lr) == (
        False, "torch", 7, "fashion-mnist", 0.01)


def test_fused_optimizer_is_on_in_the_fast_preset_only_and_a_flag_overrides_it(capsys):
    assert preset_defaults("fast", "cuda")["fused_optimizer"] is True
    assert preset_defaults("fast", "cpu")["fused_optimizer"] is True
    assert preset_defaults("reference", "cuda")["fused_optimizer"] is False  # the tutorials' torch default
    assert resolve(TrainConfig(device="cpu", fused_optimizer=False)).fused_optimizer is False
    assert resolve(TrainConfig(device="cpu", preset="reference", fused_optimizer=True)).fused_optimizer is True
    assert main(["train", "--help"]) == 0
    assert "--fused-opt, --no-fused-opt" in capsys.readouterr().out


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_fused_optimizer_follows_the_default_implementation(opt):
    # The twin test of the fused optimizer: the same update rounded in another order, so after several steps the
    # parameters agree to fp32 roundoff, not bitwise.
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(build_model("simplecnn", kernel="torch"), device=torch.device("cpu"), opt=opt, lr=1e-3,
                          fused_optimizer=fused)
        assert trainer.optimizer.param_groups[0]["fused"] is (True if fused else None)
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            trainer.train_step(torch.randn(16, 1, 28, 28, generator=generator),
                               torch.randint(0, 10, (16,), generator=generator))
        results.append([p.detach().clone() for p in trainer.model.parameters()])
    for default, fused in zip(*results, strict=True):
        torch.testing.assert_close(fused, default, rtol=1e-5, atol=1e-6)


def test_training_on_synthetic_data_learns(tmp_path, capsys):
    summary = train_summary(["--dataset", "synthetic", "--synthetic-size", "3000,500", "--epochs", "2"], tmp_path,
                            capsys)
    assert summary["test_acc"] > 80.0


SMALL_RUN = ["--dataset", "synthetic", "--synthetic-size", "256,128", "--no-progress"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished one-epoch run folder, shared by the checkpoint-reading tests (they only read it)."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *SMALL_RUN, "--output", str(folder)]) == 0
    return folder


def test_a_checkpoint_is_read_from_its_file_or_its_run_folder(finished_run):
    from_file = load_checkpoint(finished_run / "checkpoint.pt")
    from_folder = load_checkpoint(finished_run)
    assert checkpoint_file(finished_run) == finished_run / "checkpoint.pt"
    assert from_folder["epoch"] == from_file["epoch"] == 1
    assert from_folder["model"].keys() == from_file["model"].keys()


def test_resume_takes_a_run_folder(finished_run, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    capsys.readouterr()
    assert main(["train", "--resume", str(folder), "--epochs", "2", "--no-progress"]) == 0
    assert load_checkpoint(folder)["epoch"] == 2
    assert json.loads((folder / "summary.json").read_text())["epochs"] == 2


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize("make, words", [
    ("missing", ["no such file or folder", "run folder"]),
    ("empty folder", ["holds no checkpoint.pt", "run folder"]),
    ("repeated runs", ["repeated runs", "run1"]),
    ("empty file", ["empty", "train again"]),
    ("truncated", ["truncated or damaged", "copy it again"]),
    ("garbage", ["not a readable torch checkpoint", "checkpoint.pt written by"]),
    ("foreign", ["not written by fastcnn"]),
    ("pickled", ["pickled Python objects"]),
])
def test_every_unusable_checkpoint_is_one_line_saying_what_to_do(make, words, finished_run, tmp_path, capsys):
    path = tmp_path / "given"
    if make == "empty folder":
        path.mkdir()
    elif make == "repeated runs":
        shutil.copytree(finished_run, path / "run1")
    elif make == "empty file":
        path.write_bytes(b"")
    elif make == "truncated":
        path.write_bytes(truncated((finished_run / "checkpoint.pt").read_bytes()))
    elif make == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif make == "foreign":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    elif make == "pickled":
        torch.save({"format": "fastcnn-checkpoint-v1", "model_name": "simplecnn", "payload": Unpicklable()}, path)
    with pytest.raises(FastcnnError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert str(path) in message and "\n" not in message and len(message) < 240, message
    for word in words:
        assert word in message, (word, message)
    # the same refusal reaches the user of `train --resume` as one error line, before anything is written
    code, _, err = run_cli(["train", "--resume", str(path), "--no-progress"], capsys)
    assert code == 1
    assert_one_line_error(err, str(path), *words)


class RecordingStream(io.StringIO):
    """stdout for a run, remembering for every line written how far the run was: how many rows metrics.jsonl held
    and whether summary.json existed (it is written at the very end)."""

    def __init__(self, run_folder):
        super().__init__()
        self.run_folder, self.lines, self.flushes = run_folder, [], 0

    def write(self, text):
        metrics = self.run_folder / "metrics.jsonl"
        rows = metrics.read_text().count("\n") if metrics.exists() else 0
        for line in text.splitlines():
            self.lines.append((line, rows, (self.run_folder / "summary.json").exists()))
        return super().write(text)

    def flush(self):
        self.flushes += 1


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_each_epoch_line_is_printed_as_its_epoch_ends_and_once(tmp_path):
    folder = tmp_path / "run"
    stream = RecordingStream(folder)
    cfg = TrainConfig(dataset="synthetic", synthetic_size=(256, 128), epochs=3, output=str(folder), progress=False)
    summary = run_training(cfg, stream=stream)
    epoch_lines = [(line, rows, done) for line, rows, done in stream.lines if line.split()[:1] in (["1"], ["2"], ["3"])]
    # epoch N's line comes right after its row reached metrics.jsonl, long before the summary
    assert [(line.split()[0], rows, done) for line, rows, done in epoch_lines] == [
        ("1", 1, False), ("2", 2, False), ("3", 3, False)]
    assert sum(line.split()[:3] == ["epoch", "train", "loss"] for line, _, _ in stream.lines) == 1  # one header
    assert stream.lines[0][0].startswith("training on synthetic")
    first = epoch_lines[0][0].split()
    history = summary_history(folder)
    assert first[:7] == [f"{history[0]['epoch']}", f"{history[0]['train_loss']:.4f}", f"{history[0]['train_acc']:.2f}",
                         f"{history[0]['test_loss']:.4f}", f"{history[0]['test_acc']:.2f}",
                         f"{history[0]['epoch_seconds']:.2f}", f"{history[0]['images_per_second']:,.0f}"]
    assert ":" in first[7] and epoch_lines[-1][0].split()[7] == "-"  # the run's time left; none after the last
    assert stream.flushes >= 4  # the opening line and every epoch line are flushed when written
    printed = [line for line, _, _ in stream.lines]
    result = [i for i, line in enumerate(printed) if line.startswith(f"simplecnn on synthetic: test acc "
                                                                     f"{summary['test_acc']:.2f}%")]
    assert len(result) == 1 and result[0] > printed.index(epoch_lines[-1][0])  # the summary once, at the end
    assert sum(line.split()[:1] == ["1"] for line in printed) == 1  # no table repeating the epochs at the end


def summary_history(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_the_progress_bar_counts_the_runs_steps_with_its_eta_on_a_terminal_only(tmp_path, monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    cfg = TrainConfig(dataset="synthetic", synthetic_size=(256, 128), epochs=2, output=str(tmp_path / "tty"))
    run_training(cfg, stream=io.StringIO())
    bar = terminal.getvalue()
    assert "epoch 1/2" in bar and "epoch 2/2" in bar and "step 8/8" in bar and "ETA " in bar, bar[-500:]
    monkeypatch.undo()
    capsys.readouterr()
    run_training(dataclasses.replace(cfg, output=str(tmp_path / "file")))  # stderr is no terminal here
    assert capsys.readouterr().err == ""


def test_resume_says_at_which_epoch_and_step_it_picks_up(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    monkeypatch.setenv(TEST_FAULT_ENV, "0:3:SIGINT")  # the run stops itself after its third step
    code, _, err = run_cli(["train", *SMALL_RUN, "--epochs", "2", "--output", str(folder)], capsys)
    assert code == 130 and "checkpoint saved" in err
    monkeypatch.delenv(TEST_FAULT_ENV)
    code, out, err = run_cli(["train", "--resume", str(folder), "--no-progress"], capsys)
    assert code == 0, err
    assert f"resuming {folder / 'checkpoint.pt'} at epoch 1/2, step 3/4 (3/8 steps done)" in out.splitlines()[1]


def test_overwrite_removes_the_replaced_runs_outputs_and_nothing_else(finished_run, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    assert main(["eval", str(folder)]) == 0  # eval.json and confusion.png beside the old model
    (folder / ".checkpoint.pt.x1y2.tmp").write_bytes(b"a write killed before its rename")
    (folder / "notes.txt").write_text("mine")
    (folder / "plots").mkdir()
    (folder / "plots" / "curves.png").write_bytes(b"mine too")
    assert main(["train", *SMALL_RUN, "--seed", "1", "--output", str(folder), "--overwrite"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint.pt", "curves.png", "metrics.jsonl", "notes.txt", "plots", "summary.json"]
    assert (folder / "plots" / "curves.png").read_bytes() == b"mine too"
    capsys.readouterr()
    code, _, err = run_cli(["eval", str(folder)], capsys)  # no stale eval.json left to refuse over
    assert code == 0, err


def test_run_outputs_are_the_files_train_and_eval_write_in_the_folder_and_its_repeated_runs(tmp_path):
    for path in ("summary.json", "eval.json", ".summary.json.abc.tmp", "notes.txt", "run1/checkpoint.pt",
                 "run1/metrics.jsonl", "run1/mine.txt", "run2/summary.json", "run7/photo.png", "runs/summary.json"):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text("x")
    found = sorted(str(p.relative_to(tmp_path)) for p in run_outputs(tmp_path))
    assert found == [".summary.json.abc.tmp", "eval.json", "run1/checkpoint.pt", "run1/metrics.jsonl",
                     "run2/summary.json", "summary.json"]
    remove_run_outputs(tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["notes.txt", "run1", "run1/mine.txt", "run7", "run7/photo.png", "runs", "runs/summary.json"]


def test_the_run_layers_names_each_have_one_home():
    import fastcnn.build
    import fastcnn.evaluate
    import fastcnn.run_folder
    import fastcnn.train

    # No re-exports left from the re-cut, no second name for the warm-up, no copied constants.
    assert not hasattr(fastcnn.train, "EVAL_BATCH_SIZE") and not hasattr(fastcnn.build, "warm_up")
    assert callable(fastcnn.build.pay_one_time_costs) and callable(Trainer.warm_up)
    assert not hasattr(Trainer, "replayed_last_step") and not hasattr(Trainer, "graphed_step")
    assert fastcnn.evaluate.EVAL_BATCH_SIZE is fastcnn.build.EVAL_BATCH_SIZE
    assert fastcnn.evaluate.EVAL_FILES is fastcnn.run_folder.EVAL_FILES


class DeviceSum:
    """An epoch's running loss sum as the device holds it, counting what StepLosses does with it: a copy on the
    device is allowed (``clone``), a read on the host (a sync with the device) is not."""

    def __init__(self, progress):
        self.progress, self.copied_at = progress, []

    def detach(self):
        return self

    def clone(self):
        self.copied_at.append(self.progress.batches)
        return torch.tensor(float(self.progress.batches) * 2.0, dtype=torch.float64)  # each step: loss 2 / image

    def _host_read(self, *args):
        raise AssertionError("StepLosses read the loss sum on the host during the epoch")

    __float__ = __int__ = __bool__ = item = tolist = _host_read


def test_step_losses_copy_the_sum_every_nth_step_on_the_device_and_read_it_once_at_the_end():
    assert [step_loss_every(steps) for steps in (1, 19, 40, 100, 999, 1000, 5000)] == [1, 1, 2, 5, 49, 50, 50]
    rows = []
    losses = StepLosses(rows, steps_per_epoch=103)  # every 5th step, and the 103rd
    progress = EpochProgress(None, None)
    progress.loss_sum = DeviceSum(progress)
    losses.start(2, progress)
    for _ in range(103):
        progress.batches += 1
        progress.samples += 1
        losses.after_step(progress)  # between the copies, a step costs StepLosses nothing on the device
    assert progress.loss_sum.copied_at == [0, *range(5, 101, 5), 103] and rows == []
    losses.flush()  # the one host read: the copies' values, all at once
    assert [row["epoch"] for row in rows] == pytest.approx([2 + b / 103 for b in (*range(5, 101, 5), 103)])
    assert [row["train_loss"] for row in rows] == pytest.approx([2.0] * 21)


def test_an_old_checkpoint_without_step_losses_keeps_its_epochs_as_its_curve():
    state = dict(history=[dict(epoch=1, train_loss=0.5), dict(epoch=2, train_loss=0.25)], train_seconds=1.0,
                 epoch=2, batch=0)
    assert RunRecord.from_state(state).step_losses == [dict(epoch=1, train_loss=0.5), dict(epoch=2, train_loss=0.25)]
    rows = [dict(epoch=0.5, train_loss=0.7), dict(epoch=1.0, train_loss=0.3)]
    record = RunRecord.from_state(dict(state, step_losses=rows))
    assert record.step_losses == rows and record.to_state()["step_losses"] == rows


def epoch_mean(rows, first, last, samples_per_step):
    """The sample-weighted mean of the step-loss rows between fractional epochs ``first`` (excluded) and ``last``,
    with each row covering the steps since the row before."""
    total = count = 0.0
    previous = first
    for row in rows:
        if first < row["epoch"] <= last:
            weight = round((row["epoch"] - previous) * 40) * samples_per_step
            total, count, previous = total + row["train_loss"] * weight, count + weight, row["epoch"]
    return total / count


STEPPED_RUN = ["--dataset", "synthetic", "--synthetic-size", "1280,128", "-b", "32", "--no-progress"]  # 40 steps


@pytest.fixture
def plotted(monkeypatch):
    """The keyword arguments the run's curves.png was drawn with (the real plot still runs)."""
    import fastcnn.train

    kwargs_seen = {}
    real_plot = fastcnn.train.plot_curves
    monkeypatch.setattr(fastcnn.train, "plot_curves",
                        lambda *args, **kwargs: kwargs_seen.update(kwargs) or real_plot(*args, **kwargs))
    return kwargs_seen


def test_a_one_epoch_run_draws_its_training_loss_step_by_step(tmp_path, plotted):
    folder = tmp_path / "run"
    assert main(["train", *STEPPED_RUN, "--output", str(folder)]) == 0
    rows = load_checkpoint(folder)["step_losses"]
    assert [row["epoch"] for row in rows] == pytest.approx([step / 40 for step in range(2, 41, 2)])  # every 2nd
    assert plotted["step_losses"] == rows and (folder / "curves.png").read_bytes()[:4] == b"\x89PNG"
    history = summary_history(folder)
    assert epoch_mean(rows, 0, 1, 32) == pytest.approx(history[0]["train_loss"], rel=1e-9)


def test_a_stopped_and_resumed_run_keeps_its_step_losses_and_counts_every_step_once(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    monkeypatch.setenv(TEST_FAULT_ENV, "0:7:SIGINT")  # between two rows (every 2nd step): a row of its own
    code, _, err = run_cli(["train", *STEPPED_RUN, "--epochs", "2", "--output", str(folder)], capsys)
    assert code == 130, err
    assert [row["epoch"] for row in load_checkpoint(folder)["step_losses"]] == pytest.approx([2 / 40, 4 / 40, 6 / 40,
                                                                                             7 / 40])
    monkeypatch.delenv(TEST_FAULT_ENV)
    code, _, err = run_cli(["train", "--resume", str(folder), "--no-progress"], capsys)
    assert code == 0, err
    rows = load_checkpoint(folder)["step_losses"]
    assert [row["epoch"] for row in rows] == pytest.approx(
        [2 / 40, 4 / 40, 6 / 40, 7 / 40, *(step / 40 for step in range(8, 81, 2))])
    history = summary_history(folder)
    for epoch in (0, 1):
        assert epoch_mean(rows, epoch, epoch + 1, 32) == pytest.approx(history[epoch]["train_loss"], rel=1e-9)


def test_eval_every_points_reach_the_curves(tmp_path, plotted):
    folder = tmp_path / "run"
    assert main(["train", *STEPPED_RUN, "--eval-every", "10", "--output", str(folder)]) == 0
    evals = json.loads((folder / "summary.json").read_text())["evals"]
    assert [round(row["epoch"], 4) for row in plotted["evals"]] == [0.25, 0.5, 0.75, 1.0]
    assert [row["test_acc"] for row in plotted["evals"]] == [row["test_acc"] for row in evals]

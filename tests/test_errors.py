"""Bad input: one line `fastcnn: error: ...` on stderr, a non-zero exit, nothing left behind or lost."""

import os
import signal

import pytest
import torch
from helpers import Unpicklable, assert_one_line_error

from fastcnn.cli import main
from fastcnn.engine import Trainer

SMALL = ["--dataset", "synthetic", "--synthetic-size", "640,128", "--no-progress"]


def run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def mnist_copy(tmp_path, data_root, *, drop=None, corrupt=None):
    """A data folder with links to the real MNIST files, one of them missing or replaced by broken bytes."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        if name == drop:
            continue
        source = data_root / "MNIST" / "raw" / name
        if corrupt and name in corrupt:
            (raw / name).write_bytes(corrupt[name](source.read_bytes()))
        else:
            os.symlink(source, raw / name)
    return tmp_path / "data"


def test_missing_data_folder(tmp_path, capsys):
    code, err = run(["train", "--data-dir", str(tmp_path / "nowhere"), "--no-download", "--no-progress"], capsys)
    assert code == 1
    assert_one_line_error(err, "does not exist", "--data-dir")


def test_missing_data_with_failed_download_leaves_nothing_behind(tmp_path, capsys):
    target = tmp_path / "fresh"
    code, err = run(["train", "--data-dir", str(target), "--output", str(tmp_path / "run"), "--no-progress"], capsys)
    if code == 0:
        pytest.skip("this machine can download MNIST")
    assert code == 1
    assert_one_line_error(err, "downloading it failed", "--data-dir")
    assert "Tried http" not in err, err  # the network's reason in a few words, not every mirror torchvision tried
    assert not target.exists() and not (tmp_path / "run").exists()


def test_incomplete_dataset_names_the_missing_file(tmp_path, capsys, data_root):
    root = mnist_copy(tmp_path, data_root, drop="t10k-labels-idx1-ubyte")
    code, err = run(["train", "--data-dir", str(root), "--no-download", "--no-progress"], capsys)
    assert code == 1
    assert_one_line_error(err, "t10k-labels-idx1-ubyte", "missing")


@pytest.mark.parametrize("damage", [
    pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
    pytest.param(lambda data: b"\x00\x00\x07\x07" + data[4:], id="wrong-magic"),
    pytest.param(lambda data: b"", id="empty"),
])
def test_corrupt_idx_file(tmp_path, capsys, data_root, damage):
    root = mnist_copy(tmp_path, data_root, corrupt={"t10k-images-idx3-ubyte": damage})
    code, err = run(["train", "--data-dir", str(root), "--no-download", "--no-progress",
                     "--output", str(tmp_path / "run")], capsys)
    assert code == 1
    assert_one_line_error(err, "corrupt")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, words", [
    (["--model", "resnet"], ["--model", "resnet"]),
    (["--dataset", "cifar"], ["--dataset", "cifar"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["-b", "-5"], ["--batch-size"]),
    (["-b", "100000000"], ["--batch-size"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--epochs", "-1"], ["--epochs"]),
    (["--lr", "0"], ["--lr"]),
    (["--lr", "-0.1"], ["--lr"]),
    (["--lr", "nan"], ["--lr"]),
    (["--epochs", "two"], ["--epochs"]),
    (["--amp-dtype", "float16", "--device", "cpu"], ["float16"]),
])
def test_bad_arguments_exit_2(args, words, capsys, tmp_path):
    code, err = run(["train", *SMALL, "--output", str(tmp_path / "run"), *args], capsys)
    assert code == 2
    assert_one_line_error(err, *words)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_gpu(capsys):
    code, err = run(["train", *SMALL, "--device", "cuda"], capsys)
    assert code == 2
    assert_one_line_error(err, "--device cuda", "no CUDA GPU")


def test_unavailable_feature_fails_clearly(capsys):
    code, err = run(["train", *SMALL, "--device", "cpu", "--cuda-graph"], capsys)
    assert code == 2
    assert_one_line_error(err, "--cuda-graph")


@pytest.mark.parametrize("content, words", [
    (None, ["no such file"]),
    (b"this is not a checkpoint", ["not a readable torch checkpoint"]),
    (b"not a checkpoint at all", ["not a readable torch checkpoint"]),  # torch says "weights_only load failed"
])
def test_unreadable_resume_file(tmp_path, capsys, content, words):
    path = tmp_path / "ckpt.pt"
    if content is not None:
        path.write_bytes(content)
    code, err = run(["train", *SMALL, "--resume", str(path)], capsys)
    assert code == 1
    assert_one_line_error(err, *words)


def test_checkpoint_with_pickled_objects_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "fastcnn-checkpoint-v1", "model_name": "simplecnn", "payload": Unpicklable()}, path)
    code, err = run(["train", *SMALL, "--resume", str(path)], capsys)
    assert code == 1
    assert_one_line_error(err, "pickled")


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--output", str(out)]) == 0
    capsys.readouterr()
    code, err = run(["train", *SMALL, "--model", "lenet", "--resume", str(out / "checkpoint.pt"), "--epochs", "2"],
                    capsys)
    assert code == 1
    assert_one_line_error(err, "simplecnn", "lenet")


def test_finished_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--output", str(out)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = run(["train", *SMALL, "--output", str(out), "--seed", "5"], capsys)
    assert code == 2
    assert_one_line_error(err, "already holds a run", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["train", *SMALL, "--output", str(out), "--seed", "5", "--overwrite"]) == 0


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_step = Trainer.train_step
    calls = {"n": 0}

    def poisoned_step(self, images, labels):
        calls["n"] += 1
        loss, correct = real_step(self, images, labels)
        return (loss * float("nan"), correct) if calls["n"] > 15 else (loss, correct)

    monkeypatch.setattr(Trainer, "train_step", poisoned_step)
    code, err = run(["train", *SMALL, "-b", "64", "--epochs", "3", "--output", str(out)], capsys)
    assert code == 1
    assert_one_line_error(err, "nan", "epoch 1", "checkpoint")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "summary.json").exists()


def test_nan_in_the_first_epoch_leaves_no_folder(tmp_path, capsys, monkeypatch):
    real_step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step",
                        lambda self, x, y: (lambda loss, hits: (loss * float("nan"), hits))(*real_step(self, x, y)))
    code, err = run(["train", *SMALL, "--output", str(tmp_path / "run")], capsys)
    assert code == 1
    assert_one_line_error(err, "nothing was saved")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_writes_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path, capsys, monkeypatch,
                                                                               signum, exit_code):
    args = [*SMALL, "-b", "32", "--epochs", "2", "--no-amp"]
    full = tmp_path / "full"
    assert main(["train", *args, "--output", str(full)]) == 0

    real_step = Trainer.train_step
    calls = {"n": 0}

    def step_then_signal(self, images, labels):
        calls["n"] += 1
        result = real_step(self, images, labels)
        if calls["n"] == 27:  # in the second epoch (20 batches per epoch)
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    cut = tmp_path / "cut"
    code, err = run(["train", *args, "--output", str(cut)], capsys)
    assert code == exit_code
    assert "checkpoint saved" in err
    state = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) == (1, 7)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(["train", "--resume", str(cut / "checkpoint.pt"), "--no-progress"]) == 0
    finished = torch.load(cut / "checkpoint.pt", weights_only=True)
    reference = torch.load(full / "checkpoint.pt", weights_only=True)
    for key in reference["model"]:
        assert torch.equal(finished["model"][key], reference["model"][key]), key
    # a row per step (20 a epoch), the stop's among them: the resumed run's curve is the uninterrupted one's
    assert len(reference["step_losses"]) == 40 and finished["step_losses"] == reference["step_losses"]
    assert (cut / "metrics.jsonl").read_text().count("\n") == 2


def test_resume_can_extend_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--output", str(out)]) == 0
    code, err = run(["train", "--resume", str(out / "checkpoint.pt"), "--no-progress"], capsys)
    assert code == 2
    assert_one_line_error(err, "already finished", "--epochs")
    assert main(["train", "--resume", str(out / "checkpoint.pt"), "--epochs", "2", "--no-progress"]) == 0
    assert (out / "metrics.jsonl").read_text().count("\n") == 2


def test_existing_file_as_output(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    code, err = run(["train", *SMALL, "--output", str(target)], capsys)
    assert code == 2
    assert_one_line_error(err, "not a directory")
    assert target.read_text() == "keep me"


def test_debug_shows_the_traceback(tmp_path):
    from fastcnn.errors import DatasetError

    with pytest.raises(DatasetError):
        main(["train", "--data-dir", str(tmp_path / "none"), "--no-download", "--debug", "--no-progress"])




def test_resume_cannot_stretch_a_onecycle_schedule(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--sched", "onecycle", "--output", str(out)]) == 0
    capsys.readouterr()
    code, err = run(["train", "--resume", str(out / "checkpoint.pt"), "--epochs", "2", "--no-progress"], capsys)
    assert code == 2
    assert_one_line_error(err, "onecycle", "same --epochs")


def test_warm_up_does_not_step_the_schedule():
    from fastcnn.models import build_model

    trainer = Trainer(build_model("simplecnn"), device=torch.device("cpu"), schedule="onecycle", total_steps=2)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(10, (4,))
    lr_before = trainer.optimizer.param_groups[0]["lr"]
    trainer.warm_up([(x, y), (x[:2], y[:2])], [(x, y)])  # 6 optimizer steps, more than the schedule's 2
    assert trainer.scheduler.last_epoch == 0 and trainer.optimizer.param_groups[0]["lr"] == lr_before
    trainer.train_step(x, y)
    trainer.train_step(x, y)


def test_results_into_a_missing_folder_are_refused_before_measuring(tmp_path, capsys):
    code, err = run(["bench", "--json", str(tmp_path / "missing" / "b.json")], capsys)
    assert code == 2
    assert_one_line_error(err, "does not exist")


def test_nproc_checks_arguments_once_before_starting_processes(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fastcnn", "train", "--nproc", "2", *SMALL, "--epochs", "0",
                             "--output", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--epochs" in result.stderr
    result = subprocess.run([sys.executable, "-m", "fastcnn", "train", "--nproc", "2", *SMALL, "--runs", "2",
                             "--output", str(tmp_path / "y")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--runs" in result.stderr

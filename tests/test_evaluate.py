"""`fastcnn eval`: the checkpoint's model, evaluated as the run evaluated it, gives the run's numbers, and the
per-class accuracies and the confusion matrix agree with them and with the data."""

import json

import pytest
import torch
from helpers import Unpicklable, assert_one_line_error, run_cli

from fastcnn import evaluate
from fastcnn.cli import main
from fastcnn.data import load_dataset

SYNTHETIC = ["--dataset", "synthetic", "--synthetic-size", "640,128", "--no-progress"]


def run_eval(argv, capsys):
    """``fastcnn eval ARGV`` through the real CLI: (exit code, stdout, stderr)."""
    return run_cli(["eval", *argv], capsys)


def train(tmp_path_factory, *args):
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--output", str(out), *args]) == 0
    return out, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """simplecnn, fast preset (device loader, bf16 autocast, channels-last on the CPU), synthetic data."""
    return train(tmp_path_factory, *SYNTHETIC)


def check_consistent(result, labels):
    """Confusion rows are the true classes' counts, trace/total the accuracy, per-class rows its diagonal."""
    confusion = torch.tensor(result["confusion"])
    classes = len(result["classes"])
    assert confusion.shape == (classes, classes)
    assert confusion.sum(1).tolist() == torch.bincount(labels, minlength=classes).tolist()
    assert result["samples"] == labels.numel() == int(confusion.sum())
    assert result["correct"] == int(confusion.trace())
    assert result["accuracy"] == pytest.approx(100.0 * int(confusion.trace()) / labels.numel(), abs=1e-12)
    for index, row in enumerate(result["per_class"]):
        assert (row["index"], row["name"]) == (index, result["classes"][index])
        assert row["samples"] == int(confusion[index].sum()) and row["correct"] == int(confusion[index, index])
        if row["samples"]:
            assert row["accuracy"] == pytest.approx(100.0 * row["correct"] / row["samples"])
        predicted = int(confusion[:, index].sum())
        assert row["precision"] == (pytest.approx(100.0 * row["correct"] / predicted) if predicted else None)


def test_eval_reproduces_the_runs_test_accuracy_and_loss(fast_run, tmp_path, capsys):
    run, summary = fast_run
    code, out, err = run_eval([str(run / "checkpoint.pt"), "--output", str(tmp_path / "ev")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert abs(result["accuracy"] - summary["test_acc"]) <= 1e-9
    assert abs(result["loss"] - summary["test_loss"]) <= 1e-9
    assert result["settings"]["amp"] and result["settings"]["channels_last"]
    assert (result["model"], result["dataset"], result["device"]) == ("simplecnn", "synthetic", "cpu")
    assert result["versions"]["torch"] == torch.__version__ and result["checkpoint"] == str(run / "checkpoint.pt")
    test_set = load_dataset("synthetic", False, synthetic_size=(640, 128), seed=0)
    check_consistent(result, test_set.labels)
    png = (tmp_path / "ev" / "confusion.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert f"accuracy {summary['test_acc']:.2f}%" in out and "confusion matrix" in out and "per class" in out


@pytest.mark.parametrize("args", [
    ["--preset", "reference", "--model", "lenet"],  # torch loader and the tutorial's own class, fp32 NCHW
    ["--model", "lenet"],
])
def test_eval_matches_other_presets_and_models(args, tmp_path_factory, capsys):
    run, summary = train(tmp_path_factory, *SYNTHETIC, *args)
    code, _, err = run_eval([str(run / "checkpoint.pt")], capsys)  # default --output: the checkpoint's folder
    assert code == 0, err
    result = json.loads((run / "eval.json").read_text())
    assert (run / "confusion.png").is_file()
    assert abs(result["accuracy"] - summary["test_acc"]) <= 1e-9
    assert abs(result["loss"] - summary["test_loss"]) <= 1e-9
    assert result["model"] == "lenet"
    assert result["settings"]["reference_model"] == ("reference" in args)


def test_overrides_are_applied_and_recorded(fast_run, tmp_path, capsys):
    run, summary = fast_run
    code, _, err = run_eval([str(run / "checkpoint.pt"), "--output", str(tmp_path), "--no-amp",
                             "--no-channels-last", "--test-subset", "50", "-b", "7"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["samples"] == 50
    assert result["settings"]["amp"] is False and result["settings"]["amp_dtype"] is None
    assert (result["settings"]["batch_size"], result["settings"]["channels_last"]) == (7, False)
    check_consistent(result, load_dataset("synthetic", False, synthetic_size=(640, 128), seed=0).labels[:50])


def test_existing_results_are_not_overwritten_without_overwrite(fast_run, tmp_path, capsys):
    checkpoint = str(fast_run[0] / "checkpoint.pt")
    assert run_eval([checkpoint, "--output", str(tmp_path)], capsys)[0] == 0
    (tmp_path / "eval.json").write_text("kept")
    code, out, err = run_eval([checkpoint, "--output", str(tmp_path)], capsys)
    assert code == 2 and out == ""
    assert_one_line_error(err, "eval.json", "--overwrite")
    assert (tmp_path / "eval.json").read_text() == "kept"
    (tmp_path / "eval.json").unlink()  # confusion.png alone also blocks
    code, _, err = run_eval([checkpoint, "--output", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line_error(err, "confusion.png")
    code, _, err = run_eval([checkpoint, "--output", str(tmp_path), "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["samples"] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "eval.json"]  # no temporary files


@pytest.mark.parametrize("content, words", [
    ("pickled", ["pickled"]),
    ("foreign", ["not written by fastcnn"]),
    ("garbage", ["not a readable torch checkpoint"]),
    (None, ["no such file"]),
])
def test_unusable_checkpoints_are_refused(content, words, tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    if content == "pickled":
        torch.save({"format": "fastcnn-checkpoint-v1", "model_name": "simplecnn", "payload": Unpicklable()}, path)
    elif content == "foreign":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    elif content == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    code, out, err = run_eval([str(path)], capsys)
    assert code == 1 and out == ""
    assert_one_line_error(err, str(path), *words)
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "confusion.png").exists()


def test_checkpoint_whose_weights_do_not_fit_is_refused(fast_run, tmp_path, capsys):
    state = torch.load(fast_run[0] / "checkpoint.pt", weights_only=True)
    state["model_name"] = "lenet"
    torch.save(state, tmp_path / "checkpoint.pt")
    code, _, err = run_eval([str(tmp_path / "checkpoint.pt")], capsys)
    assert code == 1
    assert_one_line_error(err, "do not fit model lenet")


def test_bad_arguments_exit_2(fast_run, capsys):
    code, _, err = run_eval([str(fast_run[0] / "checkpoint.pt"), "--test-subset", "0"], capsys)
    assert code == 2
    assert_one_line_error(err, "--test-subset")


def test_per_class_and_top_confusions_from_a_known_matrix():
    confusion = torch.tensor([[5, 1, 0], [0, 0, 0], [3, 2, 4]])
    rows = evaluate.per_class_stats(confusion, ["a", "b", "c"])
    assert [(r["samples"], r["correct"]) for r in rows] == [(6, 5), (0, 0), (9, 4)]
    assert rows[0]["accuracy"] == pytest.approx(500 / 6) and rows[1]["accuracy"] is None
    assert rows[0]["precision"] == pytest.approx(500 / 8) and rows[1]["precision"] == 0.0
    assert evaluate.top_confusions(confusion, ["a", "b", "c"]) == [
        dict(true="c", predicted="a", count=3), dict(true="c", predicted="b", count=2),
        dict(true="a", predicted="b", count=1)]


@pytest.mark.parametrize("model, dataset, class7", [("simplecnn", "mnist", "7 - seven"),
                                                     ("lenet", "fashion-mnist", "Sneaker")])
def test_eval_on_real_data_subsets(model, dataset, class7, data_root, tmp_path_factory, capsys):
    run, summary = train(tmp_path_factory, "--model", model, "--data-dir", str(data_root), "--no-download",
                         "--no-progress", "--train-subset", "3000", "--test-subset", "1000")
    code, out, err = run_eval([str(run / "checkpoint.pt")], capsys)
    assert code == 0, err
    result = json.loads((run / "eval.json").read_text())
    assert result["dataset"] == dataset and result["samples"] == 1000
    assert abs(result["accuracy"] - summary["test_acc"]) <= 1e-9 and result["accuracy"] > 60
    assert result["classes"][7] == class7 and class7 in out
    check_consistent(result, load_dataset(dataset, False, root=data_root, download=False).labels[:1000])


def test_a_run_folder_is_taken_for_its_checkpoint_and_gets_the_results(fast_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(fast_run[0], run)
    code, out, err = run_eval([str(run)], capsys)
    assert code == 0, err
    result = json.loads((run / "eval.json").read_text())  # beside the checkpoint, not in the folder above
    assert result["checkpoint"] == str(run / "checkpoint.pt") and (run / "confusion.png").exists()
    assert not (tmp_path / "eval.json").exists()
    assert abs(result["accuracy"] - fast_run[1]["test_acc"]) <= 1e-9


@pytest.mark.parametrize("damage, words", [
    ("empty", ["the file is empty"]),
    ("truncated", ["truncated or damaged"]),
    ("folder", ["holds no checkpoint.pt", "run folder"]),
])
def test_damaged_checkpoints_and_empty_folders_are_one_line(damage, words, fast_run, tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    data = (fast_run[0] / "checkpoint.pt").read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    code, out, err = run_eval([str(tmp_path)], capsys)
    assert code == 1 and out == ""
    assert_one_line_error(err, str(tmp_path), *words)
    assert len(err) < 300, err


def test_another_dataset_is_read_from_fastcnn_data_not_from_the_runs_folder(fast_run, tmp_path, capsys,
                                                                            monkeypatch):
    # A run trained with --data-dir (an image folder, say) recorded that folder; --dataset mnist looks for MNIST
    # where `fastcnn train` would: $FASTCNN_DATA.
    state = torch.load(fast_run[0] / "checkpoint.pt", weights_only=True)
    state["config"]["data_dir"] = str(tmp_path / "the-runs-own-folder")
    torch.save(state, tmp_path / "checkpoint.pt")
    monkeypatch.setenv("FASTCNN_DATA", str(tmp_path / "shared-data"))
    code, _, err = run_eval([str(tmp_path), "--dataset", "mnist", "--no-download"], capsys)
    assert code == 1
    assert_one_line_error(err, str(tmp_path / "shared-data"))
    assert "the-runs-own-folder" not in err
    # the run's own dataset still comes from the run's own folder (synthetic needs none, so it simply works)
    code, _, err = run_eval([str(tmp_path), "--overwrite"], capsys)
    assert code == 0, err


def test_fastcnn_data_serves_eval_of_another_dataset(fast_run, data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTCNN_DATA", str(data_root))
    code, out, err = run_eval([str(fast_run[0] / "checkpoint.pt"), "--dataset", "mnist", "--test-subset", "200",
                               "--no-download", "--output", str(tmp_path)], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["dataset"] == "mnist"


def test_kernel_names_old_and_new_are_recorded_in_the_new_vocabulary(fast_run, tmp_path, capsys):
    checkpoint = str(fast_run[0] / "checkpoint.pt")
    for given, recorded in (("triton", "fused"), ("aten", "aten"), ("torch", "aten")):
        code, _, err = run_eval([checkpoint, "--kernel", given, "--output", str(tmp_path / given)], capsys)
        assert code == 0, err
        assert json.loads((tmp_path / given / "eval.json").read_text())["settings"]["kernel"] == recorded
    state = torch.load(fast_run[0] / "checkpoint.pt", weights_only=True)
    state["config"]["kernel"] = "torch"  # a checkpoint written before the rename
    torch.save(state, tmp_path / "checkpoint.pt")
    code, _, err = run_eval([str(tmp_path / "checkpoint.pt")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["settings"]["kernel"] == "aten"

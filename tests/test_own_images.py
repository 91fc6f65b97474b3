"""`fastcnn train` on a user's own images, end to end: colour and size are kept (a task only colour can tell apart
is learned), the run says what it trains on, eval sees the test split as training did, and every bad input is one
line with nothing half-written."""

import importlib.util
import json
import pathlib

import pytest
import torch
from helpers import assert_one_line_error, real_data_root, run_cli
from PIL import Image

from fastcnn.data import MNIST_NORM
from fastcnn.data.cifar import PY_FOLDER, TEST_BATCHES, TRAIN_BATCHES


def _load_hue_script():
    # The README's reproduction script is the one source of the hue folders, so the test trains on what it writes.
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "hue_folder.py"
    spec = importlib.util.spec_from_file_location("hue_folder_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_HUE_SCRIPT = _load_hue_script()
# Equal luminance (ITU-R 601-2, what converting RGB to grayscale keeps): in grayscale the classes are identical.
HUES = _HUE_SCRIPT.HUES


def hue_folder(root: pathlib.Path, per_class: int = 120, size: int = 32, seed: int = 0) -> pathlib.Path:
    """Squares told apart only by hue, on random gray backgrounds, with the same gray noise in every channel."""
    return _HUE_SCRIPT.write_hue_folder(root, per_class=per_class, size=size, seed=seed)


def test_hue_luminance_is_equal():
    assert len({Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0)) for c in HUES.values()}) == 1


def test_a_colour_only_task_is_learned_in_colour_and_not_in_grayscale(tmp_path, capsys):
    root = hue_folder(tmp_path / "hues")
    code, out, err = run_cli(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--no-progress",
                              "--epochs", "3", "--output", str(tmp_path / "rgb")], capsys)
    assert code == 0, err
    opening = out.splitlines()[0]
    assert opening.startswith(f"training on imagefolder {root}: 300 train / 60 test images, 3 classes (blue, green, "
                              "red), RGB 3x32x32, mean ")
    assert "| model simplecnn | device " in opening and "| preset fast, 3 epochs | output " in opening
    summary = json.loads((tmp_path / "rgb" / "summary.json").read_text())
    assert summary["test_acc"] >= 90, summary["test_acc"]
    assert summary["config"]["channels"] == 3 and summary["config"]["image_size"] == [32, 32]
    assert len(summary["config"]["mean"]) == 3 and summary["config"]["mean"] != list(MNIST_NORM[0]) * 3
    code, out, err = run_cli(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--no-progress",
                              "--epochs", "3", "--channels", "1", "--output", str(tmp_path / "gray")], capsys)
    assert code == 0, err
    assert "grayscale 1x32x32" in out.splitlines()[0]
    assert json.loads((tmp_path / "gray" / "summary.json").read_text())["test_acc"] < 60  # chance: 33%
    # eval rebuilds the test split as training decoded it, and agrees with the run
    code, out, err = run_cli(["eval", str(tmp_path / "rgb" / "checkpoint.pt")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "rgb" / "eval.json").read_text())
    assert result["accuracy"] == pytest.approx(summary["test_acc"]) and result["samples"] == 60


def test_flags_override_the_inferred_shape_and_resume_keeps_it(tmp_path, capsys):
    root = hue_folder(tmp_path / "hues", per_class=12, size=20)
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--no-progress",
                              "--image-size", "24x28", "--model", "lenet", "--output", str(run)], capsys)
    assert code == 0, err
    assert "RGB 3x24x28" in out.splitlines()[0]
    code, out, err = run_cli(["train", "--resume", str(run / "checkpoint.pt"), "--epochs", "2", "--no-progress"],
                             capsys)
    assert code == 0, err
    assert "RGB 3x24x28" in out.splitlines()[0]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["image_shape"] == [3, 24, 28]


def test_synthetic_data_of_any_shape_trains_and_benches(tmp_path, capsys):
    code, out, err = run_cli(["train", "--dataset", "synthetic", "--synthetic-size", "256,64", "--channels", "3",
                              "--image-size", "32", "--no-progress", "--output", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert "256 train / 64 test images, 10 classes (0, 1, 2, 3, ...), RGB 3x32x32" in out.splitlines()[0]
    code, out, err = run_cli(["bench", "--channels", "3", "--image-size", "32", "--synthetic-size", "256,64",
                              "--steps", "2", "--warmup", "1", "--repeats", "1", "--configs", "reference,fast",
                              "--json", str(tmp_path / "bench.json")], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [row["config"] for row in rows] == ["reference", "fast"] and all(r["images_per_second"] > 0 for r in rows)


def test_channels_is_not_read_as_channels_last_and_no_flag_is_abbreviated(capsys):
    from fastcnn.cli import build_parser

    args = build_parser().parse_args(["train", "--channels", "3"])
    assert args.channels == 3 and args.channels_last is None
    args = build_parser().parse_args(["train", "--channels-last", "--image-size", "48x64"])
    assert args.channels_last is True and args.channels is None and args.image_size == (48, 64)
    code, _, err = run_cli(["train", "--channels-l"], capsys)
    assert code == 2
    assert_one_line_error(err, "unrecognized arguments: --channels-l")


@pytest.mark.parametrize("argv, words", [
    (["--channels", "2"], ["argument --channels", "must be 1 (grayscale) or 3 (RGB), got '2'"]),
    (["--image-size", "0"], ["argument --image-size", "at least 1 pixel, got '0'"]),
    (["--image-size", "32x"], ["argument --image-size", "expected N or HxW"]),
    (["--image-size", "4x5x6"], ["expected N or HxW"]),
])
def test_bad_shape_flags_are_one_line(argv, words, capsys, tmp_path):
    code, _, err = run_cli(["train", "--dataset", "synthetic", *argv, "--output", str(tmp_path / "run")], capsys)
    assert code == 2
    assert_one_line_error(err, *words)
    assert not (tmp_path / "run").exists()


def bad_folder(tmp_path, kind) -> pathlib.Path:
    root = tmp_path / "images"
    if kind == "one class":
        for i in range(4):
            Image.new("RGB", (8, 8), (i, 0, 0)).save((root / "cats").mkdir(parents=True, exist_ok=True) or
                                                      root / "cats" / f"{i}.png")
    else:
        hue_folder(root, per_class=6, size=8 if kind == "too small" else 16)
        if kind == "undecodable":
            (root / "red" / "0003.png").write_bytes(b"not an image")
    return root


@pytest.mark.parametrize("kind, code, words", [
    ("one class", 1, ["has one class folder (cats)", "two or more"]),
    ("undecodable", 1, ["0003.png is not a decodable image", "delete or replace it"]),
    ("too small", 2, ["model lenet needs images of at least 16x16 pixels; these are 8x8", "--image-size 16"]),
])
def test_bad_folders_are_one_line_and_leave_nothing_behind(kind, code, words, tmp_path, capsys):
    root = bad_folder(tmp_path, kind)
    run = tmp_path / "run"
    got, out, err = run_cli(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--model", "lenet",
                             "--no-progress", "--output", str(run)], capsys)
    assert got == code, err
    assert_one_line_error(err, *words)
    assert not run.exists() and out == ""


def test_a_cifar_file_that_is_not_one_is_one_line_and_leaves_nothing_behind(tmp_path, capsys):
    folder = tmp_path / "data" / PY_FOLDER
    folder.mkdir(parents=True)
    for name in TRAIN_BATCHES + TEST_BATCHES:
        (folder / name).write_bytes(b"<html>404 Not Found</html>")
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                              "--no-progress", "--output", str(run)], capsys)
    assert code == 1
    assert_one_line_error(err, f"{folder / TRAIN_BATCHES[0]} is not a CIFAR-10 batch", "re-download it")
    assert not run.exists()


@pytest.mark.slow
def test_the_real_cifar10_image_folder_is_rgb_32x32_with_ten_classes(capsys, tmp_path):
    """CIFAR10-images (shared data, 60,000 JPEGs): no shape flags; a subset, one epoch."""

    root = real_data_root()
    folder = root / "CIFAR10-images" if root else None
    if folder is None or not (folder / "train").is_dir():
        pytest.skip("CIFAR10-images not found next to MNIST (FASTCNN_DATA)")
    code, out, err = run_cli(["train", "--dataset", "imagefolder", "--data-dir", str(folder), "--train-subset",
                              "5000", "--test-subset", "1000", "--no-progress", "--output", str(tmp_path / "run")],
                             capsys)
    assert code == 0, err
    opening = out.splitlines()[0]
    assert "5,000 train / 1,000 test images, 10 classes (airplane, automobile, bird, cat, ...), RGB 3x32x32" in opening
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_acc"] > 25  # one epoch of 5,000 images (chance: 10%)

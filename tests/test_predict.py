"""`fastcnn predict`: image files of any size, mode and polarity become MNIST-like inputs, and a model trained
on MNIST classifies them; bad files fail with one line naming them."""

import json

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from PIL import Image

from fastcnn import predict
from fastcnn.cli import main
from fastcnn.data import load_dataset


def run_predict(argv, capsys):
    """``fastcnn predict ARGV`` through the real CLI: (exit code, stdout, stderr)."""
    return run_cli(["predict", *argv], capsys)


COUNT = 40


@pytest.fixture(scope="module")
def mnist_test(data_root):
    """The first COUNT MNIST test images, uint8 (COUNT, 28, 28), and their labels (the first are 7, 2, 1, 0)."""
    test = load_dataset("mnist", False, root=data_root, download=False)
    return test.images[:COUNT, 0].numpy(), test.labels[:COUNT].tolist()


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    assert main(["train", "--data-dir", str(data_root), "--no-download", "--no-progress", "--train-subset", "10000",
                 "--test-subset", "200", "--output", str(out)]) == 0
    return out / "checkpoint.pt"


def scaled(pixels, size=(100, 80)):
    """An MNIST digit (white on black) resized to ``size`` (width, height): another aspect ratio, another scale."""
    return Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC)


def on_paper(pixels, size=(100, 80)):
    """The digit drawn in black on white paper."""
    return Image.fromarray(255 - np.asarray(scaled(pixels, size)))


def on_canvas(pixels, size=(100, 80)):
    """The digit scaled with its aspect ratio kept, on a dark canvas of another shape."""
    side = min(size)
    digit = np.asarray(scaled(pixels, (side, side)))
    canvas = np.zeros(size[::-1], dtype=np.uint8)
    top, left = (size[1] - side) // 2, (size[0] - side) // 2
    canvas[top:top + side, left:left + side] = digit
    return Image.fromarray(canvas)


def transparent(pixels):
    """Black strokes on a transparent canvas, as drawing apps save them."""
    ink = np.asarray(scaled(pixels))
    rgba = np.zeros(ink.shape + (4,), dtype=np.uint8)
    rgba[..., 3] = ink
    return Image.fromarray(rgba, "RGBA")


VARIANTS = {
    "gray_100x80.png": lambda p: scaled(p),
    "gray_canvas_100x80.png": on_canvas,
    "paper_canvas_rgb.jpg": lambda p: Image.fromarray(255 - np.asarray(on_canvas(p, (80, 100)))).convert("RGB"),
    "paper_rgb_100x80.jpg": lambda p: on_paper(p).convert("RGB"),
    "paper_rgba_opaque.png": lambda p: on_paper(p, (64, 64)).convert("RGBA"),
    "transparent_rgba.png": transparent,
    "paper_palette.png": lambda p: on_paper(p, (90, 120)).convert("P"),
    "gray_16bit.png": lambda p: Image.fromarray(np.asarray(scaled(p, (280, 280))).astype(np.uint16) * 257),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_mnist_digits_saved_as_other_files_are_recognized(variant, mnist_test, checkpoint, tmp_path):
    images, labels = mnist_test
    paths = []
    for index, pixels in enumerate(images):
        paths.append(str(tmp_path / f"{index}_{variant}"))
        VARIANTS[variant](pixels).save(paths[-1])
    results = predict.predict_files(checkpoint, paths, top=3)
    correct = sum(r["index"] == digit for r, digit in zip(results, labels, strict=True))
    # The 10k-image, 1-epoch model gets about 94% of MNIST's test set; these files lose little to that.
    mistakes = [(r["path"], digit, r["class"]) for r, digit in zip(results, labels, strict=True) if r["index"] != digit]
    assert correct >= 0.85 * COUNT, mistakes
    for result in results:
        assert len(result["top"]) == 3 and result["top"][0]["index"] == result["index"]
        assert [t["probability"] for t in result["top"]] == sorted((t["probability"] for t in result["top"]),
                                                                   reverse=True)
        assert 0 < result["probability"] <= 1
        # auto polarity: white paper (and black strokes on transparency) is inverted, a dark background is not
        assert result["inverted"] == ("paper" in variant or "transparent" in variant)


def test_preprocessing_gives_back_mnist_digits(mnist_test):
    """A 28x28 MNIST digit is already size-normalized and centered: it comes back (almost) unchanged."""
    for pixels in mnist_test[0]:
        out, inverted = predict.preprocess(Image.fromarray(pixels))
        assert not inverted and out.dtype == np.uint8 and out.shape == (28, 28)
        assert np.abs(out.astype(int) - pixels).mean() < 1.0


def test_digit_is_size_normalized_and_centered_by_center_of_mass(mnist_test):
    canvas = np.zeros((150, 200), dtype=np.uint8)
    canvas[5:61, 120:176] = np.asarray(Image.fromarray(mnist_test[0][3]).resize((56, 56)))  # big, off-center
    out, _ = predict.preprocess(Image.fromarray(canvas))
    rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 == 20  # fitted into the 20x20 box
    mass = out.astype(float)
    center = ((mass.sum(1) * np.arange(28)).sum() / mass.sum(), (mass.sum(0) * np.arange(28)).sum() / mass.sum())
    assert np.allclose(center, 14.0, atol=0.5), center


def test_invert_modes(mnist_test):
    pixels = mnist_test[0][7]
    normal, _ = predict.preprocess(scaled(pixels), invert="no")
    paper = on_paper(pixels)
    auto, inverted = predict.preprocess(paper, invert="auto")
    assert inverted and np.abs(auto.astype(int) - normal).mean() < 2.0
    forced, inverted = predict.preprocess(paper, invert="yes")
    assert inverted and np.array_equal(forced, auto)
    kept, inverted = predict.preprocess(paper, invert="no")
    assert not inverted and not np.array_equal(kept, auto)
    blank, _ = predict.preprocess(Image.new("L", (40, 30), 255))
    assert not blank.any()


def test_command_output_lines_top_and_json(mnist_test, checkpoint, tmp_path, capsys):
    paths = []
    for index in (3, 0):  # a 0 and a 7
        paths.append(str(tmp_path / f"digit{index}.png"))
        on_paper(mnist_test[0][index]).save(paths[-1])
    code, out, err = run_predict([str(checkpoint), *paths], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"{paths[1]}: 7 - seven (") and "  top: " not in out
    code, out, err = run_predict([str(checkpoint), *paths, "--top", "3"], capsys)
    assert code == 0 and all(line.count("%") == 4 for line in out.splitlines()), out
    code, out, err = run_predict([str(checkpoint), *paths, "--top", "2", "--json", "--invert", "yes"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["checkpoint"] == str(checkpoint)
    assert [p["path"] for p in data["predictions"]] == paths
    assert all(len(p["top"]) == 2 and p["inverted"] for p in data["predictions"])
    assert data["predictions"][1]["class"] == "7 - seven"


@pytest.fixture
def bad_files(tmp_path, mnist_test):
    good = tmp_path / "good.png"
    scaled(mnist_test[0][1]).save(good)
    files = {"good": good, "missing": tmp_path / "missing.png", "empty": tmp_path / "empty.png",
             "text": tmp_path / "notes.png", "truncated": tmp_path / "truncated.png", "folder": tmp_path / "dir.png"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("not an image\n")
    files["truncated"].write_bytes(good.read_bytes()[:60])
    files["folder"].mkdir()
    return files


@pytest.mark.parametrize("kind, words", [
    ("missing", ["no such file"]),
    ("empty", ["empty"]),
    ("text", ["not an image"]),
    ("truncated", []),
    ("folder", ["directory"]),
])
def test_unreadable_images_fail_with_one_line_naming_the_file(kind, words, bad_files, checkpoint, capsys):
    code, out, err = run_predict([str(checkpoint), str(bad_files["good"]), str(bad_files[kind])], capsys)
    assert code == 1
    assert out == ""  # every file is read before anything is printed
    assert_one_line_error(err, f"cannot read image {bad_files[kind]}", *words)


def test_bad_checkpoint_and_arguments(bad_files, checkpoint, tmp_path, capsys):
    code, _, err = run_predict([str(tmp_path / "nope.pt"), str(bad_files["good"])], capsys)
    assert code == 1
    assert_one_line_error(err, "no such file")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "foreign.pt")
    code, _, err = run_predict([str(tmp_path / "foreign.pt"), str(bad_files["good"])], capsys)
    assert code == 1
    assert_one_line_error(err, "not written by fastcnn")
    for top in ("0", "11"):
        code, _, err = run_predict([str(checkpoint), str(bad_files["good"]), "--top", top], capsys)
        assert code == 2
        assert_one_line_error(err, "--top")
    code, _, err = run_predict([str(checkpoint), str(bad_files["good"]), "--invert", "maybe"], capsys)
    assert code == 2
    assert_one_line_error(err, "--invert")

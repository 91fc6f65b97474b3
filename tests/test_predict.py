"""`fastcnn predict`: image files of any size, mode and polarity become MNIST-like inputs, and a model trained
on MNIST classifies them; bad files fail with one line naming them."""

import json

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli
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
    # the run folder stands for its checkpoint
    code, out, err = run_predict([str(checkpoint.parent), *paths, "--json"], capsys)
    assert code == 0, err
    by_folder = json.loads(out)
    assert by_folder["checkpoint"] == str(checkpoint)
    assert [p["class"] for p in by_folder["predictions"]] == [p["class"] for p in data["predictions"]]


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
    code, _, err = run_predict([str(tmp_path), str(bad_files["good"])], capsys)  # a folder without a run
    assert code == 1
    assert_one_line_error(err, str(tmp_path), "holds no checkpoint.pt")
    code, out, err = run_predict([str(checkpoint), str(bad_files["good"]), "--kernel", "triton"], capsys)
    assert code == 0 and out.startswith(str(bad_files["good"])), err


# --- every other run: images are prepared the way its training images were (resize to its shape) ---------------


def own_predictions(checkpoint, pixels: torch.Tensor) -> list[int]:
    """The model's own predictions on uint8 (N, C, H, W) tensors, normalized as in training (fp32)."""
    from fastcnn.data.normalization import as_channel_tensor, normalize_uint8
    from fastcnn.evaluate import load_model

    loaded = load_model(checkpoint)
    channels = pixels.shape[1]
    mean = as_channel_tensor(loaded.config["mean"], channels, "cpu")
    std = as_channel_tensor(loaded.config["std"], channels, "cpu")
    with torch.no_grad():
        return loaded.model(normalize_uint8(pixels, mean, std)).argmax(1).tolist()


def export(images: torch.Tensor, folder, suffix=".png") -> list[str]:
    """uint8 (N, C, H, W) tensors saved as image files (lossless PNG by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, pixels in enumerate(images):
        array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
        paths.append(str(folder / f"{index:03d}{suffix}"))
        Image.fromarray(array).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def fashion_checkpoint(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict-fashion") / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--model", "lenet", "--data-dir", str(data_root),
                 "--no-download", "--no-progress", "--train-subset", "3000", "--test-subset", "100",
                 "--output", str(out)]) == 0
    return out / "checkpoint.pt"


def test_fashion_mnist_pngs_are_predicted_as_the_model_predicts_the_test_tensors(data_root, fashion_checkpoint,
                                                                                 tmp_path):
    test = load_dataset("fashion-mnist", False, root=data_root, download=False).subset(60)
    paths = export(test.images, tmp_path)
    results = predict.predict_files(fashion_checkpoint, paths)
    assert [r["index"] for r in results] == own_predictions(fashion_checkpoint, test.images)
    assert all(r["fit"] == "resize" and r["converted"] == [] and not r["inverted"] for r in results)
    right = sum(r["index"] == int(label) for r, label in zip(results, test.labels, strict=True))
    assert right >= 0.5 * len(test)  # a 3000-image, 1-epoch LeNet: about 65% (chance: 10%)
    digit = predict.predict_files(fashion_checkpoint, paths, fit="digit")  # what predict did before: worse
    assert all(r["fit"] == "digit" for r in digit)


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A run on a generated RGB folder (3 classes told apart by colour, 24x20 images): (checkpoint, test split)."""
    from fastcnn.data.imagefolder import load_imagefolder

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 60, 230)}
    for name, colour in colours.items():
        (root / name).mkdir()
        for i in range(60):
            pixels = (np.array(colour) + rng.integers(-40, 41, (24, 20, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    out = root.parent / f"{root.name}-run"
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--no-progress", "--epochs", "2",
                 "--output", str(out)]) == 0
    return out / "checkpoint.pt", load_imagefolder(root, False)


def test_images_exported_from_an_rgb_runs_test_split_are_predicted_as_the_model_predicts_them(colour_run,
                                                                                              tmp_path, capsys):
    checkpoint, test = colour_run
    assert test.images.shape[1:] == (3, 24, 20)
    paths = export(test.images, tmp_path / "png")
    expected = own_predictions(checkpoint, test.images)
    code, out, err = run_predict([str(checkpoint), *paths, "--json"], capsys)
    assert code == 0 and err == "", err
    results = json.loads(out)["predictions"]
    assert [r["index"] for r in results] == expected and [r["class"] for r in results][:1] == [test.classes[
        expected[0]]]
    assert sum(r["index"] == int(label) for r, label in zip(results, test.labels, strict=True)) >= 0.9 * len(test)


def test_an_rgb_model_given_grayscale_or_other_sizes_converts_and_says_so(colour_run, tmp_path, capsys):
    checkpoint, test = colour_run
    gray = [Image.fromarray(p.permute(1, 2, 0).numpy()).convert("L") for p in test.images[:3]]
    paths = []
    for index, image in enumerate(gray):
        paths.append(str(tmp_path / f"gray{index}.png"))
        image.save(paths[-1])
    big = str(tmp_path / "big.jpg")
    Image.fromarray(test.images[0].permute(1, 2, 0).numpy()).resize((48, 40)).save(big)
    code, out, err = run_predict([str(checkpoint), *paths, big], capsys)
    assert code == 0 and len(out.splitlines()) == 4
    assert err == ("note: 3 images converted from grayscale to RGB: the model was trained on RGB images"), err
    results = predict.predict_files(checkpoint, [*paths, big])
    assert results[0]["converted"] == ["grayscale to RGB"] and results[3]["converted"] == [
        "resized from 48x40 to 20x24"]
    code, _, err = run_predict([str(checkpoint), big, "--fit", "digit"], capsys)
    assert code == 2
    assert_one_line_error(err, "--fit digit makes 1x28x28", "3x24x20", "--fit resize")


def test_resize_like_training_converts_every_mode():
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (10, 12, 3), dtype=np.uint8))
    pixels, converted = predict.resize_like_training(rgb, (1, 10, 12))
    assert pixels.shape == (1, 10, 12) and converted == ["colour to grayscale"]
    assert np.array_equal(pixels[0], np.asarray(rgb.convert("L")))
    rgba = rgb.convert("RGBA")
    pixels, converted = predict.resize_like_training(rgba, (3, 10, 12))
    assert converted == [] and np.array_equal(pixels, np.asarray(rgb).transpose(2, 0, 1))  # alpha dropped
    palette = rgb.convert("P")
    pixels, _ = predict.resize_like_training(palette, (3, 5, 6))
    assert pixels.shape == (3, 5, 6)
    deep = Image.fromarray(np.arange(120, dtype=np.uint16).reshape(10, 12) * 500)
    pixels, converted = predict.resize_like_training(deep, (1, 10, 12))
    assert converted == [] and pixels.max() > 200  # 16-bit is scaled to 8 bits, not clipped

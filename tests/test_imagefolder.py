"""Image folders (torchvision ImageFolder layout) decoded by DALI (CPU decoder here) into ImageDatasets, and the
one-line DatasetError for each way a folder can be wrong."""

import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from fastcnn.data.imagefolder import load_imagefolder
from fastcnn.errors import DatasetError
from tests.conftest import requires_cuda


def write_image(path: pathlib.Path, pixels: np.ndarray, **options) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **options)
    return pixels


def random_pixels(rng, shape) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    """3 classes (created out of order), 4-7 images each: 28x28 grayscale PNGs, RGB PNGs of other sizes, a JPEG,
    and files that are not images by extension (ignored). Returns (root, {class: {file name: pixels}})."""
    rng = np.random.default_rng(0)
    root = tmp_path / "digits"
    written = {}
    for name, count in (("eel", 4), ("cat", 7), ("dog", 5)):
        written[name] = {}
        for i in range(count):
            shape = (28, 28) if i % 2 == 0 else (20 + i, 30 + 2 * i, 3)
            written[name][f"{i:02d}.png"] = write_image(root / name / f"{i:02d}.png", random_pixels(rng, shape))
    written["dog"]["zz.jpg"] = write_image(root / "dog" / "zz.jpg", random_pixels(rng, (28, 28)), quality=95)
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    (root / ".cache").mkdir()  # hidden folders are not classes
    return root, written


def test_hold_out_split_partitions_each_class_with_sorted_classes_and_labels(folder):
    root, written = folder
    train = load_imagefolder(root, True, seed=0)
    test = load_imagefolder(root, False, seed=0)
    assert train.classes == test.classes == ["cat", "dog", "eel"] and train.name == "imagefolder"
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 28, 28)
    assert train.labels.dtype == torch.int64 and train.labels.shape == (len(train),)
    # round(n / 6), at least one: cat 7 -> 1, dog 6 -> 1, eel 4 -> 1
    assert torch.bincount(test.labels, minlength=3).tolist() == [1, 1, 1]
    assert torch.bincount(train.labels, minlength=3).tolist() == [6, 5, 3]
    assert train.labels.tolist() == sorted(train.labels.tolist())  # class by class, like ImageFolder
    # every written 28x28 PNG (decoded unchanged: same size, grayscale) is in exactly one split, with its label
    served = {bytes(img.numpy()): int(label) for ds in (train, test) for img, label in zip(ds.images, ds.labels,
                                                                                          strict=True)}
    for label, name in enumerate(train.classes):
        for file, pixels in written[name].items():
            if pixels.ndim == 2 and file.endswith(".png"):
                assert served[bytes(pixels.reshape(1, 28, 28))] == label
    again = load_imagefolder(root, False, seed=0)
    assert torch.equal(again.images, test.images)
    others = [load_imagefolder(root, False, seed=s).images for s in range(1, 4)]
    assert any(not torch.equal(o, test.images) for o in others)  # the seed picks the held-out images


def test_rgb_output_and_resizing_of_every_kind_of_file(folder):
    root, _ = folder
    gray = load_imagefolder(root, True)
    rgb = load_imagefolder(root, True, image_size=(21, 31), channels=3)
    small = load_imagefolder(root, True, image_size=16)
    assert rgb.images.shape == (len(gray), 3, 21, 31) and small.images.shape == (len(gray), 1, 16, 16)
    assert torch.equal(rgb.labels, gray.labels) and torch.equal(small.labels, gray.labels)
    assert rgb.images.float().std() > 30  # random pixels survived (uniform: 74; resizing smooths)


def test_pixels_of_png_and_jpeg_match_pil(tmp_path):
    rng = np.random.default_rng(1)
    gray = write_image(tmp_path / "train" / "a" / "g.png", random_pixels(rng, (28, 28)))
    rgb = write_image(tmp_path / "train" / "a" / "r.png", random_pixels(rng, (12, 17, 3)))
    smooth = np.kron(random_pixels(rng, (7, 7)), np.ones((4, 4), np.uint8))  # JPEG-friendly
    write_image(tmp_path / "train" / "b" / "j.jpeg", smooth, quality=95)
    for split in ("train", "test"):
        write_image(tmp_path / split / "c" / "x.PNG", random_pixels(rng, (28, 28)))  # extensions: any case
    write_image(tmp_path / "test" / "a" / "t.png", gray)
    write_image(tmp_path / "test" / "b" / "t.png", gray)
    train = load_imagefolder(tmp_path, True)
    assert train.classes == ["a", "b", "c"] and train.labels.tolist() == [0, 0, 1, 2]
    assert torch.equal(train.images[0, 0], torch.from_numpy(gray))
    jpeg = np.asarray(Image.open(tmp_path / "train" / "b" / "j.jpeg").convert("L"), dtype=np.int16)
    assert np.abs(train.images[2, 0].numpy().astype(np.int16) - jpeg).max() <= 2
    as_rgb = load_imagefolder(tmp_path, True, image_size=(12, 17), channels=3)
    assert torch.equal(as_rgb.images[1], torch.from_numpy(rgb).permute(2, 0, 1))  # same size: unchanged
    as_gray = load_imagefolder(tmp_path, True, image_size=(12, 17))
    luma = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.int16)
    assert np.abs(as_gray.images[1, 0].numpy().astype(np.int16) - luma).max() <= 1
    replicated = load_imagefolder(tmp_path, True, channels=3).images[0]
    assert all(torch.equal(replicated[c], torch.from_numpy(gray)) for c in range(3))  # gray -> RGB


def test_train_and_val_folders_are_the_splits(tmp_path):
    rng = np.random.default_rng(2)
    for split, count in (("train", 3), ("val", 2)):
        for name in ("x", "y"):
            for i in range(count):
                write_image(tmp_path / split / name / f"{i}.png", random_pixels(rng, (9, 9)))
    train, test = load_imagefolder(tmp_path, True), load_imagefolder(tmp_path, False)
    assert (len(train), len(test)) == (6, 4) and train.classes == test.classes == ["x", "y"]
    assert test.labels.tolist() == [0, 0, 1, 1]


def test_a_lone_train_folder_is_split_by_hold_out(tmp_path):
    rng = np.random.default_rng(3)
    for i in range(12):
        write_image(tmp_path / "train" / "only" / f"{i}.png", random_pixels(rng, (5, 5)))
    assert (len(load_imagefolder(tmp_path, True)), len(load_imagefolder(tmp_path, False))) == (10, 2)


def error(*args, **kwargs) -> str:
    with pytest.raises(DatasetError) as caught:
        load_imagefolder(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message and "File \"" not in message
    return message


def test_errors_for_missing_root_and_missing_classes(tmp_path):
    assert "does not exist" in error(tmp_path / "nowhere", True)
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in error(tmp_path / "file", True)
    (tmp_path / "empty").mkdir()
    message = error(tmp_path / "empty", True)
    assert "has no class folders" in message and "<class>/<image>" in message


def test_error_names_the_class_folder_without_images(tmp_path):
    write_image(tmp_path / "a" / "0.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("no images here")
    message = error(tmp_path, True)
    assert f"class folder {tmp_path / 'b'} has no .png, .jpg or .jpeg images" in message


def test_error_names_the_file_that_does_not_decode(tmp_path, capfd):
    for i in range(5):
        write_image(tmp_path / "train" / "a" / f"{i}.png", np.full((6, 6), i, np.uint8))
        write_image(tmp_path / "test" / "a" / f"{i}.png", np.full((6, 6), i, np.uint8))
    bad = tmp_path / "train" / "a" / "3b.png"
    bad.write_bytes(b"this is text, not a PNG")
    message = error(tmp_path, True)
    assert message.startswith(f"{bad} is not a decodable image (DALI: ") and message.endswith("delete or replace it")
    load_imagefolder(tmp_path, False)  # the other split is fine
    truncated = tmp_path / "test" / "a" / "2.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    assert error(tmp_path, False).startswith(f"{truncated} is not a decodable image")
    empty = tmp_path / "test" / "a" / "0.png"
    empty.write_bytes(b"")
    assert error(tmp_path, False) == f"{empty} is empty (0 bytes), not an image; delete or replace it"
    capfd.readouterr()


def test_error_for_train_and_test_with_different_classes(tmp_path):
    for split, names in (("train", ("a", "b", "c")), ("test", ("a", "b", "d"))):
        for name in names:
            write_image(tmp_path / split / name / "0.png", np.zeros((4, 4), np.uint8))
    message = error(tmp_path, True)
    assert "have different classes (only in train: c; only in test: d)" in message
    assert "give both splits the same class folders" in message


def test_errors_for_incomplete_split_layouts(tmp_path):
    write_image(tmp_path / "test" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    assert "has test/ but no train/ folder" in error(tmp_path, True)
    single = tmp_path / "single"
    for name in ("a", "b"):
        write_image(single / name / "0.png", np.zeros((4, 4), np.uint8))
    assert len(load_imagefolder(single, True)) == 2
    assert "too small to hold out a test split" in error(single, False)


def test_bad_arguments(folder):
    root, _ = folder
    with pytest.raises(ValueError, match="channels"):
        load_imagefolder(root, True, channels=2)
    with pytest.raises(ValueError, match="image_size"):
        load_imagefolder(root, True, image_size=(0, 28))


@requires_cuda
@pytest.mark.gpu
def test_mixed_decoding_on_the_gpu_matches_the_cpu(folder):
    root, _ = folder
    cpu = load_imagefolder(root, True, channels=3)
    gpu = load_imagefolder(root, True, channels=3, device="cuda")
    assert gpu.images.is_cuda and gpu.labels.is_cuda and torch.equal(gpu.labels.cpu(), cpu.labels)
    # PNGs decode on the CPU in both; the JPEG goes through nvJPEG, and resizing runs on the GPU
    assert (gpu.images.cpu().int() - cpu.images.int()).abs().max() <= 3

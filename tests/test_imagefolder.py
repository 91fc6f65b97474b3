"""Image folders (torchvision ImageFolder layout) decoded by DALI (CPU decoder here) into ImageDatasets: the shape
inferred from the files (colour, size), the one-line DatasetError for each way a folder can be wrong."""

import pathlib

import numpy as np
import pytest
import torch
from helpers import requires_cuda
from PIL import Image

from fastcnn.data.imagefolder import load_imagefolder
from fastcnn.errors import DatasetError


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
    train = load_imagefolder(root, True, seed=0, channels=1, image_size=28)
    test = load_imagefolder(root, False, seed=0, channels=1, image_size=28)
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
    checked = 0
    for label, name in enumerate(train.classes):
        for file, pixels in written[name].items():
            if pixels.ndim == 2 and file.endswith(".png"):
                assert served[bytes(pixels.reshape(1, 28, 28))] == label
                checked += 1
    assert checked == 9  # the even-numbered PNGs: cat 4, dog 3, eel 2
    again = load_imagefolder(root, False, seed=0, channels=1, image_size=28)
    assert torch.equal(again.images, test.images)
    others = [load_imagefolder(root, False, seed=s, channels=1, image_size=28).images for s in range(1, 4)]
    assert any(not torch.equal(o, test.images) for o in others)  # the seed picks the held-out images


def test_rgb_output_and_resizing_of_every_kind_of_file(folder):
    root, _ = folder
    gray = load_imagefolder(root, True, channels=1, image_size=28)
    rgb = load_imagefolder(root, True, image_size=(21, 31), channels=3)
    small = load_imagefolder(root, True, image_size=16, channels=1)
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
    as_gray = load_imagefolder(tmp_path, True, image_size=(12, 17), channels=1)
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
    for name in ("a", "b"):
        for i in range(12):
            write_image(tmp_path / "train" / name / f"{i}.png", random_pixels(rng, (5, 5)))
    assert (len(load_imagefolder(tmp_path, True)), len(load_imagefolder(tmp_path, False))) == (20, 4)


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
        for split in ("train", "test"):
            for name in ("a", "b"):
                write_image(tmp_path / split / name / f"{i}.png", np.full((6, 6), i, np.uint8))
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
    with pytest.raises(ValueError, match="image size must be at least 1x1, got 0x28"):
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


# --- the shape a folder's images keep by default --------------------------------------------------------------


def two_classes(root: pathlib.Path, make, count: int = 3) -> pathlib.Path:
    """``count`` images per class a and b in root/train (and a copy in root/test), each ``make(rng, class index,
    i)``: a PIL image, or (image, save options). Returns root/train."""
    rng = np.random.default_rng(7)
    for label, name in enumerate(("a", "b")):
        for i in range(count):
            made = make(rng, label, i)
            image, options = made if isinstance(made, tuple) else (made, {})
            ext = options.pop("ext", "png")
            for split in ("train", "test"):
                path = root / split / name / f"{i}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path, **options)
    return root / "train"


def test_rgb_images_stay_rgb_at_their_size(tmp_path):
    train = two_classes(tmp_path, lambda rng, label, i: Image.fromarray(random_pixels(rng, (48, 40, 3))))
    data = load_imagefolder(tmp_path, True)
    assert data.images.shape == (6, 3, 48, 40) and data.notes == [] and data.source == str(tmp_path)
    first = np.array(Image.open(train / "a" / "0.png"))
    assert torch.equal(data.images[0], torch.from_numpy(first).permute(2, 0, 1))  # decoded exactly


def test_grayscale_images_stay_grayscale(tmp_path):
    train = two_classes(tmp_path, lambda rng, label, i: Image.fromarray(random_pixels(rng, (20, 30))))
    data = load_imagefolder(tmp_path, True)
    assert data.images.shape == (6, 1, 20, 30)
    assert torch.equal(data.images[4, 0], torch.from_numpy(np.array(Image.open(train / "b" / "1.png"))))


def test_mixed_sizes_take_the_most_common_and_say_so(tmp_path):
    sizes = [(32, 32), (32, 32), (50, 20)]
    two_classes(tmp_path, lambda rng, label, i: Image.fromarray(random_pixels(rng, (*sizes[i], 3))))
    data = load_imagefolder(tmp_path, True)
    assert data.images.shape == (6, 3, 32, 32)
    assert len(data.notes) == 1 and "2 of 6 train images (1 other sizes) are not 32x32" in data.notes[0]
    assert data.images[2].float().std() > 10  # the odd ones were resized, not left empty
    assert load_imagefolder(tmp_path, True, image_size=(50, 20)).images.shape == (6, 3, 50, 20)  # override


def test_a_colour_image_among_grayscale_ones_makes_the_folder_rgb(tmp_path):
    def colour_one(rng, label, i):
        return Image.fromarray(random_pixels(rng, (8, 8, 3) if (label, i) == (1, 2) else (8, 8)))

    train = two_classes(tmp_path, colour_one)
    data = load_imagefolder(tmp_path, True)
    assert data.images.shape == (6, 3, 8, 8) and "5 of 6 train images are grayscale" in data.notes[0]
    gray = torch.from_numpy(np.array(Image.open(train / "a" / "0.png")))
    assert all(torch.equal(data.images[0, c], gray) for c in range(3))  # gray repeated into R, G and B
    assert load_imagefolder(tmp_path, True, channels=1).images.shape == (6, 1, 8, 8)  # override


def test_rgba_and_palette_pngs_decode_like_pil_rgb(tmp_path):
    def make(rng, label, i):
        rgb = random_pixels(rng, (16, 16, 3))
        if label == 0:
            alpha = random_pixels(rng, (16, 16, 1))
            return Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA")
        return Image.fromarray(rgb).convert("P")  # an adaptive colour palette
    train = two_classes(tmp_path, make)
    data = load_imagefolder(tmp_path, True)
    assert data.images.shape == (6, 3, 16, 16)
    for index, path in enumerate([train / "a" / "0.png", train / "b" / "0.png"]):
        expected = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)  # alpha dropped, palette applied
        assert torch.equal(data.images[3 * index], torch.from_numpy(expected.copy()))


def test_a_gray_palette_is_grayscale(tmp_path):
    train = two_classes(tmp_path, lambda rng, label, i: Image.fromarray(random_pixels(rng, (9, 9))).convert("P"))
    data = load_imagefolder(tmp_path, True)
    assert data.images.shape == (6, 1, 9, 9)
    assert torch.equal(data.images[0, 0], torch.from_numpy(np.array(Image.open(train / "a" / "0.png")
                                                                      .convert("L"))))


def test_jpegs_colour_and_gray(tmp_path):
    smooth = lambda rng, shape: np.kron(random_pixels(rng, shape), np.ones((4, 4, 1) if len(shape) == 3 else (4, 4),
                                                                           np.uint8))
    two_classes(tmp_path / "rgb", lambda rng, label, i: (Image.fromarray(smooth(rng, (6, 5, 3))),
                                                         dict(ext="jpg", quality=95)))
    two_classes(tmp_path / "gray", lambda rng, label, i: (Image.fromarray(smooth(rng, (6, 5))),
                                                          dict(ext="jpeg", quality=95)))
    rgb, gray = load_imagefolder(tmp_path / "rgb", True), load_imagefolder(tmp_path / "gray", True)
    assert rgb.images.shape == (6, 3, 24, 20) and gray.images.shape == (6, 1, 24, 20)
    pil = np.asarray(Image.open(tmp_path / "rgb" / "train" / "a" / "0.jpg").convert("RGB"), dtype=np.int16)
    pil = pil.transpose(2, 0, 1)
    assert np.abs(rgb.images[0].numpy().astype(np.int16) - pil).max() <= 3  # decoders may round differently


def test_the_test_split_gets_the_train_splits_shape(tmp_path):
    rng = np.random.default_rng(4)
    for name in ("a", "b"):
        for i in range(3):
            write_image(tmp_path / "train" / name / f"{i}.png", random_pixels(rng, (12, 12, 3)))
            write_image(tmp_path / "test" / name / f"{i}.png", random_pixels(rng, (30, 20)))  # gray, another size
    assert load_imagefolder(tmp_path, False).images.shape == (6, 3, 12, 12)


def test_a_subset_is_spread_over_the_classes_and_decodes_only_those(tmp_path):
    two_classes(tmp_path, lambda rng, label, i: Image.fromarray(np.full((4, 4), 10 * label + i, np.uint8)), count=6)
    data = load_imagefolder(tmp_path, True, subset=4)
    assert data.labels.tolist() == [0, 0, 1, 1] and data.images[:, 0, 0, 0].tolist() == [0, 3, 10, 13]


def test_a_folder_with_one_class_is_refused(tmp_path):
    write_image(tmp_path / "cats" / "0.png", np.zeros((4, 4), np.uint8))
    write_image(tmp_path / "cats" / "1.png", np.zeros((4, 4), np.uint8))
    message = error(tmp_path, True)
    assert "has one class folder (cats)" in message and "two or more" in message


def test_image_headers_match_pil(tmp_path):
    from fastcnn.data.image_headers import read_header

    rng = np.random.default_rng(5)
    cases = {"g.png": Image.fromarray(random_pixels(rng, (9, 11))), "la.png": Image.fromarray(
        random_pixels(rng, (9, 11))).convert("LA"), "rgba.png": Image.fromarray(random_pixels(rng, (9, 11, 4))),
        "p.png": Image.fromarray(random_pixels(rng, (9, 11, 3))).convert("P"),
        "pg.png": Image.fromarray(random_pixels(rng, (9, 11))).convert("P"),
        "i16.png": Image.fromarray(rng.integers(0, 65535, (9, 11), dtype=np.uint16)),
        "g.jpg": Image.fromarray(random_pixels(rng, (9, 11))), "c.jpg": Image.fromarray(random_pixels(rng, (9, 11, 3))),
        "cmyk.jpg": Image.fromarray(random_pixels(rng, (9, 11, 3))).convert("CMYK")}
    colour = {"rgba.png", "p.png", "c.jpg", "cmyk.jpg"}
    for name, image in cases.items():
        image.save(tmp_path / name, **({"progressive": True} if name == "c.jpg" else {}))
        header = read_header(tmp_path / name)
        assert (header.height, header.width, header.color) == (9, 11, name in colour), name
    exif = Image.Exif()
    exif[0x010E] = "x" * 5000  # a large APP1 segment before the frame header: found by seeking
    Image.fromarray(random_pixels(rng, (7, 5, 3))).save(tmp_path / "exif.jpg", exif=exif)
    header = read_header(tmp_path / "exif.jpg")
    assert (header.height, header.width, header.color) == (7, 5, True)
    assert (tmp_path / "exif.jpg").stat().st_size > 5000
    (tmp_path / "junk.png").write_bytes(b"junk")
    assert read_header(tmp_path / "junk.png") is None

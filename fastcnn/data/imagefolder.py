"""Image folders (torchvision's ImageFolder layout) decoded by DALI into an in-memory ImageDataset.

Layout: ``root/<class>/**/*.png|jpg|jpeg``, classes sorted by folder name (label = index in that order) and
files sorted by path, as torchvision's ImageFolder does. Splits: when ``root/train`` and ``root/test`` (or
``root/val``; ``test`` wins when both exist) are folders, each is such a layout and they must have the same
classes. Otherwise the one folder (``root``, or ``root/train`` when it is the only split folder) is split
deterministically: of each class, ``round(n / 6)`` images (at least one when the class has two or more) are held
out for the test split, chosen by a permutation seeded with (``seed``, class name); the rest is the train split.
A class's split changes only when that class's files change. A folder needs two classes or more.

Shape. By default the images keep what they are: RGB when any image of the train split is stored in colour
(RGB, RGBA, CMYK, a palette with colours; alpha is dropped), grayscale when all are gray; and the size they share,
or with mixed sizes the most common one (the others are resized to it). This is read from the files' headers
(``fastcnn.data.image_headers``) before anything is decoded, always from the train split, so both splits get the
same shape. ``channels`` and ``image_size`` override it.

Decoding: ``fn.decoders.image`` (``device="cpu"``, or ``"mixed"`` when ``device`` is a CUDA device) to GRAY
(``channels=1``) or RGB (``channels=3``), ``fn.resize`` to ``image_size`` (bilinear, antialiased when
shrinking; the aspect ratio is not kept, like ``transforms.Resize((h, w))``), then CHW. The result is the whole
split as uint8 (N, C, H, W) on the decoding device.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from fastcnn.data.dali_runtime import output_to_torch, pipeline_stream, usable_cores
from fastcnn.data.image_dataset import ImageDataset
from fastcnn.data.image_headers import read_header
from fastcnn.data.image_shape import check_channels, parse_image_size
from fastcnn.data.sampling import epoch_seed
from fastcnn.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
TEST_FRACTION = 1 / 6
DECODE_BATCH = 256
LAYOUT_HINT = "lay it out as <root>/<class>/<image>.png|jpg|jpeg (torchvision ImageFolder)"


@dataclass(frozen=True)
class FolderShape:
    """The shape a folder's images are decoded to, and what was found out choosing it."""

    channels: int
    height: int
    width: int
    notes: list[str] = field(default_factory=list)


def load_imagefolder(root: str | os.PathLike, train: bool, *, image_size: int | tuple[int, int] | None = None,
                     channels: int | None = None, seed: int = 0, device: torch.device | str | None = None,
                     subset: int | None = None) -> ImageDataset:
    """The train or test split of the image folder ``root`` (see the module docstring for layout, splits and
    the shape inferred when ``channels`` / ``image_size`` are None).

    images: uint8 (N, C, H, W) on ``device`` (CPU when None); labels: int64 (N,); classes: the class folder
    names, sorted; notes: what was inferred or converted that a user should know (mixed sizes, mixed colour).
    ``subset``: only that many images, spread evenly over the split (so over every class), and only those are
    decoded. Raises ``DatasetError`` (one line: what is wrong and what to do) for a missing root, fewer than two
    class folders, a class folder without images, a file that is not a decodable image, and train/test splits
    with different classes.
    """
    check_channels(channels)
    image_size = parse_image_size(image_size)
    root = pathlib.Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"image folder {root} {what}; {LAYOUT_HINT}, or point --data-dir at one")
    classes, files, labels = _split_files(root, train, seed)
    if channels is None or image_size is None:
        train_files = files if train else _split_files(root, True, seed)[1]
        shape = infer_shape(train_files, channels=channels, image_size=image_size)
    else:
        shape = FolderShape(channels, *image_size)
    if subset is not None and subset < len(files):
        chosen = [len(files) * i // subset for i in range(subset)]
        files, labels = [files[i] for i in chosen], [labels[i] for i in chosen]
    device = torch.device(device) if device is not None else torch.device("cpu")
    images = _decode(files, height=shape.height, width=shape.width, channels=shape.channels, device=device)
    return ImageDataset("imagefolder", images, torch.tensor(labels, dtype=torch.int64, device=device), classes,
                        source=str(root), notes=list(shape.notes))


def infer_shape(files: list[pathlib.Path], *, channels: int | None = None,
                image_size: tuple[int, int] | None = None) -> FolderShape:
    """The shape to decode ``files`` (a train split) to: RGB when any is stored in colour, else grayscale; the
    most common size (ties: the larger); ``channels`` / ``image_size`` where given. Files whose header cannot be
    read are left out here (decoding names them)."""
    headers = [h for h in (read_header(f) for f in files) if h is not None]
    notes = []
    if channels is None:
        colored = sum(h.color for h in headers)
        channels = 3 if colored else 1
        if 0 < colored < len(headers):
            notes.append(f"{len(headers) - colored} of {len(headers)} train images are grayscale and the others "
                         "colour: all are decoded as RGB (--channels 1 for grayscale)")
    if image_size is None:
        sizes = collections.Counter((h.height, h.width) for h in headers)
        if not sizes:
            image_size = (28, 28)  # nothing readable: decoding will say which file is broken
        else:
            image_size = max(sizes, key=lambda size: (sizes[size], size[0] * size[1], size))
            others = len(headers) - sizes[image_size]
            if others:
                notes.append(f"{others} of {len(headers)} train images ({len(sizes) - 1} other sizes) are not "
                             f"{image_size[0]}x{image_size[1]}, the most common size: they are resized to it "
                             "(--image-size to choose another)")
    return FolderShape(channels, *image_size, notes)


def _split_files(root: pathlib.Path, train: bool, seed: int) -> tuple[list[str], list[pathlib.Path], list[int]]:
    train_dir = root / "train"
    test_dir = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if train_dir.is_dir() and test_dir is not None:
        train_classes = _scan(train_dir)
        test_classes = _scan(test_dir)
        if list(train_classes) != list(test_classes):
            only_train = sorted(set(train_classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(train_classes))
            raise DatasetError(f"{train_dir} and {test_dir} have different classes (only in {train_dir.name}: "
                               f"{_names(only_train)}; only in {test_dir.name}: {_names(only_test)}); "
                               "give both splits the same class folders")
        chosen = train_classes if train else test_classes
        return _flatten(chosen)
    if test_dir is not None:
        raise DatasetError(f"image folder {root} has {test_dir.name}/ but no train/ folder; add {root}/train "
                           f"with the same class folders, or remove {test_dir.name}/ to hold out a test split")
    folder = train_dir if train_dir.is_dir() else root
    per_class = _scan(folder)
    split = {}
    for name, files in per_class.items():
        generator = torch.Generator().manual_seed(epoch_seed(seed, zlib.crc32(name.encode())))
        held_out = max(1, round(len(files) * TEST_FRACTION)) if len(files) >= 2 else 0
        test = set(torch.randperm(len(files), generator=generator)[:held_out].tolist())
        split[name] = [f for i, f in enumerate(files) if (i in test) != train]
    if not train and not any(split.values()):
        raise DatasetError(f"image folder {folder} is too small to hold out a test split (each class has one "
                           "image); add images, or give it train/ and test/ subfolders")
    return _flatten(split)


def _scan(folder: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """Class name -> its image files (sorted paths, searched recursively), classes sorted by name."""
    class_dirs = sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")),
                        key=lambda d: d.name)
    if not class_dirs:
        raise DatasetError(f"image folder {folder} has no class folders; {LAYOUT_HINT}")
    if len(class_dirs) == 1:
        raise DatasetError(f"image folder {folder} has one class folder ({class_dirs[0].name}); a classifier needs "
                           "two or more: add a folder of images for each other class")
    per_class = {}
    for class_dir in class_dirs:
        files = sorted(pathlib.Path(dirpath) / name
                       for dirpath, _, names in os.walk(class_dir, followlinks=True)
                       for name in names if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."))
        if not files:
            raise DatasetError(f"class folder {class_dir} has no .png, .jpg or .jpeg images; add images to it "
                               "or remove the folder")
        per_class[class_dir.name] = files
    return per_class


def _flatten(per_class: dict[str, list[pathlib.Path]]) -> tuple[list[str], list[pathlib.Path], list[int]]:
    classes = list(per_class)
    files = [f for name in classes for f in per_class[name]]
    labels = [label for label, name in enumerate(classes) for _ in per_class[name]]
    return classes, files, labels


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else "none"


@pipeline_def
def _decode_pipeline(*, decoder: str, height: int, width: int, channels: int):
    encoded = fn.external_source(name="encoded", device="cpu", dtype=types.UINT8, ndim=1, batch=True)
    images = fn.decoders.image(encoded, device=decoder, output_type=types.GRAY if channels == 1 else types.RGB)
    images = fn.resize(images, size=[height, width])  # HWC in, HWC out; (H, W) in layout order
    return fn.transpose(images, perm=[2, 0, 1], output_layout="CHW")


def _decode(files: list[pathlib.Path], *, height: int, width: int, channels: int,
            device: torch.device) -> torch.Tensor:
    images = torch.empty((len(files), channels, height, width), dtype=torch.uint8, device=device)
    if not files:
        return images
    pipeline = _make_decode_pipeline(min(DECODE_BATCH, len(files)), height, width, channels, device)
    for lo in range(0, len(files), DECODE_BATCH):
        chunk = files[lo:lo + DECODE_BATCH]
        try:
            (out,) = pipeline.run(pipeline_stream(device), encoded=[_read(f) for f in chunk])
        except RuntimeError as err:
            # DALI says that a sample of the batch failed, not which: find it, decoding one file at a time.
            _raise_for_undecodable(chunk, height, width, channels, device)
            raise DatasetError(f"DALI could not decode the images {chunk[0]} .. {chunk[-1]} ({_dali_reason(err)}); "
                               "check that they are PNG or JPEG images") from None
        images[lo:lo + len(chunk)].copy_(output_to_torch(out, device))
    return images


def _make_decode_pipeline(batch_size: int, height: int, width: int, channels: int, device: torch.device):
    on_gpu = device.type == "cuda"
    return _decode_pipeline(decoder="mixed" if on_gpu else "cpu", height=height, width=width, channels=channels,
                            batch_size=batch_size, num_threads=min(4, usable_cores()),
                            device_id=(device.index if device.index is not None else torch.cuda.current_device())
                            if on_gpu else None,
                            prefetch_queue_depth=1)


def _read(path: pathlib.Path) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DatasetError(f"cannot read {path} ({err.strerror or err}); check its permissions or remove it") from None
    if data.size == 0:
        raise DatasetError(f"{path} is empty (0 bytes), not an image; delete or replace it")
    return data


def _raise_for_undecodable(files: list[pathlib.Path], height: int, width: int, channels: int,
                           device: torch.device) -> None:
    for path in files:
        pipeline = _make_decode_pipeline(1, height, width, channels, device)  # fresh: a failed one may be unusable
        try:
            with _codec_log_silenced():  # the codec already logged this file's failure once, for the batch
                pipeline.run(pipeline_stream(device), encoded=[_read(path)])
        except RuntimeError as err:
            raise DatasetError(f"{path} is not a decodable image (DALI: {_dali_reason(err)}); "
                               "delete or replace it") from None


@contextlib.contextmanager
def _codec_log_silenced():
    """nvImageCodec writes its errors straight to file descriptor 2; hide them while probing file by file."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _dali_reason(err: RuntimeError) -> str:
    """The cause in a DALI error, without DALI's traceback of the pipeline definition."""
    text = str(err)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and "pipeline object is no longer valid" not in line
             and not line.startswith("Critical error")]
    reason = " ".join(lines).rstrip(" :") or type(err).__name__
    return reason[:160] + ("..." if len(reason) > 160 else "")

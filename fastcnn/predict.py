"""``fastcnn predict CKPT IMAGE...``: classify image files with a trained run.

Each image is prepared the way the run's training images were (``--fit auto``):

- ``resize`` (every run but MNIST's: Fashion-MNIST, CIFAR-10, image folders, synthetic): converted to the
  training channels (RGB to grayscale with PIL's ITU-R 601-2 weights, grayscale to RGB by repeating the
  channel; alpha dropped, as the image folder decoder drops it) and resized to the training size (bilinear,
  antialiased when shrinking, aspect ratio not kept), as ``--dataset imagefolder`` decodes a folder's images.
  An image already of the training shape is used as it is. A conversion is reported (``notes``).
- ``digit`` (runs trained on MNIST, or ``--fit digit``): MNIST's own preprocessing: grayscale; polarity made
  "bright object on a dark background" (``--invert auto`` inverts a dark drawing on light paper, judged by the
  border pixels); background subtracted and contrast stretched; cropped to the object's bounding box; resized
  (antialiased, aspect ratio kept) to fit a 20x20 box; placed in a 28x28 field so that its intensity center of
  mass sits at the center.

The uint8 result is normalized with the run's mean/std by ``normalize_uint8``, exactly as training normalized its
batches.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import datasets

from fastcnn.checkpoint import checkpoint_file
from fastcnn.config import pick_device
from fastcnn.data.image_headers import GRAY_MODES
from fastcnn.data.normalization import as_channel_tensor, normalize_uint8
from fastcnn.errors import FastcnnError, UsageError
from fastcnn.evaluate import count_outputs, load_model
from fastcnn.vocabulary import FIT_CHOICES, INVERT_CHOICES

FIELD = 28  # MNIST image side
BOX = 20  # MNIST digits are size-normalized to fit this box
PREDICT_BATCH = 1000
DIGIT_DATASETS = ("mnist",)  # runs whose images were made by MNIST's digit preprocessing
# After background removal, pixels above this (of 1.0) make the object's bounding box: low enough to keep the
# antialiased edge (MNIST's digits span exactly 20 pixels counting every non-zero one), high enough to skip noise.
OBJECT_THRESHOLD = 0.05


def class_names(dataset: str, count: int) -> list[str]:
    """Class names of a dataset, as ``load_dataset`` gives them, without reading the data."""
    names = {"mnist": datasets.MNIST.classes, "fashion-mnist": datasets.FashionMNIST.classes}.get(dataset)
    if names is None or len(names) != count:
        return [str(i) for i in range(count)]
    return [str(name) for name in names]


def open_image(path: str | pathlib.Path):
    """Open and decode an image file with PIL. Raises FastcnnError naming the file when it cannot be read."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FastcnnError(f"cannot read image {path}: no such file")
    if path.is_dir():
        raise FastcnnError(f"cannot read image {path}: it is a directory")
    try:
        empty = path.stat().st_size == 0
    except OSError as err:
        raise FastcnnError(f"cannot read image {path}: {err.strerror or err}") from None
    if empty:
        raise FastcnnError(f"cannot read image {path}: the file is empty")
    try:
        with Image.open(path) as image:
            image.load()
            # Phone photos are often stored sideways with an EXIF orientation tag.
            return ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise FastcnnError(f"cannot read image {path}: not an image file PIL can identify "
                           "(PNG or JPEG expected)") from None
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, EOFError... for broken files
        reason = " ".join(str(err).split())[:160]
        raise FastcnnError(f"cannot read image {path}: broken or unsupported image file "
                           f"({reason or type(err).__name__})") from None


def grayscale(image) -> np.ndarray:
    """float64 (H, W) in [0, 1] from a PIL image of any mode (8/16/32-bit, palette, with or without alpha).

    Transparent pixels are composited onto the background opposite to the opaque content's brightness, so
    that a drawing on a transparent canvas keeps its strokes whatever their colour.
    """
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        gray = np.asarray(image, dtype=np.float64) / 65535.0
        return np.clip(gray, 0.0, 1.0)
    if mode == "F":
        gray = np.asarray(image, dtype=np.float64)
        peak = gray.max(initial=0.0)
        return np.clip(gray / (255.0 if 1.0 < peak <= 255.0 else 65535.0 if peak > 255.0 else 1.0), 0.0, 1.0)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info) or (
        mode in ("L", "RGB") and "transparency" in image.info)
    if not has_alpha:
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64) / 255.0
    luma = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])  # the weights of PIL's convert("L")
    alpha = rgba[..., 3]
    if alpha.min() >= 1.0:
        return luma
    ink = float((luma * alpha).sum() / alpha.sum()) if alpha.sum() > 0 else 1.0
    background = 1.0 if ink < 0.5 else 0.0
    return luma * alpha + background * (1.0 - alpha)


def border_pixels(gray: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels, about 5% of the side thick (at least one pixel)."""
    h, w = gray.shape
    t = max(1, round(0.05 * min(h, w)))
    return np.concatenate([gray[:t].ravel(), gray[-t:].ravel(), gray[:, :t].ravel(), gray[:, -t:].ravel()])


def center_in_field(obj: np.ndarray) -> np.ndarray:
    """Place ``obj`` (h, w <= FIELD) in a FIELD x FIELD zero field with its center of mass at the center
    (integer shift, kept inside the field)."""
    h, w = obj.shape
    mass = obj.sum()
    if mass > 0:
        cy = float((obj.sum(axis=1) * np.arange(h)).sum() / mass)
        cx = float((obj.sum(axis=0) * np.arange(w)).sum() / mass)
    else:
        cy, cx = (h - 1) / 2, (w - 1) / 2
    center = FIELD / 2  # measured: MNIST's test digits have their centers of mass at (14.0, 14.0) +- 0.3
    top = min(max(int(np.floor(center - cy + 0.5)), 0), FIELD - h)
    left = min(max(int(np.floor(center - cx + 0.5)), 0), FIELD - w)
    field = np.zeros((FIELD, FIELD), dtype=np.float64)
    field[top:top + h, left:left + w] = obj
    return field


def preprocess(image, *, invert: str = "auto") -> tuple[np.ndarray, bool]:
    """A PIL image -> (uint8 (28, 28) MNIST-style image, whether it was inverted).

    ``invert``: "yes", "no", or "auto" (invert when most border pixels are bright: a dark object on light paper).
    """
    if invert not in INVERT_CHOICES:
        raise ValueError(f"invert must be one of {INVERT_CHOICES}, got {invert!r}")
    gray = grayscale(image)
    inverted = invert == "yes" or (invert == "auto" and float(np.median(border_pixels(gray))) > 0.5)
    if inverted:
        gray = 1.0 - gray
    # MNIST's background is 0 and its strokes reach 255: remove the paper's grey level, stretch the rest.
    background = float(np.median(border_pixels(gray)))
    peak = float(gray.max())
    if peak - background < 1.0 / 255:
        return np.zeros((FIELD, FIELD), dtype=np.uint8), inverted  # a blank image: nothing to center
    gray = np.clip((gray - background) / (peak - background), 0.0, 1.0)
    rows = np.flatnonzero((gray > OBJECT_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((gray > OBJECT_THRESHOLD).any(axis=0))
    obj = gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = obj.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL sizes are (width, height)
    resized = Image.fromarray(obj.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
    field = center_in_field(np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0))
    return np.rint(field * 255).astype(np.uint8), inverted


@torch.no_grad()
def predict_pixels(model: torch.nn.Module, pixels: torch.Tensor, *, mean, std,
                   device: torch.device) -> torch.Tensor:
    """Class probabilities (N, classes), float32, for uint8 (N, C, H, W) ``pixels`` in the model's input shape
    (fp32, no autocast)."""
    channels = pixels.shape[1]
    mean, std = as_channel_tensor(mean, channels, device), as_channel_tensor(std, channels, device)
    chunks = [torch.softmax(model(normalize_uint8(chunk.to(device), mean, std)).float(), dim=1).cpu()
              for chunk in pixels.split(PREDICT_BATCH)]
    return torch.cat(chunks) if chunks else torch.empty(0)


def is_color(image) -> bool:
    """Whether a PIL image is stored in colour (RGB, RGBA, CMYK, YCbCr, a palette with colours)."""
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        return any(palette[i] != palette[i + 1] or palette[i] != palette[i + 2] for i in range(0, len(palette) - 2, 3))
    return image.mode not in GRAY_MODES


def resize_like_training(image, shape: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    """A PIL image -> (uint8 (C, H, W) in the training ``shape``, what was converted). This is what
    ``--dataset imagefolder`` makes of an image: alpha dropped, colour converted to ``C`` channels, resized to
    (H, W) when it is not that size already."""
    channels, height, width = shape
    converted = []
    color = is_color(image)
    if channels == 1:
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit or float: scaled, not clipped
            image = Image.fromarray(np.rint(grayscale(image) * 255).astype(np.uint8))
        else:
            image = image.convert("L")
        if color:
            converted.append("colour to grayscale")
    else:
        image = image.convert("RGB")
        if not color:
            converted.append("grayscale to RGB")
    if image.size != (width, height):
        converted.append(f"resized from {image.size[0]}x{image.size[1]} to {width}x{height}")
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return (pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)).copy(), converted


def choose_fit(fit: str, dataset: str | None, shape: tuple[int, int, int]) -> str:
    """``--fit auto`` -> "digit" for runs trained on MNIST's own 1x28x28 digits, "resize" for every other run."""
    if fit not in FIT_CHOICES:
        raise UsageError(f"--fit must be one of {', '.join(FIT_CHOICES)}, got {fit!r}")
    if fit == "auto":
        fit = "digit" if dataset in DIGIT_DATASETS and tuple(shape) == (1, FIELD, FIELD) else "resize"
    if fit == "digit" and tuple(shape) != (1, FIELD, FIELD):
        raise UsageError(f"--fit digit makes 1x28x28 MNIST-style digits, but this model takes "
                         f"{'x'.join(str(v) for v in shape)} images; use --fit resize")
    return fit


def predict_files(checkpoint: str | pathlib.Path, paths: list[str], *, top: int = 1, invert: str = "auto",
                  device: str = "auto", kernel: str | None = None, fit: str = "auto") -> list[dict]:
    """Classify image files with the model in ``checkpoint``. Every file is read before any prediction, so a bad
    file fails the call (FastcnnError naming it) without output. One dict per file: path, index, class,
    probability, inverted, fit ("digit" or "resize", see the module docstring), converted (what was done to
    bring it to the training shape, in words), and ``top`` (the ``top`` most probable classes, most probable
    first)."""
    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    if invert not in INVERT_CHOICES:
        raise UsageError(f"--invert must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
    torch_device = torch.device(pick_device(device))
    loaded = load_model(checkpoint, device=torch_device, kernel=kernel)
    shape = tuple(int(v) for v in loaded.state.get("image_shape") or (1, FIELD, FIELD))
    fit = choose_fit(fit, loaded.config.get("dataset"), shape)
    classes = loaded.state.get("classes") or class_names(loaded.config.get("dataset", ""),
                                                         count_outputs(loaded.model))
    if top > len(classes):
        raise UsageError(f"--top {top} is more than the model's {len(classes)} classes")
    try:
        mean, std = loaded.config["mean"], loaded.config["std"]
    except KeyError as err:
        raise FastcnnError(f"checkpoint {loaded.path} has an incomplete configuration (no {err})") from None

    prepared = []  # (uint8 (C, H, W), inverted, converted)
    for path in paths:
        image = open_image(path)
        if fit == "digit":
            digit, inverted = preprocess(image, invert=invert)
            prepared.append((digit[None], inverted, []))
        else:
            pixels, converted = resize_like_training(image, shape)
            prepared.append((pixels, False, converted))
    if not prepared:
        return []
    pixels = torch.from_numpy(np.stack([pixels for pixels, _, _ in prepared]))
    probabilities = predict_pixels(loaded.model, pixels, mean=mean, std=std, device=torch_device)
    results = []
    for path, (_, inverted, converted), probs in zip(paths, prepared, probabilities, strict=True):
        values, indices = probs.topk(top)
        ranked = [{"index": int(i), "class": classes[int(i)], "probability": float(v)}
                  for v, i in zip(values, indices, strict=True)]
        results.append({"path": str(path), **ranked[0], "inverted": inverted, "fit": fit, "converted": converted,
                        "top": ranked})
    return results


def conversion_notes(results: list[dict]) -> list[str]:
    """One line per kind of channel conversion (how many images, and why): an RGB model given grayscale images
    still predicts, but says so."""
    counts: dict[str, int] = {}
    for result in results:
        for what in result.get("converted", []):
            if not what.startswith("resized"):
                counts[what] = counts.get(what, 0) + 1
    return [f"{count} image{'s' if count > 1 else ''} converted from {what}: the model was trained on "
            f"{what.split(' to ')[1]} images" for what, count in counts.items()]


def format_line(result: dict, show_top: bool) -> str:
    line = f"{result['path']}: {result['class']} ({100 * result['probability']:.1f}%)"
    if show_top:
        line += "  top: " + ", ".join(f"{r['class']} {100 * r['probability']:.1f}%" for r in result["top"])
    return line


def run_command(args: argparse.Namespace, *, stream=None) -> int:
    """Entry point of ``fastcnn predict`` (args from the parser built by ``add_parser``)."""
    stream = stream or sys.stdout
    results = predict_files(args.checkpoint, args.images, top=1 if args.top is None else args.top, invert=args.invert,
                            device=args.device, kernel=args.kernel, fit=args.fit)
    for note in conversion_notes(results):
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        checkpoint = checkpoint_file(args.checkpoint)  # a run folder: the file its predictions came from
        print(json.dumps(dict(checkpoint=str(checkpoint), predictions=results), indent=2), file=stream)
    else:
        for result in results:
            print(format_line(result, args.top is not None), file=stream)
    return 0

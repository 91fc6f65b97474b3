"""Image shapes: the channel counts fastcnn trains on, image sizes as users give them, and converting a set of
uint8 images to another shape (gray <-> RGB, antialiased bilinear resize), as the image folder decoder does.

MNIST and Fashion-MNIST are 1x28x28, CIFAR-10 3x32x32; an image folder keeps its images' colour and size
(``fastcnn.data.imagefolder``); synthetic data is any shape. ``load_dataset(channels=..., image_size=...)``
converts any of them with ``convert_images``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

CHANNEL_CHOICES = (1, 3)
# ITU-R 601-2 luma, PIL's convert("L") weights: RGB -> grayscale everywhere in fastcnn
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_CONVERT_CHUNK = 4096  # images converted at a time, to bound the float temporary


def check_channels(channels: int | None) -> None:
    """ValueError unless ``channels`` is None (keep the images' own) or one of ``CHANNEL_CHOICES``."""
    if channels is not None and channels not in CHANNEL_CHOICES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")


def parse_image_size(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``28`` / ``(28, 28)`` -> (height, width); None stays None. ValueError for a size below 1."""
    if value is None:
        return None
    height, width = (value, value) if isinstance(value, int) else (int(v) for v in value)
    if height < 1 or width < 1:
        raise ValueError(f"an image size must be at least 1x1, got {height}x{width}")
    return height, width


def convert_images(images: torch.Tensor, channels: int | None = None,
                   image_size: int | Sequence[int] | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, ``channels``, ``image_size``): grayscale to RGB by repeating the channel,
    RGB to grayscale with ``LUMA_WEIGHTS``, then an antialiased bilinear resize (aspect ratio not kept, like
    ``transforms.Resize((h, w))``). Unchanged (the same tensor) when it already has that shape."""
    channels = channels or images.shape[1]
    if channels not in CHANNEL_CHOICES or images.shape[1] not in CHANNEL_CHOICES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {images.shape[1]} -> {channels}")
    size = parse_image_size(image_size) or tuple(images.shape[2:])
    if images.shape[1] == channels and tuple(images.shape[2:]) == size:
        return images
    out = torch.empty((images.shape[0], channels, *size), dtype=torch.uint8, device=images.device)
    for lo in range(0, images.shape[0], _CONVERT_CHUNK):
        chunk = images[lo:lo + _CONVERT_CHUNK].to(torch.float32)
        if chunk.shape[1] == 3 and channels == 1:
            weights = torch.tensor(LUMA_WEIGHTS, device=chunk.device).view(1, 3, 1, 1)
            chunk = (chunk * weights).sum(1, keepdim=True)
        elif chunk.shape[1] == 1 and channels == 3:
            chunk = chunk.repeat(1, 3, 1, 1)  # not expand(): the in-place rounding below needs distinct memory
        if tuple(chunk.shape[2:]) != size:
            chunk = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False, antialias=True)
        out[lo:lo + _CONVERT_CHUNK] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def describe_shape(shape: Sequence[int]) -> str:
    """(3, 32, 32) -> "RGB 3x32x32"; (1, 28, 28) -> "grayscale 1x28x28"."""
    kind = {1: "grayscale", 3: "RGB"}.get(shape[0], f"{shape[0]}-channel")
    return f"{kind} {'x'.join(str(v) for v in shape)}"

"""Input-size arithmetic of Conv -> ReLU -> MaxPool2d(2) stacks: what size comes out, and the smallest input that
still leaves one pixel, so that a model's flatten size follows from its input shape and a too-small input is a
one-line error instead of a shape mismatch deep inside a Linear layer."""

from __future__ import annotations

from collections.abc import Sequence

# (kernel_size, padding) of each conv-ReLU-pool block, in order
Blocks = Sequence[tuple[int, int]]


def as_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``28`` or ``(28, 28)`` -> ``(28, 28)`` (height, width)."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = (int(v) for v in image_size)
    return height, width


def pooled_side(side: int, blocks: Blocks) -> int:
    """The side after every block: a stride-1 convolution (side + 2 * padding - kernel + 1), then a 2x2 pool
    (floor division, as MaxPool2d(2) does). Zero or less: the input is too small."""
    for kernel, padding in blocks:
        side = side + 2 * padding - kernel + 1
        if side < 2:
            return 0
        side //= 2
    return side


def smallest_side(blocks: Blocks) -> int:
    """The smallest input side that leaves at least one pixel after every block."""
    side = 1
    while pooled_side(side, blocks) < 1:
        side += 1
    return side


def feature_size(model_name: str, image_size: int | Sequence[int], blocks: Blocks) -> tuple[int, int]:
    """(height, width) after ``blocks``; ValueError (one line, naming the smallest size) when the input is too
    small for them."""
    height, width = as_size(image_size)
    out = pooled_side(height, blocks), pooled_side(width, blocks)
    if min(out) < 1:
        least = smallest_side(blocks)
        raise ValueError(f"{model_name} needs images of at least {least}x{least} pixels, got {height}x{width}")
    return out

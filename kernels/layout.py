"""Shapes and layouts the fused op's kernels share (Triton and native CPU alike), with no dependency on either."""

from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` (N, C, H, W) is densely channels-last (strides tell it from NCHW even for C == 1)."""
    c, w = x.shape[1], x.shape[3]
    return x.stride(1) == 1 and x.stride(3) == c and x.stride(2) == c * w


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The layout the op gives its outputs: channels-last when the input is, NCHW otherwise."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def pooled_size(h: int, w: int, ksize: int, padding: int) -> tuple[int, int]:
    """(HP, WP): the floor-mode 2x2 pool of the stride-1 convolution output."""
    return (h + 2 * padding - ksize + 1) // 2, (w + 2 * padding - ksize + 1) // 2

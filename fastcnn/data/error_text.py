"""Exceptions from libraries (torchvision, DALI, pickle, numpy) turned into text for a one-line DatasetError."""

from __future__ import annotations


def one_line(err: BaseException, limit: int = 200) -> str:
    """``err``'s message with its whitespace (newlines included) collapsed, cut to ``limit`` characters ("..."
    marks a cut); "" for an exception without a message (callers then name its type)."""
    text = " ".join(str(err).split())
    return text[:limit] + ("..." if len(text) > limit else "")

"""Helpers shared by the tests: markers, the real CLI with its one-line errors, small datasets.

Fixtures live in conftest.py; plain functions and classes live here, imported as ``from helpers import ...``
(pytest puts tests/ on sys.path)."""

import os
import pathlib

import pytest
import torch

from fastcnn.cli import main
from fastcnn.data import ImageDataset

REPO = pathlib.Path(__file__).resolve().parents[1]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def real_data_root() -> pathlib.Path | None:
    """The folder holding the real MNIST / Fashion-MNIST ($FASTCNN_DATA, else ../shared/data), or None."""
    for candidate in (os.environ.get("FASTCNN_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (pathlib.Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return pathlib.Path(candidate)
    return None


def run_cli(argv, capsys):
    """``fastcnn ARGV`` through the real CLI: (exit code, stdout, stderr stripped)."""
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def assert_one_line_error(err, *words):
    """``err`` is exactly one ``fastcnn: error: ...`` line, without a traceback, naming every one of ``words``."""
    assert err.startswith("fastcnn: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


def small_set(count=103, channels=1, size=7, seed=0):
    """A tiny uint8 dataset of random images and labels (10 classes), the same for the same arguments."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (count,), generator=gen)
    return ImageDataset("tiny", images, labels, [str(i) for i in range(10)])


class Unpicklable:
    """A class only this test module knows: a checkpoint holding one must be refused, not unpickled."""

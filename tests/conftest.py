"""Test set-up. TRITON_INTERPRET=1 must be set before any Triton kernel is defined (at import), so that the
real kernel code runs on CPU tensors under Triton's interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import real_data_root  # noqa: E402


@pytest.fixture(scope="session")
def data_root() -> pathlib.Path:
    """Folder with the real MNIST / Fashion-MNIST in torchvision's layout (skips the test without it)."""
    root = real_data_root()
    if root is None:
        pytest.skip("real MNIST not found: set FASTCNN_DATA to a folder holding MNIST/raw and FashionMNIST/raw")
    return root


def pytest_report_header(config):
    # Where the kernel tests' fused side really runs: a vacuous comparison (the aten branch against the
    # reference, when the kernels could not load) should be visible in every run's header.
    from fastcnn.ops import fused_kernel_status

    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    ok, why = fused_kernel_status(device)
    return f"fastcnn fused kernels on {device}: {'run' if ok else 'NOT run'} ({why})"


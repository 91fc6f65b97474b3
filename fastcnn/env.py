"""Facts about this machine and installation that every result carries (summary.json, bench and eval JSON):
versions, device names, the source commit. ``fastcnn env`` prints them with what works here
(``fastcnn.env_report``)."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform
import subprocess

import torch


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def dali_version() -> str | None:
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return f"{dist.version} ({name})"
    return None


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "fastcnn": package_version("fastcnn"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton", "pytorch-triton"),
        "torchvision": package_version("torchvision"),
        "dali": dali_version(),
    }


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU: {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    """The commit of the fastcnn source tree when it is a git checkout (with '-dirty' for local changes)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


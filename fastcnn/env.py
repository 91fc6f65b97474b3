"""``fastcnn env``: versions, devices, and which fastcnn features work here (and why not). Paste it into bug
reports; summary.json and benchmark results carry the same facts."""

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
    import fastcnn

    return {
        "python": platform.python_version(),
        "fastcnn": fastcnn.__version__,
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


def features() -> dict[str, tuple[bool, str]]:
    """Feature name -> (available, why or why not)."""
    from fastcnn import ops
    from fastcnn.data.dali_status import dali_status
    from fastcnn.ops import fused_kernel_status

    cuda = torch.cuda.is_available()
    found = {}
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        found["fused Triton kernel"] = fused_kernel_status(device)
    else:
        found["fused Triton kernel"] = (False, "needs a CUDA GPU" + (
            "; TRITON_INTERPRET=1 runs it on this CPU under the interpreter, for tests" if ops.INTERPRET_ON_CPU
            else ""))
    found["native CPU kernel"] = (ops.native_runs_on_cpu(), ops.native_kernel_status())
    found["DALI loader"] = dali_status()
    found["CUDA graphs"] = (False, "needs a CUDA GPU") if not cuda else (
        True, "--cuda-graph (off by default: not yet measured on a GPU)")
    found["AMP bfloat16"] = (True, "CPU autocast") if not cuda else (
        (True, "supported by this GPU") if torch.cuda.is_bf16_supported() else (False, "GPU lacks bf16; float16 used"))
    found["torch.compile"] = (True, "Inductor on " + ("GPU (Triton)" if cuda else "CPU (C++)"))
    return found


def collect() -> dict:
    info = {"versions": versions(), "platform": platform.platform(), "git_commit": git_commit()}
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    info["devices"] = {d: device_name(d) for d in devices}
    info["features"] = {name: {"available": ok, "detail": why} for name, (ok, why) in features().items()}
    info["environment"] = {key: os.environ[key] for key in ("FASTCNN_DATA", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
                           if key in os.environ}
    return info


def format_report(info: dict) -> str:
    lines = ["fastcnn environment", ""]
    lines += [f"  {name:<12} {value or 'not installed'}" for name, value in info["versions"].items()]
    lines += [f"  {'platform':<12} {info['platform']}", f"  {'git commit':<12} {info['git_commit'] or '-'}", "",
              "devices"]
    lines += [f"  {name:<12} {desc}" for name, desc in info["devices"].items()]
    lines += ["", "features"]
    for name, state in info["features"].items():
        lines.append(f"  {'yes' if state['available'] else 'no ':<4} {name:<20} {state['detail']}")
    if info["environment"]:
        lines += ["", "environment"] + [f"  {k}={v}" for k, v in info["environment"].items()]
    return "\n".join(lines)

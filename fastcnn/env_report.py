"""``fastcnn env``: versions, devices, and which fastcnn features work here (and why not). Paste it into bug
reports; summary.json and benchmark results carry the same facts (``fastcnn.env``)."""

from __future__ import annotations

import os
import platform

import torch

import fastcnn.ops as ops  # the module, not its names: INTERPRET_ON_CPU is read when the report is made
from fastcnn.data.dali_status import dali_status
from fastcnn.env import device_name, git_commit, versions


def cuda_graph_feature(cuda: bool) -> tuple[bool, str]:
    if not cuda:
        return False, "needs a CUDA GPU"
    return True, ("the whole training step captured as one graph: on in the fast preset, unless the run asks for "
                  "what a graph cannot capture; --no-cuda-graph turns it off")


def features() -> dict[str, tuple[bool, str]]:
    """Feature name -> (available, why or why not)."""
    cuda = torch.cuda.is_available()
    found = {}
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        found["fused Triton kernel"] = ops.fused_kernel_status(device)
    else:
        found["fused Triton kernel"] = (False, "needs a CUDA GPU" + (
            "; TRITON_INTERPRET=1 runs it on this CPU under the interpreter, for tests" if ops.INTERPRET_ON_CPU
            else ""))
    found["native CPU kernel"] = (ops.native_runs_on_cpu(), ops.native_kernel_status())
    found["DALI loader"] = dali_status()
    found["CUDA graphs"] = cuda_graph_feature(cuda)
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

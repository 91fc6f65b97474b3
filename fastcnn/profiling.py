"""Where a training step's time goes: a short torch.profiler run over steps that are already warm.

At the tutorial's batch size a fast GPU finishes SimpleCNN's step in tens of microseconds, so the step is paced
either by the host (every kernel launch, copy or graph replay it issues costs microseconds of Python and driver
time) or by the number of small kernels the GPU runs one after another, not by arithmetic. The figures here say
which, per step:

- ``host_launches``: kernel launches, copies, memsets and graph replays the host issued (CUDA runtime calls);
- ``device_kernels``: what the GPU ran, graph replays' kernels included (kernels, copies, memsets);
- ``device_busy_us``: the time the GPU was busy with them (the union of their intervals), against
  ``wall_us``, the step's wall-clock time under the profiler: busy close to wall means the GPU sets the pace;
- ``top``: the kernels that took the most device time.

On a CPU there is no separate device: ``device_kernels`` counts the aten and fastcnn operators called (those that
other operators call included; the native kernels are the ``fastcnn::native_cpu_*`` ones) and ``top`` ranks them by
their own CPU time (their callees' excluded); the host and busy figures are left out. The profiler adds overhead to
every call, so ``wall_us`` is slower than an unprofiled step: compare it with the kernels' figures, not with the
timed results.

CUDA graphs and the profiler (CUPTI) have a history: a graph captured before the process's first profiler session
could crash or hang when replayed under the profiler (fixed in PyTorch for CUDA >= 12.6), and torch's workaround,
an empty profiler session before any capture (``torch.profiler._utils._init_for_cuda_graphs``), has been reported
to leave later sessions recording no GPU activity at all on CUDA 13. So fastcnn does not apply it; a profile that
recorded no GPU activity says so (``warning``) instead of reporting zeros, and ``bench/gpu_session.sh`` profiles in
a process of its own, apart from the timed runs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from fastcnn.engine import synchronize

TOP_KERNELS = 8
# The CUDA runtime/driver calls by which the host puts work on a stream (a graph replay is one of them).
HOST_LAUNCH_CALLS = frozenset({
    "cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel",
    "cudaMemcpyAsync", "cudaMemsetAsync", "cudaGraphLaunch", "cuGraphLaunch",
})
_NAME_CHARS = 90  # kernel names of templated code run to hundreds of characters


class FirstBatches:
    """The first ``count`` batches of ``loader``'s current epoch; with the loader's ``serve_into`` when it has one,
    so that the epoch loop feeds a CUDA graph as in training."""

    def __init__(self, loader, count: int):
        self.loader, self.count = loader, count

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.count)

    def __len__(self) -> int:
        return min(len(self.loader), self.count)

    def __getattr__(self, name: str):
        if name == "serve_into":
            return getattr(self.loader, name)  # AttributeError when the loader has none
        raise AttributeError(name)


def profile_training(trainer, loader, steps: int) -> dict:
    """Profile ``steps`` steps of ``loader``'s current epoch as ``fastcnn train`` runs them
    (``trainer.train_epoch``: loading, the step or its graph replay, the running sums), from its second step on,
    so that the epoch's own start (its order of samples, setting up its sums) is left out, and its end too unless
    the epoch has no more than ``steps`` batches."""
    device = trainer.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    clock, seen = {}, {"batches": 0}

    def on_batch(progress) -> None:
        seen["batches"] = progress.batches
        edge = progress.batches in (1, steps + 1)  # the window's edges: after the first step and after the last
        if edge:
            synchronize(device)
            clock[progress.batches] = time.perf_counter()
        # At the edges the schedule starts and stops the trace: kineto's own lines go to /dev/null (_kineto_quiet).
        with _stderr_to_devnull() if edge else contextlib.nullcontext():
            prof.step()

    # The first step runs under the profiler's warm-up (traced, then dropped); the next `steps` are recorded.
    with _kineto_quiet(profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps,
                                                                       repeat=1))) as prof:
        trainer.train_epoch(FirstBatches(loader, steps + 1), on_batch=on_batch, check_loss=False)
        if seen["batches"] <= steps:  # a shorter epoch: the window closes with it
            synchronize(device)
            clock[steps + 1] = time.perf_counter()
    ran = seen["batches"] - 1
    if ran < 1:
        raise ValueError("the epoch has fewer than 2 batches: nothing to profile after its first step")
    return summarize(prof.events(), ran, clock[steps + 1] - clock[1], device)


@contextlib.contextmanager
def _kineto_quiet(prof):
    """Enter and leave ``prof`` with the process's stderr (file descriptor 2) sent to /dev/null: when a trace starts
    and stops kineto writes lines of its own there from C++ (``USDT: ... profiler_start``, and on a CPU-only machine
    with a CUDA build of torch ``ERROR: ... gpuGetDeviceCount failed``), which say nothing about the profile. The
    profiled steps in between write to stderr as usual; an exception still propagates."""
    with _stderr_to_devnull():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _stderr_to_devnull():
            prof.__exit__(*sys.exc_info())


@contextlib.contextmanager
def _stderr_to_devnull():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def summarize(events, steps: int, wall_seconds: float, device: torch.device) -> dict:
    """Per-step figures from a profiler's events (see the module's docstring)."""
    if device.type == "cuda":
        # Not the GPU-side spans of record_function scopes (Optimizer.step has one): they are not kernels.
        kernels = [event for event in events if event.device_type == DeviceType.CUDA
                   and not getattr(event, "is_user_annotation", False)]
        launches = sum(1 for event in events if event.device_type == DeviceType.CPU and event.name in HOST_LAUNCH_CALLS)
        spans = [(event.time_range.start, event.time_range.end) for event in kernels]
        durations = [(event.name, event.time_range.end - event.time_range.start) for event in kernels]
        figures = dict(host_launches=launches / steps, device_busy_us=union_length(spans) / steps)
    else:
        kernels = [event for event in events if event.device_type == DeviceType.CPU
                   and event.name.startswith(("aten::", "fastcnn::"))]
        durations = [(event.name, event.self_cpu_time_total) for event in kernels]  # self: children not twice
        figures = dict(host_launches=None, device_busy_us=None)
    figures = dict(steps=steps, device_kernels=len(kernels) / steps, wall_us=1e6 * wall_seconds / steps, **figures,
                   top=top_kernels(durations, steps))
    if device.type == "cuda" and not kernels:
        # Seen with CUDA graphs on some CUDA/CUPTI versions: then the GPU figures would read as zeros.
        figures["warning"] = ("the profiler recorded no GPU activity: GPU figures unavailable (CUPTI and CUDA graphs; "
                              "see fastcnn.profiling)")
    return figures


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlapping kernels on several streams count once)."""
    total, covered_to = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end <= covered_to:
            continue
        total += end - max(start, covered_to)
        covered_to = end
    return total


def top_kernels(durations: list[tuple[str, float]], steps: int, count: int = TOP_KERNELS) -> list[dict]:
    """The ``count`` names with the most total time: calls and microseconds per step."""
    calls, total = defaultdict(int), defaultdict(float)
    for name, duration in durations:
        calls[name] += 1
        total[name] += duration
    ranked = sorted(total, key=total.get, reverse=True)[:count]
    return [dict(name=_short(name), calls=calls[name] / steps, us=total[name] / steps) for name in ranked]


def _short(name: str) -> str:
    return name if len(name) <= _NAME_CHARS else name[:_NAME_CHARS - 3] + "..."


def format_profile(config: str, figures: dict) -> str:
    """Two lines or more for a bench table's foot: the counts, then the top kernels."""
    parts = [f"{figures['device_kernels']:.1f} {'kernels' if figures['host_launches'] is not None else 'operators'}"]
    if figures["host_launches"] is not None:
        parts += [f"{figures['host_launches']:.1f} host launches", f"GPU busy {figures['device_busy_us']:.1f} us"]
    parts.append(f"wall {figures['wall_us']:.1f} us (profiled)")
    lines = [f"profile {config}, per step over {figures['steps']} steps: " + ", ".join(parts)]
    if "warning" in figures:
        lines.append(f"    warning: {figures['warning']}")
    lines += [f"    {kernel['us']:8.1f} us  {kernel['calls']:4.1f}x  {kernel['name']}" for kernel in figures["top"]]
    return "\n".join(lines)

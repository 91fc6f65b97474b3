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

On a CPU there is no separate device: ``device_kernels`` counts the aten operators called (those that other
operators call included) and ``top`` ranks them by their own CPU time (their callees' excluded); the host and busy
figures are left out. The profiler adds overhead to every call, so
``wall_us`` is slower than an unprofiled step: compare it with the kernels' figures, not with the timed results.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fastcnn.engine import synchronize

TOP_KERNELS = 8
# The CUDA runtime/driver calls by which the host puts work on a stream (a graph replay is one of them).
HOST_LAUNCH_CALLS = frozenset({
    "cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel",
    "cudaMemcpyAsync", "cudaMemsetAsync", "cudaGraphLaunch", "cuGraphLaunch",
})
_NAME_CHARS = 90  # kernel names of templated code run to hundreds of characters


def profile_steps(run_steps: Callable[[], int], device: torch.device) -> dict:
    """Profile ``run_steps()``, which runs some training steps and returns how many; per-step figures."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        steps = run_steps()
        synchronize(device)
        wall = time.perf_counter() - started
    if steps < 1:
        raise ValueError("profile_steps: no step ran")
    return summarize(prof.events(), steps, wall, device)


def profile_training(trainer, loader, steps: int) -> dict:
    """Profile the first ``steps`` steps of ``loader``'s current epoch as ``fastcnn train`` runs them
    (``trainer.train_epoch``: loading, the step or its graph replay, the running sums)."""
    def run_steps() -> int:
        ran = 0

        def first_batches():
            nonlocal ran
            for batch in itertools.islice(loader, steps):
                ran += 1
                yield batch

        trainer.train_epoch(first_batches(), check_loss=False)
        return ran

    return profile_steps(run_steps, trainer.device)


def summarize(events, steps: int, wall_seconds: float, device: torch.device) -> dict:
    """Per-step figures from a profiler's events (see the module's docstring)."""
    if device.type == "cuda":
        kernels = [event for event in events if event.device_type == DeviceType.CUDA]
        launches = sum(1 for event in events if event.device_type == DeviceType.CPU and event.name in HOST_LAUNCH_CALLS)
        spans = [(event.time_range.start, event.time_range.end) for event in kernels]
        durations = [(event.name, event.time_range.end - event.time_range.start) for event in kernels]
        figures = dict(host_launches=launches / steps, device_busy_us=union_length(spans) / steps)
    else:
        kernels = [event for event in events if event.device_type == DeviceType.CPU and event.name.startswith("aten::")]
        durations = [(event.name, event.self_cpu_time_total) for event in kernels]  # self: children not twice
        figures = dict(host_launches=None, device_busy_us=None)
    return dict(steps=steps, device_kernels=len(kernels) / steps, wall_us=1e6 * wall_seconds / steps, **figures,
                top=top_kernels(durations, steps))


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
    parts = [f"{figures['device_kernels']:.1f} {'kernels' if figures['host_launches'] is not None else 'aten ops'}"]
    if figures["host_launches"] is not None:
        parts += [f"{figures['host_launches']:.1f} host launches", f"GPU busy {figures['device_busy_us']:.1f} us"]
    parts.append(f"wall {figures['wall_us']:.1f} us (profiled)")
    lines = [f"profile {config}, per step over {figures['steps']} steps: " + ", ".join(parts)]
    lines += [f"    {kernel['us']:8.1f} us  {kernel['calls']:4.1f}x  {kernel['name']}" for kernel in figures["top"]]
    return "\n".join(lines)

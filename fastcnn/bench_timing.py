"""One configuration's measurement for ``fastcnn bench``: timed training steps or one timed epoch, its memory, and
optionally its profile.

Steps (``time_steps``): untimed warm-up steps, then ``repeats`` timed runs of ``steps`` training steps each (data
loading included, because that is what the tutorial loop pays), with the device synchronized before every clock
read. It reports the median run and the spread of the runs (their 20th and 80th percentiles). Epoch
(``time_epoch``): one full epoch, timed like ``fastcnn train``, then evaluated on the test set. Warm-up (compilation,
autotuning, a GPU's cuBLAS/cuDNN set-up) is excluded for every configuration, the reference included.

Memory: ``peak_memory_mb`` is the device's peak allocation while the timed work ran (resident dataset, model,
optimizer, CUDA graph pool included); ``step_memory_mb`` is that peak minus what was allocated before it (the
activations and temporaries of the steps themselves). Each measurement starts after the previous one's memory is
freed.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import time

import torch

from fastcnn.build import build_trainer, pay_one_time_costs
from fastcnn.config import ResolvedConfig
from fastcnn.engine import synchronize
from fastcnn.profiling import profile_training


def time_steps(rc: ResolvedConfig, train_set, test_set, *, steps: int, warmup: int, repeats: int,
               profile: int = 0) -> dict:
    _free_device_memory(rc.torch_device)
    trainer, train_loader, test_loader = build_trainer(rc, train_set, test_set)
    # Compile only what the timed steps run: no evaluation, and the epoch's smaller last batch only if reached.
    reaches_last_batch = warmup + repeats * steps >= len(train_loader)
    compile_seconds = pay_one_time_costs(rc, trainer, train_loader, test_loader, always=True, evaluate=False,
                                         last_batch=reaches_last_batch)

    def batches():
        for epoch in itertools.count():
            train_loader.set_epoch(epoch)
            yield from train_loader

    stream = batches()
    device = rc.torch_device
    baseline = _reset_peak(device)
    for _ in range(warmup):
        trainer.train_step(*next(stream))
    times, rates = [], []
    for _ in range(repeats):
        samples = 0
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            images, labels = next(stream)
            trainer.train_step(images, labels)
            samples += labels.shape[0]  # an epoch's smaller last batch counts for what it holds
        synchronize(device)
        elapsed = time.perf_counter() - started
        times.append(elapsed / steps)
        rates.append(samples / elapsed)
    peaks = _peaks(device, baseline)
    stream.close()  # done with that epoch: the profile iterates the loader afresh
    return dict(ms_per_step=statistics.median(times) * 1e3, ms_per_step_p20=quantile(times, 0.2) * 1e3,
                ms_per_step_p80=quantile(times, 0.8) * 1e3, images_per_second=statistics.median(rates),
                images_per_second_p20=quantile(rates, 0.2), images_per_second_p80=quantile(rates, 0.8),
                compile_seconds=compile_seconds, **peaks,
                kernel_choices=[timing.to_dict() for timing in trainer.kernel_timings],
                cuda_graph=trainer.graph_status, **_profiled(trainer, train_loader, profile))


def time_epoch(rc: ResolvedConfig, train_set, test_set, *, profile: int = 0) -> dict:
    _free_device_memory(rc.torch_device)
    trainer, train_loader, test_loader = build_trainer(rc, train_set, test_set)
    compile_seconds = pay_one_time_costs(rc, trainer, train_loader, test_loader, always=True)
    baseline = _reset_peak(rc.torch_device)
    train_loader.set_epoch(0)
    stats = trainer.train_epoch(train_loader)
    peaks = _peaks(rc.torch_device, baseline)  # training's, before evaluation allocates its own
    _, test_acc = trainer.evaluate(test_loader)
    return dict(epoch_seconds=stats.seconds, images_per_second=stats.images_per_second,
                ms_per_step=1e3 * stats.seconds / max(len(train_loader), 1), test_acc=test_acc,
                compile_seconds=compile_seconds, **peaks,
                kernel_choices=[timing.to_dict() for timing in trainer.kernel_timings],
                cuda_graph=trainer.graph_status, **_profiled(trainer, train_loader, profile))


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (no interpolation: it is one of the measured values)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _profiled(trainer, train_loader, steps: int) -> dict:
    """With ``steps`` > 0, {"profile": per-step figures of that many more training steps}, after the timing."""
    if steps < 1:
        return {}
    train_loader.set_epoch(1)
    try:
        return dict(profile=profile_training(trainer, train_loader, steps))
    except Exception as err:  # the timing measured above stands without its profile
        return dict(profile_error=f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")


def _free_device_memory(device: torch.device) -> None:
    """Free what an earlier configuration left (a trainer and its captured graph refer to each other, so only
    the garbage collector frees them), so that it counts in nobody's peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> int:
    """Start a peak measurement; returns what is allocated now (the baseline)."""
    if device.type != "cuda":
        return 0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peaks(device: torch.device, baseline: int) -> dict:
    if device.type != "cuda":
        return dict(peak_memory_mb=None, step_memory_mb=None)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return dict(peak_memory_mb=peak / 2**20, step_memory_mb=(peak - baseline) / 2**20)

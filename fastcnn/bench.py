"""``fastcnn bench``: what each optimization buys, measured on this device in one run.

Step mode (default): for each configuration, untimed warm-up steps, then ``repeats`` timed runs of ``steps``
training steps each (data loading included, because that is what the tutorial loop pays), with the device
synchronized before every clock read; the median is reported. Epoch mode (``--epoch``): each configuration
trains one full epoch, timed like ``fastcnn train``, and is evaluated on the test set. Warm-up is excluded for
every configuration, the reference included (a GPU's first steps pay cuBLAS/cuDNN set-up).

The reference line runs the tutorial's model, data pipeline (DataLoader + per-sample ToTensor + Normalize),
optimizer and precision in fastcnn's training loop, which reads nothing back per step; the tutorials' loops also
call ``loss.item()`` every step, a host sync that would only make the reference slower on a GPU. Speed-ups over it
are therefore, if anything, understated.

Memory: ``peak_memory_mb`` is the device's peak allocation while the timed work ran (resident dataset, model,
optimizer, CUDA graph pool included); ``step_memory_mb`` is that peak minus what was allocated before it (the
activations and temporaries of the steps themselves). Each configuration starts after the previous one's memory
is freed.

Profile (``--profile N``): after its timing, each configuration trains N + 1 more steps in ``fastcnn train``'s
loop, profiles the last N with torch.profiler, and reports per step what the host launched, what the device ran and
how long it was busy (``fastcnn.profiling``): whether the host or the GPU's string of small kernels sets the pace,
and which kernels.

Interrupted (Ctrl-C, or a time limit's SIGINT): the configurations measured so far are printed and written, the
document says ``"interrupted": true``, and the command still exits 130.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import itertools
import os
import pathlib
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from fastcnn import env
from fastcnn.config import ResolvedConfig, TrainConfig, resolve
from fastcnn.engine import synchronize
from fastcnn.errors import FastcnnError, UsageError
from fastcnn.ops import native_kernel_status, native_runs_on_cpu
from fastcnn.profiling import format_profile
from fastcnn.report import atomic_write_bytes, format_table, refuse_existing, write_results
from fastcnn.train import build_trainer, load_splits, warm_up


@dataclass(frozen=True)
class BenchConfig:
    """A named configuration: TrainConfig overrides on top of what the user passed."""

    name: str
    description: str
    overrides: dict = field(default_factory=dict)
    # Whether the line adds one optimization to the line before it (its "x previous" is that optimization's
    # gain); a line that replaces a component instead (DALI for the device loader) has no "x previous".
    adds_to_previous: bool = True


_REFERENCE = dict(preset="reference")
_DEVICE = dict(preset="reference", loader="device", kernel="torch")
_CL = dict(_DEVICE, channels_last=True)
_AMP = dict(_CL, amp=True)
_COMPILE = dict(_AMP, compile=True)
_FUSED = dict(_COMPILE, kernel="triton")
_FUSED_OPT = dict(_FUSED, fused_optimizer=True)
_GRAPH = dict(_FUSED_OPT, cuda_graph=True)

BENCH_CONFIGS = {c.name: c for c in (
    BenchConfig("reference", "the tutorial program: DataLoader + per-sample transforms, eager fp32 NCHW", _REFERENCE),
    BenchConfig("device", "+ dataset resident on the device, batches gathered there", _DEVICE),
    BenchConfig("channels-last", "+ channels-last layout", _CL),
    BenchConfig("amp", "+ autocast mixed precision (bf16, or fp16 with a GradScaler)", _AMP),
    BenchConfig("compile", "+ torch.compile (the model, and the loss with the count of right predictions)", _COMPILE),
    BenchConfig("fused", "+ fused Triton Conv-ReLU-Pool kernel", _FUSED),
    BenchConfig("fused-opt", "+ the optimizer's fused implementation (one kernel per step)", _FUSED_OPT),
    BenchConfig("cuda-graph", "+ whole training step captured as a CUDA graph", _GRAPH),
    BenchConfig("dali", "the fast preset with the NVIDIA DALI loader in place of the device loader",
                dict(preset="fast", loader="dali"), adds_to_previous=False),
    BenchConfig("fast", "fastcnn's fast preset for this device (what `fastcnn train` runs)", dict(preset="fast"),
                adds_to_previous=False),
    BenchConfig("fast-default-opt", "the fast preset with torch's default optimizer (foreach) instead of the fused "
                "one", dict(preset="fast", fused_optimizer=False), adds_to_previous=False),
    # The fast preset less one choice: whether each still pays at a given batch size. At the tutorial's batch a
    # GPU step is a string of tiny kernels, where autocast's weight casts and channels-last's layout copies are
    # extra kernels that may cost more than they save.
    BenchConfig("fast-fp32", "the fast preset without autocast (float32 throughout)", dict(preset="fast", amp=False),
                adds_to_previous=False),
    BenchConfig("fast-nchw", "the fast preset without channels-last (NCHW throughout)",
                dict(preset="fast", channels_last=False), adds_to_previous=False),
    BenchConfig("fast-cudnn", "the fast preset with the plain cuDNN/aten Conv-ReLU-Pool chain instead of auto's "
                "choice (on a CPU: instead of the native kernel)", dict(preset="fast", kernel="torch"),
                adds_to_previous=False),
    # The fused kernel without torch.compile: what the CPU fast preset runs (compile does not pay on a CPU), so the
    # ablation shows the native kernel's own gain over the "amp" line; on a GPU, the Triton kernel run eagerly.
    BenchConfig("fused-eager", "the amp line + the fused Conv-ReLU-Pool kernel, no torch.compile (on a CPU: the "
                "native C kernel)", dict(_AMP, kernel="triton"), adds_to_previous=False),
)}
ABLATION = ["reference", "device", "channels-last", "amp", "compile", "fused", "fused-opt", "cuda-graph", "dali",
            "fused-eager"]


def parse_configs(text: str) -> list[BenchConfig]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCH_CONFIGS]
    if unknown or not names:
        raise UsageError(f"unknown bench configuration(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from: {', '.join(BENCH_CONFIGS)}")
    return [BENCH_CONFIGS[name] for name in names]


def configured(base: TrainConfig, bench: BenchConfig) -> TrainConfig:
    """The user's options, then the configuration's: a bench line differs from the others only in these."""
    return dataclasses.replace(base, **bench.overrides)


def time_steps(rc: ResolvedConfig, train_set, test_set, *, steps: int, warmup: int, repeats: int,
               profile: int = 0) -> dict:
    _free_device_memory(rc.torch_device)
    trainer, train_loader, test_loader = build_trainer(rc, train_set, test_set)
    # Compile only what the timed steps run: no evaluation, and the epoch's smaller last batch only if reached.
    reaches_last_batch = warmup + repeats * steps >= len(train_loader)
    compile_seconds = warm_up(rc, trainer, train_loader, test_loader, always=True, evaluate=False,
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
    step = statistics.median(times)
    peaks = _peaks(device, baseline)
    stream.close()  # done with that epoch: the profile iterates the loader afresh
    return dict(ms_per_step=step * 1e3, ms_per_step_p20=_quantile(times, 0.2) * 1e3,
                ms_per_step_p80=_quantile(times, 0.8) * 1e3, images_per_second=statistics.median(rates),
                compile_seconds=compile_seconds, **peaks,
                kernel_choices=[timing.to_dict() for timing in trainer.kernel_timings],
                cuda_graph=trainer.graph_status, **_profiled(trainer, train_loader, profile))


def time_epoch(rc: ResolvedConfig, train_set, test_set, *, profile: int = 0) -> dict:
    _free_device_memory(rc.torch_device)
    trainer, train_loader, test_loader = build_trainer(rc, train_set, test_set)
    compile_seconds = warm_up(rc, trainer, train_loader, test_loader, always=True)
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


def _profiled(trainer, train_loader, steps: int) -> dict:
    """With ``steps`` > 0, {"profile": per-step figures of that many more training steps}, after the timing."""
    if steps < 1:
        return {}
    from fastcnn.profiling import profile_training

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


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_bench(base: TrainConfig, configs: list[BenchConfig], *, steps: int = 50, warmup: int = 10,
              repeats: int | None = None, epoch: bool = False, profile: int = 0, log=None) -> dict:
    """Measure ``configs`` on the same data; return the results document.

    Step mode measures each configuration in turn (``repeats`` timed runs after warm-up). Epoch mode runs
    ``repeats`` rounds (default 1), each training one epoch of every configuration in turn (ABAB order), so
    that a slow spell of a shared machine affects all configurations alike; it reports the medians.
    """
    log = log or sys.stderr
    repeats = repeats if repeats is not None else (1 if epoch else 5)
    if min(steps, repeats) < 1 or min(warmup, profile) < 0:
        raise UsageError(f"--steps and --repeats must be >= 1, --warmup and --profile >= 0 (got {steps}, {repeats}, "
                         f"{warmup}, {profile})")
    first = resolve(dataclasses.replace(base, preset="reference"))
    train_set, test_set = load_splits(first)
    rows, runnable = [], []
    for bench in configs:
        row = dict(config=bench.name, description=bench.description)
        rows.append(row)
        try:
            rc = resolve(configured(base, bench))
        except FastcnnError as unavailable:
            row["skipped"] = str(unavailable)
        else:
            if rc.device == "cpu" and rc.kernel == "triton" and not native_runs_on_cpu():
                row["skipped"] = f"the fused kernel has no fast CPU implementation here ({native_kernel_status()})"
            else:
                row["settings"] = dict(loader=rc.loader, amp=rc.amp, amp_dtype=rc.amp_dtype if rc.amp else None,
                                       channels_last=rc.channels_last, compile=rc.compile,
                                       compile_mode=rc.compile_mode if rc.compile else None,
                                       cuda_graph=rc.cuda_graph, kernel=rc.kernel,
                                       fused_optimizer=rc.fused_optimizer)
                runnable.append((row, rc))
        if "skipped" in row:
            print(f"  {bench.name}: skipped: {row['skipped']}", file=log)
    samples: dict[str, list[dict]] = {row["config"]: [] for row, _ in runnable}
    interrupted = False
    try:
        for round_index in range(repeats if epoch else 1):
            for row, rc in runnable:
                if "failed" in row:
                    continue
                print(f"  {row['config']}: measuring" + (f" (round {round_index + 1}/{repeats})" if epoch else ""),
                      file=log)
                try:
                    # Profile once per configuration (the first round): it measures counts, not a time to median.
                    extra = profile if round_index == 0 else 0
                    sample = time_epoch(rc, train_set, test_set, profile=extra) if epoch else time_steps(
                        rc, train_set, test_set, steps=steps, warmup=warmup, repeats=repeats, profile=extra)
                except Exception as err:  # one broken configuration must not hide the others' results
                    row["failed"] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                    print(f"  {row['config']}: failed: {row['failed']}", file=log)
                    continue
                samples[row["config"]].append(sample)
                # Each measurement in the log as it comes: a run killed later still leaves these lines.
                print(f"  {row['config']}: {sample['images_per_second']:,.0f} images/s, "
                      f"{sample['ms_per_step']:.3f} ms/step" +
                      (f", test acc {sample['test_acc']:.2f}%" if epoch else "") + f", graph {sample['cuda_graph']}",
                      file=log, flush=True)
                if "profile" in sample:
                    print(format_profile(row["config"], sample["profile"]), file=log, flush=True)
                if "profile_error" in sample:
                    print(f"  {row['config']}: profile failed: {sample['profile_error']}", file=log, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("  interrupted: reporting the configurations measured so far", file=log)
    rounds_completed = repeats if epoch else 1
    if interrupted and epoch:
        # Interleaved rounds are comparable only whole: keep the rounds every measured configuration finished
        # (or the interrupted first round, where each configuration has at most one run).
        counts = [len(runs) for runs in samples.values() if runs]
        rounds_completed = max(1, min(counts)) if counts else 0
        for name in samples:
            samples[name] = samples[name][:rounds_completed]
    adds_to_previous = {bench.name: bench.adds_to_previous for bench in configs}
    reference_rate = previous_rate = None
    for row, _ in runnable:
        runs = samples[row["config"]]
        if "failed" in row:
            continue
        if not runs:
            row["failed"] = "not measured: the run was interrupted first"
            continue
        if epoch:
            row.update(_median_epoch(runs))
        else:
            row.update(runs[0])
        for key in ("profile", "profile_error"):  # the first round's, whichever run is the median
            row.pop(key, None)
            found = [run[key] for run in runs if key in run]
            if found:
                row[key] = found[0]
        rate = row["images_per_second"]
        reference_rate = reference_rate or rate
        row["speedup_vs_first"] = rate / reference_rate
        if adds_to_previous[row["config"]]:
            row["speedup_vs_previous"] = rate / previous_rate if previous_rate else None
            previous_rate = rate
        else:
            row["speedup_vs_previous"] = None
    device = resolve(base).torch_device
    baseline = next((row["config"] for row in rows if "images_per_second" in row), configs[0].name)
    return dict(
        mode="epoch" if epoch else "steps", profile_steps=profile or None, model=first.model,
        dataset=first.dataset, batch_size=first.batch_size,
        steps=None if epoch else steps, warmup=None if epoch else warmup, repeats=repeats,
        rounds_completed=rounds_completed if epoch else None,
        baseline=baseline, device=str(device), device_name=env.device_name(device), versions=env.versions(),
        # A copy of the tree without .git (the GPU machine's) is told its commit in FASTCNN_GIT_COMMIT.
        git_commit=env.git_commit() or os.environ.get("FASTCNN_GIT_COMMIT") or None,
        command=" ".join(["fastcnn"] + sys.argv[1:]),
        date=datetime.datetime.now().isoformat(timespec="seconds"), interrupted=interrupted, results=rows)


def _median_epoch(runs: list[dict]) -> dict:
    """The run of median epoch time; with an even count, the median of the two middle runs' figures (the faster
    of the two alone would flatter whichever configuration it is)."""
    seconds = [run["epoch_seconds"] for run in runs]
    middle = dict(sorted(runs, key=lambda run: run["epoch_seconds"])[(len(runs) - 1) // 2])
    for key in ("epoch_seconds", "images_per_second", "ms_per_step", "test_acc"):
        middle[key] = statistics.median(run[key] for run in runs)
    return dict(middle, epoch_seconds_all=seconds, test_acc_all=[run["test_acc"] for run in runs])


def format_results(doc: dict) -> str:
    epoch = doc["mode"] == "epoch"
    columns = [("config", "config", "s"), ("images_per_second", "images/s", ",.0f"), ("ms_per_step", "ms/step", ".3f")]
    if epoch:
        columns += [("epoch_seconds", "epoch s", ".2f"), ("test_acc", "test acc", ".2f")]
    columns += [("speedup_vs_first", f"x {doc['baseline']}", ".2f"), ("speedup_vs_previous", "x previous", ".2f"),
                ("peak_memory_mb", "peak MiB", ".1f"), ("step_memory_mb", "step MiB", ".1f")]
    measured = [row for row in doc["results"] if "images_per_second" in row]
    how = (f"median of {doc['rounds_completed']} interleaved round(s)" if epoch else
           f"median of {doc['repeats']} x {doc['steps']} steps after {doc['warmup']} warm-up")
    lines = [f"{doc['model']} on {doc['dataset']}, batch {doc['batch_size']}, {doc['device_name']}, torch "
             f"{doc['versions']['torch']}; {how}", ""]
    lines.append(format_table(measured, columns) if measured else "(nothing measured)")
    if doc.get("interrupted"):
        lines.append("INTERRUPTED: only the configurations above were measured")
    lines += [format_profile(row["config"], row["profile"]) for row in measured if "profile" in row]
    lines += [f"profile {row['config']} failed: {row['profile_error']}" for row in measured if "profile_error" in row]
    for row in doc["results"]:
        for outcome in ("skipped", "failed"):
            if outcome in row:
                lines.append(f"{outcome} {row['config']}: {row[outcome]}")
    return "\n".join(lines)


def plot_results(path: pathlib.Path, doc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in doc["results"] if "images_per_second" in row]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(measured) + 1.5))
    names = [row["config"] for row in measured][::-1]
    rates = [row["images_per_second"] for row in measured][::-1]
    bars = ax.barh(names, rates, color="tab:blue")
    for bar, row in zip(bars, measured[::-1], strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {row['speedup_vs_first']:.1f}x",
                va="center")
    ax.set_xlabel("training images / s (higher is better)")
    ax.set_title(f"{doc['model']}, batch {doc['batch_size']}, {doc['device_name']}", fontsize=9)
    ax.set_xlim(0, max(rates) * 1.2 if rates else 1)
    fig.tight_layout()
    atomic_write_bytes(path, lambda file: fig.savefig(file, format="png", dpi=100))
    plt.close(fig)


def run_bench_command(args, base: TrainConfig) -> dict | None:
    if args.list:
        for bench in BENCH_CONFIGS.values():
            print(f"{bench.name:<14} {bench.description}")
        print(f"\n--ablation runs: {', '.join(ABLATION)}")
        return None
    configs = parse_configs(",".join(ABLATION) if args.ablation else args.configs)
    refuse_existing((args.json, args.plot), args.overwrite)
    base = dataclasses.replace(base, progress=False, dataset=base.dataset or "synthetic")
    doc = run_bench(base, configs, steps=args.steps, warmup=args.warmup, repeats=args.repeats, epoch=args.epoch,
                    profile=args.profile)
    print(format_results(doc))
    write_results(doc, args.json, args.plot, plot_results)
    if doc["interrupted"]:
        raise KeyboardInterrupt  # written, and still the exit status of an interrupted command
    return doc

"""``fastcnn bench``: what each optimization buys, measured on this device in one run.

The configurations are named in ``fastcnn.bench_configs``; each is measured by ``fastcnn.bench_timing`` (step mode,
the default: the median of ``repeats`` timed runs of ``steps`` steps after warm-up; epoch mode, ``--epoch``: whole
epochs with test accuracy) and shown by ``fastcnn.bench_table``. This module runs them in turn and puts the results
document together: speed-ups over the first configuration and, along the ablation, over the line before.

The reference line runs the tutorial's model, data pipeline (DataLoader + per-sample ToTensor + Normalize),
optimizer and precision in fastcnn's training loop, which reads nothing back per step; the tutorials' loops also
call ``loss.item()`` every step, a host sync that would only make the reference slower on a GPU. Speed-ups over it
are therefore, if anything, understated.

Profile (``--profile N``): after its timing, each configuration trains N + 1 more steps in ``fastcnn train``'s
loop, profiles the last N with torch.profiler, and reports per step what the host launched, what the device ran and
how long it was busy (``fastcnn.profiling``): whether the host or the GPU's string of small kernels sets the pace,
and which kernels.

Output: one line per measurement on stderr as it comes (a run killed later still leaves them), then the table on
stdout with, at its foot, the profiles, what was skipped or failed and why, each said once. ``--verbose`` adds when
each measurement starts and every reason as it arises.

Interrupted (Ctrl-C, SIGTERM, or a time limit's SIGINT, however the process was started: see
``fastcnn.bench_interrupt``): the configurations measured so far are printed and written, the document says
``"interrupted": true``, one line says what was measured, and the command exits 128 + the signal (130, 143).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import signal
import statistics
import sys

from fastcnn.bench_configs import ABLATION, BenchConfig, configured, format_config_list, parse_configs
from fastcnn.bench_interrupt import StopSignals
from fastcnn.bench_table import NOT_MEASURED, format_results, plot_results
from fastcnn.bench_timing import time_epoch, time_steps
from fastcnn.build import load_splits
from fastcnn.config import ResolvedConfig, TrainConfig, resolve
from fastcnn.data.dali_status import dali_status
from fastcnn.env import device_name, git_commit, versions
from fastcnn.errors import FastcnnError, UsageError
from fastcnn.ops import native_kernel_status, native_runs_on_cpu
from fastcnn.profiling import format_profile
from fastcnn.report import refuse_existing, write_results
from fastcnn.stopping import Interrupted
from fastcnn.vocabulary import canonical_kernel

__all__ = ["run_bench", "run_bench_command"]


def run_bench(base: TrainConfig, configs: list[BenchConfig], *, steps: int = 50, warmup: int = 10,
              repeats: int | None = None, epoch: bool = False, profile: int = 0, log=None, verbose: bool = False,
              stop: StopSignals | None = None) -> dict:
    """Measure ``configs`` on the same data; return the results document.

    Step mode measures each configuration in turn (``repeats`` timed runs after warm-up). Epoch mode runs
    ``repeats`` rounds (default 1), each training one epoch of every configuration in turn (ABAB order), so
    that a slow spell of a shared machine affects all configurations alike; it reports the medians. ``stop``:
    the command's signal handlers (a signal then interrupts the measuring); without it, only Ctrl-C's own
    KeyboardInterrupt does.
    """
    log = log or sys.stderr
    repeats = repeats if repeats is not None else (1 if epoch else 5)
    if min(steps, repeats) < 1 or min(warmup, profile) < 0:
        raise UsageError(f"--steps and --repeats must be >= 1, --warmup and --profile >= 0 (got {steps}, {repeats}, "
                         f"{warmup}, {profile})")
    first = resolve(dataclasses.replace(base, preset="reference"))
    rows, runnable = [], []
    for bench in configs:
        row = dict(config=bench.name, description=bench.description)
        rows.append(row)
        rc, reason = _resolved(base, bench, first.device)
        if reason is not None:
            row["skipped"] = reason
            if verbose:
                print(f"  {bench.name}: skipped: {reason}", file=log)
            continue
        row["settings"] = dict(loader=rc.loader, amp=rc.amp, amp_dtype=rc.amp_dtype if rc.amp else None,
                               channels_last=rc.channels_last, compile=rc.compile,
                               compile_mode=rc.compile_mode if rc.compile else None, cuda_graph=rc.cuda_graph,
                               kernel=canonical_kernel(rc.kernel), fused_optimizer=rc.fused_optimizer)
        runnable.append((row, rc))
    samples: dict[str, list[dict]] = {row["config"]: [] for row, _ in runnable}
    interrupted_by = None
    try:
        with stop.measuring() if stop is not None else contextlib.nullcontext():
            train_set, test_set = load_splits(first)
            for round_index in range(repeats if epoch else 1):
                for row, rc in runnable:
                    if "failed" in row:
                        continue
                    _measure(row, rc, train_set, test_set, round_index, samples[row["config"]], steps=steps,
                             warmup=warmup, repeats=repeats, epoch=epoch, profile=profile, log=log, verbose=verbose)
    except KeyboardInterrupt as interruption:  # BenchInterrupted (a signal), or Ctrl-C's default handler's
        interrupted_by = signal.Signals(getattr(interruption, "signum", signal.SIGINT)).name
    rounds_completed = repeats if epoch else 1
    if interrupted_by and epoch:
        # Interleaved rounds are comparable only whole: keep the rounds every measured configuration finished
        # (or the interrupted first round, where each configuration has at most one run).
        counts = [len(runs) for runs in samples.values() if runs]
        rounds_completed = max(1, min(counts)) if counts else 0
        for name in samples:
            samples[name] = samples[name][:rounds_completed]
    _combine(runnable, samples, epoch, {bench.name: bench.adds_to_previous for bench in configs})
    device = resolve(base).torch_device
    baseline = next((row["config"] for row in rows if "images_per_second" in row), configs[0].name)
    return dict(
        mode="epoch" if epoch else "steps", profile_steps=profile or None, model=first.model,
        dataset=first.dataset, batch_size=first.batch_size,
        steps=None if epoch else steps, warmup=None if epoch else warmup, repeats=repeats,
        rounds_completed=rounds_completed if epoch else None,
        baseline=baseline, device=str(device), device_name=device_name(device), versions=versions(),
        # A copy of the tree without .git (the GPU machine's) is told its commit in FASTCNN_GIT_COMMIT.
        git_commit=git_commit() or os.environ.get("FASTCNN_GIT_COMMIT") or None,
        command=" ".join(["fastcnn"] + sys.argv[1:]),
        date=datetime.datetime.now().isoformat(timespec="seconds"), interrupted=interrupted_by is not None,
        interrupted_by=interrupted_by, results=rows)


def _resolved(base: TrainConfig, bench: BenchConfig, device: str) -> tuple[ResolvedConfig | None, str | None]:
    """The configuration resolved on this machine, or why it cannot run here, in the bench's words: its options are
    the configuration's, not the user's, so the resolver's advice about flags ("drop the flag") would mislead."""
    try:
        rc = resolve(configured(base, bench))
    except FastcnnError as unavailable:
        return None, _unavailable_here(bench, device) or str(unavailable)
    if rc.device == "cpu" and canonical_kernel(rc.kernel) == "fused" and not native_runs_on_cpu():
        return None, _unavailable_here(bench, rc.device)
    return rc, None


def _unavailable_here(bench: BenchConfig, device: str) -> str | None:
    """What this machine lacks for ``bench``, in plain words; None when it is something else."""
    overrides = bench.overrides
    if overrides.get("cuda_graph") and device != "cuda":
        return "a whole-step CUDA graph needs a CUDA GPU"
    if overrides.get("loader") == "dali" and not dali_status()[0]:
        return f"NVIDIA DALI is not available here: {dali_status()[1]}"
    if device == "cpu" and canonical_kernel(overrides.get("kernel", "auto")) == "fused" and not native_runs_on_cpu():
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 is set, so the fused kernel would run in Triton's interpreter (a test mode, "
                    "too slow to time); unset it to time the native CPU kernel")
        return f"the fused kernel has no native CPU build here ({native_kernel_status()})"
    return None


def _measure(row: dict, rc: ResolvedConfig, train_set, test_set, round_index: int, runs: list[dict], *, steps: int,
             warmup: int, repeats: int, epoch: bool, profile: int, log, verbose: bool) -> None:
    """One measurement of one configuration, added to ``runs`` (or its failure to ``row["failed"]``), then said in
    one line on ``log``: a line that says a configuration was measured means the results hold it, even if a signal
    comes right after. Profiled in the first round only: a profile counts kernels, not a time to take a median of."""
    name = f"{row['config']} (round {round_index + 1}/{repeats})" if epoch and repeats > 1 else row["config"]
    if verbose:
        print(f"  {name}: measuring", file=log, flush=True)
    extra = profile if round_index == 0 else 0
    try:
        runs.append(time_epoch(rc, train_set, test_set, profile=extra) if epoch else time_steps(
            rc, train_set, test_set, steps=steps, warmup=warmup, repeats=repeats, profile=extra))
    except Exception as err:  # one broken configuration must not hide the others' results
        row["failed"] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        print(f"  {name}: failed" + (f": {row['failed']}" if verbose else " (why: below the table)"), file=log,
              flush=True)
        return
    sample = runs[-1]
    graph = f", graph {sample['cuda_graph']}" if sample["cuda_graph"] != "off" else ""
    print(f"  {name}: {sample['images_per_second']:,.0f} images/s, {sample['ms_per_step']:.3f} ms/step" +
          (f", test acc {sample['test_acc']:.2f}%" if epoch else "") + graph, file=log, flush=True)
    if verbose and "profile" in sample:
        print(format_profile(row["config"], sample["profile"]), file=log, flush=True)


def _combine(runnable: list[tuple[dict, ResolvedConfig]], samples: dict[str, list[dict]], epoch: bool,
             adds_to_previous: dict[str, bool]) -> None:
    """Each configuration's figures into its row (the median run in epoch mode), with its speed-ups."""
    reference_rate = previous_rate = None
    for row, _ in runnable:
        runs = samples[row["config"]]
        if "failed" in row:
            continue
        if not runs:
            row["failed"] = NOT_MEASURED
            continue
        row.update(_median_epoch(runs) if epoch else runs[0])
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


def _median_epoch(runs: list[dict]) -> dict:
    """The run of median epoch time; with an even count, the median of the two middle runs' figures (the faster
    of the two alone would flatter whichever configuration it is)."""
    seconds = [run["epoch_seconds"] for run in runs]
    middle = dict(sorted(runs, key=lambda run: run["epoch_seconds"])[(len(runs) - 1) // 2])
    for key in ("epoch_seconds", "images_per_second", "ms_per_step", "test_acc"):
        middle[key] = statistics.median(run[key] for run in runs)
    return dict(middle, epoch_seconds_all=seconds, test_acc_all=[run["test_acc"] for run in runs])


def run_bench_command(args, base: TrainConfig) -> dict | None:
    if args.list:
        print(format_config_list())
        return None
    configs = parse_configs(",".join(ABLATION) if args.ablation else args.configs)
    refuse_existing((args.json, args.plot), args.overwrite)
    base = dataclasses.replace(base, progress=False, dataset=base.dataset or "synthetic")
    with StopSignals() as stop:
        doc = run_bench(base, configs, steps=args.steps, warmup=args.warmup, repeats=args.repeats, epoch=args.epoch,
                        profile=args.profile, verbose=getattr(args, "verbose", False), stop=stop)
        print(format_results(doc))
        write_results(doc, args.json, args.plot, plot_results)
    if doc["interrupted"] or stop.signum is not None:
        if not doc["interrupted"]:  # the signal came once everything was measured: all of it was written
            print(f"fastcnn: {stop.name} received after the results were written", file=sys.stderr)
        # Written, and still the exit status of an interrupted command (128 + the signal).
        raise Interrupted(stop.signum or signal.Signals[doc["interrupted_by"]].value)
    return doc

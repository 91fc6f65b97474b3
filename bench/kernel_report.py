"""Read the fused-kernel benchmark JSON (pytest-benchmark's, from bench/test_bench_conv_relu_pool.py) and say
what it shows: per layer, batch, dtype and pass, the fused kernel's speed-up over cuDNN and over torch.compile
(max-autotune), the training step's peak-memory ratio, and whether the fused kernel's goals on an H100 hold.

    python bench/kernel_report.py bench/results/gpu-h100-kernels.json [--json summary.json]

Ratios are of medians taken in the same pytest run; a missing provider is shown as "-", never guessed. Times are
per call: a benchmark round of ``extra_info["calls_per_round"]`` back-to-back calls is divided by that count. The
CUDA-event medians of ``triton.testing.do_bench`` (``do_bench_us``), where present, give a second pair of ratios
(``do_bench_vs_cudnn``, ``do_bench_vs_compile``): GPU time alone, without the host's launch overhead.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections import defaultdict

from fastcnn.errors import FastcnnError
from fastcnn.report import refuse_existing, write_json

# The fused kernel's goals, on SimpleCNN's layer, batch 512, bf16, forward+backward, on an H100: at least 2x cuDNN's
# speed and 1.3x torch.compile's (max-autotune), and a training step peaking at a third of cuDNN's memory or less.
TARGET = dict(pass_="forward_backward", layer="simplecnn.conv1", batch=512, dtype="bf16")
TARGET_SPEEDUP_VS_CUDNN = 2.0
TARGET_SPEEDUP_VS_COMPILE = 1.3
TARGET_MEMORY_RATIO = 3.0


def load(path: pathlib.Path) -> dict:
    data = json.loads(path.read_text())
    if "benchmarks" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON (no 'benchmarks' list)")
    return data


def kernel_rows(data: dict) -> list[dict]:
    """One row per (pass, layer, batch, dtype): each provider's median seconds and the fused speed-ups."""
    cells: dict[tuple, dict[str, float]] = defaultdict(dict)
    events: dict[tuple, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "layer" not in info or "provider" not in info:
            continue
        key = (info["pass"], info["layer"], info["batch"], info["dtype"])
        cells[key][info["provider"]] = bench["stats"]["median"] / info.get("calls_per_round", 1)
        if info.get("do_bench_us") is not None:
            events[key][info["provider"]] = info["do_bench_us"]
    rows = []
    for key, medians in sorted(cells.items()):
        pass_, layer, batch, dtype = key
        fused, gpu = medians.get("fused"), events.get(key, {})
        row = dict(pass_=pass_, layer=layer, batch=batch, dtype=dtype,
                   fused_us=_us(fused), cudnn_us=_us(medians.get("cudnn")),
                   compile_us=_us(medians.get("max_autotune")),
                   speedup_vs_cudnn=_ratio(medians.get("cudnn"), fused),
                   speedup_vs_compile=_ratio(medians.get("max_autotune"), fused),
                   do_bench_vs_cudnn=_ratio(gpu.get("cudnn"), gpu.get("fused")),
                   do_bench_vs_compile=_ratio(gpu.get("max_autotune"), gpu.get("fused")))
        rows.append(row)
    return rows


def memory_rows(data: dict) -> list[dict]:
    """One row per (model, batch, amp): peak bytes of one training step, unfused over fused."""
    cells: dict[tuple, dict[str, int]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "peak_allocated_bytes" in info:
            cells[(info["model"], info["batch"], info["amp"])][info["provider"]] = info["peak_allocated_bytes"]
    return [dict(model=model, batch=batch, amp=amp, fused_mib=_mib(peaks.get("fused")),
                 cudnn_mib=_mib(peaks.get("cudnn")), memory_ratio=_ratio(peaks.get("cudnn"), peaks.get("fused")))
            for (model, batch, amp), peaks in sorted(cells.items())]


def targets(kernels: list[dict], memory: list[dict]) -> dict:
    """The fused kernel's goals (TARGET_*), each with the measured value (None when the JSON lacks the measurement)."""
    row = next((r for r in kernels if all(r[k] == v for k, v in TARGET.items())), {})
    mem = next((r for r in memory if (r["model"], r["batch"], r["amp"]) == ("simplecnn", 512, "bf16")), {})

    def check(value, goal):
        return dict(measured=value, goal=goal, met=None if value is None else value >= goal)

    return {"speedup_vs_cudnn": check(row.get("speedup_vs_cudnn"), TARGET_SPEEDUP_VS_CUDNN),
            "speedup_vs_compile": check(row.get("speedup_vs_compile"), TARGET_SPEEDUP_VS_COMPILE),
            "activation_memory_ratio": check(mem.get("memory_ratio"), TARGET_MEMORY_RATIO)}


def report(data: dict) -> dict:
    kernels, memory = kernel_rows(data), memory_rows(data)
    first = next((b.get("extra_info", {}) for b in data["benchmarks"]), {})
    context = {k: first.get(k) for k in ("device", "capability", "torch", "triton", "cuda", "cudnn")}
    context["commit"] = data.get("commit_info", {}).get("id")
    context["datetime"] = data.get("datetime")
    return dict(context=context, kernels=kernels, memory=memory, targets=targets(kernels, memory),
                slower=[r for r in kernels if r["speedup_vs_cudnn"] is not None and r["speedup_vs_cudnn"] < 1])


def format_report(summary: dict) -> str:
    ctx = summary["context"]
    lines = [f"{ctx['device']} | torch {ctx['torch']} | triton {ctx['triton']} | CUDA {ctx['cuda']} | cuDNN "
             f"{ctx['cudnn']} | commit {(ctx['commit'] or '?')[:10]}", "",
             f"{'pass':<17}{'layer':<17}{'batch':>6} {'dtype':<5}{'fused us':>10}{'cuDNN us':>10}{'compile us':>11}"
             f"{'x cuDNN':>9}{'x compile':>10}{'GPU-time x cuDNN / x compile':>30}"]
    for r in summary["kernels"]:
        lines.append(f"{r['pass_']:<17}{r['layer']:<17}{r['batch']:>6} {r['dtype']:<5}{_fmt(r['fused_us'])}"
                     f"{_fmt(r['cudnn_us'])}{_fmt(r['compile_us'], 11)}{_fmt(r['speedup_vs_cudnn'], 9, 2)}"
                     f"{_fmt(r.get('speedup_vs_compile'), 10, 2)}{_fmt(r.get('do_bench_vs_cudnn'), 19, 2)} /"
                     f"{_fmt(r.get('do_bench_vs_compile'), 9, 2)}")
    if summary["memory"]:
        lines += ["", f"{'train step peak':<17}{'batch':>6} {'amp':<5}{'fused MiB':>10}{'cuDNN MiB':>10}{'ratio':>8}"]
        for r in summary["memory"]:
            lines.append(f"{r['model']:<17}{r['batch']:>6} {r['amp']:<5}{_fmt(r['fused_mib'])}{_fmt(r['cudnn_mib'])}"
                         f"{_fmt(r['memory_ratio'], 8, 2)}")
    lines.append("")
    for name, t in summary["targets"].items():
        verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
        value = "-" if t["measured"] is None else f"{t['measured']:.2f}x"
        lines.append(f"target {name}: {value} (goal >= {t['goal']}x): {verdict}")
    if summary["slower"]:
        lines.append(f"the fused kernel is slower than cuDNN in {len(summary['slower'])} of "
                     f"{len(summary['kernels'])} cases; kernel='auto' measures and picks per shape")
    return "\n".join(lines)


def _us(seconds):
    return None if seconds is None else seconds * 1e6


def _mib(count):
    return None if count is None else count / 2**20


def _ratio(numerator, denominator):
    return None if not numerator or not denominator else numerator / denominator


def _fmt(value, width=10, digits=1):
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=pathlib.Path, help="pytest-benchmark JSON of test_bench_conv_relu_pool")
    parser.add_argument("--json", type=pathlib.Path, help="also write the summary here (a new file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    try:
        refuse_existing([args.json], args.overwrite)
        summary = report(load(args.results))
    except (OSError, ValueError, FastcnnError) as err:
        print(f"kernel_report: {err}", file=sys.stderr)
        return 1
    print(format_report(summary))
    if args.json:
        write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

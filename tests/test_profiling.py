"""fastcnn.profiling: per-step kernel, launch and busy-time figures, and `fastcnn bench --profile`."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from fastcnn.cli import main
from fastcnn.data import DeviceLoader
from fastcnn.data.synthetic import synthetic_dataset
from fastcnn.engine import Trainer
from fastcnn.models import SimpleCNN
from fastcnn.profiling import FirstBatches, format_profile, profile_training, summarize, top_kernels, union_length


def _event(name, device_type, start=0.0, end=0.0, annotation=False):
    return SimpleNamespace(name=name, device_type=device_type, time_range=SimpleNamespace(start=start, end=end),
                           self_cpu_time_total=end - start, is_user_annotation=annotation)


def test_union_length_counts_overlaps_once():
    assert union_length([]) == 0
    assert union_length([(0, 10), (5, 15), (20, 25), (21, 22), (30, 30)]) == 20
    assert union_length([(5, 15), (0, 10)]) == 15  # unsorted input


def test_top_kernels_ranks_by_total_time_per_step():
    durations = [("a", 1.0)] * 6 + [("b", 5.0)] * 2 + [("c", 0.5)]
    top = top_kernels(durations, steps=2, count=2)
    assert [(k["name"], k["calls"], k["us"]) for k in top] == [("b", 1.0, 5.0), ("a", 3.0, 3.0)]
    assert top_kernels([("x" * 200, 1.0)], steps=1)[0]["name"].endswith("...")


def test_cuda_figures_from_events():
    # Two steps: per step one graph replay and one copy launched by the host; the GPU ran three kernels, two of
    # them overlapping, busy 10 us (0-6 and 4-10) and 5 us (20-25) in all.
    events = [_event("cudaGraphLaunch", DeviceType.CPU), _event("cudaMemcpyAsync", DeviceType.CPU),
              _event("cudaGraphLaunch", DeviceType.CPU), _event("cudaMemcpyAsync", DeviceType.CPU),
              _event("aten::copy_", DeviceType.CPU),
              _event("gemm", DeviceType.CUDA, 0, 6), _event("relu", DeviceType.CUDA, 4, 10),
              _event("gemm", DeviceType.CUDA, 20, 25),
              _event("Optimizer.step#Adam.step", DeviceType.CUDA, 0, 40, annotation=True)]  # a span, not a kernel
    figures = summarize(events, steps=2, wall_seconds=40e-6, device=torch.device("cuda"))
    assert figures["host_launches"] == 2 and figures["device_kernels"] == 1.5
    assert figures["device_busy_us"] == 7.5 and figures["wall_us"] == pytest.approx(20)
    assert figures["top"][0] == dict(name="gemm", calls=1.0, us=5.5)
    text = format_profile("fast", figures)
    assert "1.5 kernels" in text and "2.0 host launches" in text and "GPU busy 7.5 us" in text
    assert "warning" not in figures
    silent = summarize(events[:5], steps=2, wall_seconds=40e-6, device=torch.device("cuda"))
    assert silent["device_kernels"] == 0 and "no GPU activity" in format_profile("fast", silent)


def test_profile_training_records_the_steps_after_the_epochs_first(monkeypatch):
    import fastcnn.profiling

    recorded = []
    real_summarize = fastcnn.profiling.summarize

    def recording(events, *args):
        recorded.append({event.name for event in events})
        return real_summarize(events, *args)

    monkeypatch.setattr(fastcnn.profiling, "summarize", recording)
    torch.manual_seed(0)
    data = synthetic_dataset(200, seed=0)
    loader = DeviceLoader(data, 32, seed=0)
    trainer = Trainer(SimpleCNN(kernel="aten"), device=torch.device("cpu"))
    figures = profile_training(trainer, loader, steps=3)
    assert figures["steps"] == 3 and figures["host_launches"] is None and figures["device_busy_us"] is None
    assert " operators, wall " in format_profile("device", figures)  # aten's and fastcnn's: not "kernels" on a CPU
    names = {kernel["name"] for kernel in figures["top"]}
    assert figures["device_kernels"] > 10 and names and all(name.startswith("aten::") for name in names)
    # Steps, not the epoch's start: no order of samples drawn, and no sums set up, in the window.
    assert "aten::mkldnn_convolution" in recorded[0] or "aten::convolution" in recorded[0]
    assert "aten::randperm" not in recorded[0] and "aten::zeros" not in recorded[0]
    short = profile_training(trainer, DeviceLoader(data, 150, seed=0), steps=5)  # only 2 batches in the epoch
    assert short["steps"] == 1
    with pytest.raises(ValueError, match="fewer than 2 batches"):
        profile_training(trainer, DeviceLoader(data, 200, seed=0), steps=5)


def test_first_batches_passes_serve_into_through_only_when_the_loader_has_it():
    loader = DeviceLoader(synthetic_dataset(100), 32)
    first = FirstBatches(loader, 2)
    assert len(first) == 2 and len(list(first)) == 2 and first.serve_into == loader.serve_into
    assert not hasattr(FirstBatches([1, 2, 3], 2), "serve_into") and list(FirstBatches([1, 2, 3], 2)) == [1, 2]


def test_bench_profile_reports_per_configuration_once(tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    code = main(["bench", "--synthetic-size", "600,100", "--steps", "2", "--warmup", "0", "--repeats", "1",
                 "--configs", "device", "--profile", "2", "--json", str(json_path)])
    captured = capsys.readouterr()
    doc = json.loads(json_path.read_text())
    assert code == 0 and doc["profile_steps"] == 2
    assert doc["results"][0]["profile"]["steps"] == 2
    assert "profile device, per step over 2 steps" in captured.out  # with the table, on stdout
    assert (captured.out + captured.err).count("profile device, per step") == 1


def test_bench_refuses_a_negative_profile(capsys):
    assert main(["bench", "--profile", "-1"]) == 2
    assert "--profile" in capsys.readouterr().err


def test_a_failed_profile_keeps_the_timing_and_says_why(tmp_path, capsys, monkeypatch):
    import fastcnn.bench_timing

    def broken(*args):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")

    monkeypatch.setattr(fastcnn.bench_timing, "profile_training", broken)
    json_path = tmp_path / "bench.json"
    code = main(["bench", "--synthetic-size", "600,100", "--steps", "2", "--warmup", "0", "--repeats", "1",
                 "--configs", "device", "--profile", "2", "--json", str(json_path)])
    row = json.loads(json_path.read_text())["results"][0]
    assert code == 0 and row["images_per_second"] > 0 and "profile" not in row
    assert row["profile_error"] == "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED"
    assert "profile device failed: RuntimeError" in capsys.readouterr().out


def test_a_cpu_profile_shows_the_native_kernels(monkeypatch):
    from fastcnn.kernels import conv_relu_pool_cpu

    from fastcnn import ops

    if conv_relu_pool_cpu.LIBRARY is None:
        pytest.skip(conv_relu_pool_cpu.STATUS)
    monkeypatch.setattr(ops, "INTERPRET_ON_CPU", False)
    torch.manual_seed(0)
    loader = DeviceLoader(synthetic_dataset(200, seed=0), 32, seed=0)
    trainer = Trainer(SimpleCNN(kernel="fused"), device=torch.device("cpu"))
    names = {kernel["name"] for kernel in profile_training(trainer, loader, steps=3)["top"]}
    assert {"fastcnn::native_cpu_forward", "fastcnn::native_cpu_backward_weight"} & names, names


def test_bench_profile_prints_no_noise():
    # kineto writes USDT start/stop lines (and, for a CUDA build on a CPU-only machine, a gpuGetDeviceCount ERROR)
    # from C++ when a trace starts and stops; the profile says nothing more for them. And bench itself says each
    # thing once: no line twice, no "measuring" lines (those are --verbose's).
    # As a user runs it: without the tests' TRITON_INTERPRET=1, so that the native CPU kernel is what it profiles.
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "fastcnn", "bench", "--device", "cpu", "--configs", "fast",
                             "--steps", "2", "--warmup", "1", "--repeats", "1", "--profile", "2"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "profile fast, per step over 2 steps" in output
    assert "USDT" not in output and "gpuGetDeviceCount" not in output, output
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)) and output.count("profile fast, per step") == 1, output
    assert "measuring" not in output and "Warning" not in output, output

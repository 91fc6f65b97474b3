"""bench/kernel_report.py turns the GPU kernel benchmark JSON into speed-ups, memory ratios and verdicts on the goals;
tested here on a small document shaped like pytest-benchmark's."""

import importlib.util
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("kernel_report", REPO / "bench" / "kernel_report.py")
kernel_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel_report)

VERSIONS = dict(device="NVIDIA H100 80GB HBM3", capability="9.0", torch="2.11.0", triton="3.6.0", cuda="13.0",
                cudnn="91000")


def timing(provider, seconds, *, layer="simplecnn.conv1", batch=512, dtype="bf16", pass_="forward_backward"):
    return dict(stats=dict(median=seconds), extra_info=dict(VERSIONS, provider=provider, layer=layer, batch=batch,
                                                            dtype=dtype, **{"pass": pass_}))


def memory(provider, peak, *, model="simplecnn", batch=512, amp="bf16"):
    return dict(stats=dict(median=1e-3), extra_info=dict(VERSIONS, provider=provider, model=model, batch=batch,
                                                         amp=amp, peak_allocated_bytes=peak))


def document(*benchmarks):
    return dict(benchmarks=list(benchmarks), commit_info=dict(id="abc123def456"), datetime="2026-11-22T10:00:00")


def test_speedups_memory_and_targets():
    doc = document(timing("fused", 100e-6), timing("cudnn", 250e-6), timing("max_autotune", 120e-6),
                   timing("fused", 50e-6, batch=64), timing("cudnn", 40e-6, batch=64),
                   memory("fused", 10 * 2**20), memory("cudnn", 35 * 2**20))
    summary = kernel_report.report(doc)
    target_row = next(r for r in summary["kernels"] if r["batch"] == 512)
    assert target_row["speedup_vs_cudnn"] == pytest.approx(2.5)
    assert target_row["speedup_vs_compile"] == pytest.approx(1.2)
    assert summary["targets"]["speedup_vs_cudnn"]["met"] is True
    assert summary["targets"]["speedup_vs_compile"]["met"] is False  # 1.2 < 1.3
    assert summary["targets"]["activation_memory_ratio"]["measured"] == pytest.approx(3.5)
    small = next(r for r in summary["kernels"] if r["batch"] == 64)
    assert small["speedup_vs_compile"] is None  # not measured: shown as missing, never guessed
    assert summary["slower"] == [small]  # the fused kernel lost at batch 64, and the report says so
    text = kernel_report.format_report(summary)
    assert "target speedup_vs_compile: 1.20x (goal >= 1.3x): NOT met" in text
    assert "slower than cuDNN in 1 of 2 cases" in text and "NVIDIA H100" in text


def test_rounds_of_several_calls_are_divided_and_gpu_time_ratios_reported():
    def per_round(provider, seconds, gpu_us):
        entry = timing(provider, seconds)
        entry["extra_info"].update(calls_per_round=20, do_bench_us=gpu_us)
        return entry

    summary = kernel_report.report(document(per_round("fused", 20 * 10e-6, 8.0), per_round("cudnn", 20 * 30e-6, 20.0),
                                            per_round("max_autotune", 20 * 15e-6, 10.0)))
    row = summary["kernels"][0]
    assert row["fused_us"] == pytest.approx(10.0) and row["cudnn_us"] == pytest.approx(30.0)
    assert row["speedup_vs_cudnn"] == pytest.approx(3.0) and row["speedup_vs_compile"] == pytest.approx(1.5)
    assert row["do_bench_vs_cudnn"] == pytest.approx(2.5) and row["do_bench_vs_compile"] == pytest.approx(1.25)
    assert "2.50 /     1.25" in kernel_report.format_report(summary)


def test_missing_measurements_are_not_measured_rather_than_failed():
    summary = kernel_report.report(document(timing("fused", 1e-4, layer="lenet.conv2")))
    assert all(t["met"] is None for t in summary["targets"].values())
    assert "not measured" in kernel_report.format_report(summary)


def test_cli_writes_summary_and_refuses_to_overwrite(tmp_path, capsys):
    source, out = tmp_path / "kernels.json", tmp_path / "summary.json"
    source.write_text(json.dumps(document(timing("fused", 1e-4), timing("cudnn", 3e-4))))
    assert kernel_report.main([str(source), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["targets"]["speedup_vs_cudnn"]["measured"] == pytest.approx(3.0)
    assert kernel_report.main([str(source), "--json", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert kernel_report.main([str(tmp_path / "bad.json")]) == 1

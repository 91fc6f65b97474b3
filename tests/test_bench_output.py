"""What `fastcnn bench` prints and writes: each thing said once, the spread beside the median, ratios in words,
the configuration list, old configuration names, and a clean stop on SIGINT/SIGTERM however it was started."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import run_cli

from fastcnn.bench_configs import BENCH_CONFIGS, CONFIG_ALIASES, format_config_list, parse_configs
from fastcnn.bench_table import NOT_MEASURED, format_results
from fastcnn.errors import UsageError

TINY = ["--synthetic-size", "600,100", "--steps", "2", "--warmup", "0"]


def _doc(results, *, repeats=5, mode="steps", **extra):
    doc = dict(mode=mode, model="simplecnn", dataset="synthetic", batch_size=64, steps=50, warmup=10,
               repeats=repeats, rounds_completed=repeats if mode == "epoch" else None, baseline="reference",
               device_name="CPU", versions=dict(torch="2.x"), interrupted=False, results=results)
    return dict(doc, **extra)


def _row(config, rate, *, first=1.0, previous=None, **extra):
    return dict(config=config, images_per_second=rate, ms_per_step=64e3 / rate, ms_per_step_p20=64e3 / rate * 0.9,
                ms_per_step_p80=64e3 / rate * 1.2, speedup_vs_first=first, speedup_vs_previous=previous,
                peak_memory_mb=None, step_memory_mb=None, **extra)


def _table_rows(text):
    return {line.split()[0]: line for line in text.splitlines() if line.split() and line.split()[0] in BENCH_CONFIGS}


def test_the_table_shows_the_spread_beside_the_median_and_words_its_ratios():
    text = format_results(_doc([_row("reference", 1000.0), _row("device", 2400.0, first=2.4, previous=2.4),
                                _row("compile", 800.0, first=0.8, previous=0.8 / 2.4)]))
    assert "p20-p80 ms" in text and "spread of the repeats" in text
    rows = _table_rows(text)
    assert "57.600-76.800" in rows["reference"]  # 64 ms x 0.9 and x 1.2, beside the median
    assert "2.40x faster" in rows["device"]
    assert "0.80x: slower" in rows["compile"] and "0.33x: slower" in rows["compile"]
    assert "1.00x" in rows["reference"] and "faster" not in rows["reference"]


def test_one_repeat_shows_no_spread_rather_than_a_zero_one():
    row = _row("reference", 1000.0)
    row["ms_per_step_p20"] = row["ms_per_step_p80"] = row["ms_per_step"]
    text = format_results(_doc([row], repeats=1))
    assert "one repeat: no spread" in text and "p20-p80" not in text and "0.00" not in text.split("\n", 2)[2]


def test_epoch_rounds_show_their_min_and_max():
    row = dict(_row("reference", 1000.0), epoch_seconds=2.0, test_acc=90.0, epoch_seconds_all=[2.5, 2.0, 1.9])
    text = format_results(_doc([row], repeats=3, mode="epoch"))
    assert "min-max s" in text and "1.90-2.50" in _table_rows(text)["reference"]


def test_skip_reasons_and_an_interruption_are_one_line_each():
    skipped = "a whole-step CUDA graph needs a CUDA GPU"
    results = [_row("reference", 1000.0), dict(config="fused", skipped="no fused kernel here"),
               dict(config="fused-opt", skipped="no fused kernel here"), dict(config="cuda-graph", skipped=skipped)]
    results += [dict(config=name, failed=NOT_MEASURED) for name in ("device", "amp", "compile", "dali", "fast")]
    text = format_results(_doc(results, interrupted=True, interrupted_by="SIGTERM"))
    lines = text.splitlines()
    assert "skipped fused, fused-opt: no fused kernel here" in lines and f"skipped cuda-graph: {skipped}" in lines
    assert [line for line in lines if "INTERRUPTED" in line or "not measured" in line] == [
        "INTERRUPTED by SIGTERM: measured reference; not measured: device, amp, compile, dali, fast"]


def test_the_list_is_aligned_and_names_the_old_name():
    lines = [line for line in format_config_list().splitlines() if line and not line.startswith("-")]
    assert [line.split()[0] for line in lines] == list(BENCH_CONFIGS)
    starts = {len(line) - len(line[len(line.split()[0]):].lstrip()) for line in lines}
    assert len(starts) == 1, lines  # every description starts in the same column
    assert "(old name: fast-cudnn)" in next(line for line in lines if line.startswith("fast-aten "))


def test_an_old_configuration_name_means_the_new_one_and_a_name_twice_is_refused():
    assert CONFIG_ALIASES == {"fast-cudnn": "fast-aten"}
    assert [config.name for config in parse_configs("reference,fast-cudnn")] == ["reference", "fast-aten"]
    assert BENCH_CONFIGS["fast-aten"].overrides["kernel"] == "aten"
    assert all(config.overrides.get("kernel", "auto") in ("auto", "fused", "aten") for config in BENCH_CONFIGS.values())
    with pytest.raises(UsageError, match="fast-aten is given twice .fast-cudnn is its old name"):
        parse_configs("fast-aten,fast-cudnn")


def test_a_bench_says_each_skip_reason_once_and_uses_the_new_names(tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    code, out, err = run_cli(["bench", *TINY, "--repeats", "1", "--device", "cpu",
                              "--configs", "device,cuda-graph,fast-cudnn", "--json", str(json_path)], capsys)
    assert code == 0, err
    everything = out + err
    assert everything.count("needs a CUDA GPU") == 1 and "drop the flag" not in everything
    assert "fast-aten" in _table_rows(out) and "fast-cudnn" not in everything
    rows = {row["config"]: row for row in json.loads(json_path.read_text())["results"]}
    assert rows["fast-aten"]["settings"]["kernel"] == "aten" and rows["device"]["settings"]["kernel"] == "aten"
    assert err.splitlines() == [line for line in err.splitlines() if "images/s" in line]  # progress only, once each


def test_verbose_says_when_each_measurement_starts_and_each_reason_as_it_arises(capsys):
    code, out, err = run_cli(["bench", *TINY, "--repeats", "1", "--device", "cpu", "--configs", "device,cuda-graph",
                              "--verbose"], capsys)
    assert code == 0, err
    assert "device: measuring" in err and "cuda-graph: skipped: a whole-step CUDA graph needs a CUDA GPU" in err
    assert "skipped cuda-graph: a whole-step CUDA graph needs a CUDA GPU" in out  # the table's foot keeps it too


def _wait_for(process, text, seconds=240):
    """Read ``process``'s stderr until a line holding ``text``; the lines read."""
    lines, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:  # the first measurement done: the second is under way
            return lines
    process.kill()
    pytest.fail(f"no line with {text!r} on stderr:\n{''.join(lines)}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_background_bench_stops_cleanly_on_a_signal(tmp_path, signum):
    # Started the way a script's background job is: SIGINT ignored (SIG_IGN is inherited), which would make
    # Ctrl-C's default KeyboardInterrupt never happen. The first configuration is quick, the second slow (the
    # tutorial's DataLoader), so the signal comes while the second is being measured. Without TRITON_INTERPRET:
    # nothing here runs a Triton kernel, and the interpreter mode slows the reference's NCHW steps tenfold.
    json_path = tmp_path / "bench.json"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    process = subprocess.Popen(
        [sys.executable, "-m", "fastcnn", "bench", "--device", "cpu", "--synthetic-size", "2000,100", "-b", "16",
         "--configs", "fast,reference", "--steps", "20", "--warmup", "1", "--repeats", "5",
         "--json", str(json_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    _wait_for(process, "images/s")
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    doc = json.loads(json_path.read_text())
    assert doc["interrupted"] is True and doc["interrupted_by"] == signal.Signals(signum).name
    fast, reference = doc["results"]
    assert fast["images_per_second"] > 0 and reference["failed"] == NOT_MEASURED
    said = [line for line in (out + err).splitlines() if "nterrupt" in line or "not measured" in line]
    assert said == [f"INTERRUPTED by {signal.Signals(signum).name}: measured fast; not measured: reference"], out + err
    assert "Traceback" not in err and not list(tmp_path.glob(".*.tmp"))  # nothing half-written

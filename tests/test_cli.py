"""The CLI end to end: outputs of a run, the bench table, the env report."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import run_cli

from fastcnn.cli import main


def test_train_end_to_end_on_a_subset(data_root, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code = main(["train", "--data-dir", str(data_root), "--train-subset", "3000", "--test-subset", "500",
                 "--epochs", "2", "--output", str(out_dir), "--no-progress", "--target-acc", "50"])
    printed = capsys.readouterr().out
    assert code == 0
    assert {p.name for p in out_dir.iterdir()} == {"metrics.jsonl", "summary.json", "checkpoint.pt", "curves.png"}
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in lines] == [1, 2]
    assert set(lines[0]) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds",
                             "images_per_second"}
    summary = json.loads((out_dir / "summary.json").read_text())
    for key in ("test_acc", "train_seconds", "setup_seconds", "images_per_second", "epochs", "config",
                "device_name", "versions", "git_commit"):
        assert key in summary
    assert summary["epochs"] == 2 and summary["test_acc"] == lines[-1]["test_acc"]
    assert abs(summary["train_seconds"] - sum(row["epoch_seconds"] for row in lines)) < 1e-6
    assert summary["time_to_target"] is not None and summary["time_to_target"] <= summary["train_seconds"]
    assert set(summary["versions"]) >= {"torch", "triton", "torchvision", "dali", "python"}
    checkpoint = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["model_name"] == "simplecnn"
    assert (out_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test acc" in printed and "images/s" in printed


def test_bench_prints_table_and_writes_json_and_chart(tmp_path, capsys):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--synthetic-size", "1000,200", "--steps", "3", "--warmup", "1", "--repeats", "2",
                 "--json", str(json_path), "--plot", str(png_path)])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    assert "images/s" in out and "reference" in out and "fast" in out
    doc = json.loads(json_path.read_text())
    assert [row["config"] for row in doc["results"]] == ["reference", "fast"]
    assert doc["results"][0]["speedup_vs_first"] == 1.0
    assert all(row["images_per_second"] > 0 for row in doc["results"])
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    # results are never overwritten silently
    assert main(["bench", "--json", str(json_path)]) == 2


def test_bench_ablation_runs_on_cpu_and_skips_gpu_lines_with_a_reason(capsys, tmp_path):
    code = main(["bench", "--ablation", "--synthetic-size", "600,100", "--steps", "2", "--warmup", "0",
                 "--repeats", "1", "-b", "32", "--json", str(tmp_path / "ablation.json")])
    out = capsys.readouterr().out
    assert code == 0
    for line in ("reference", "device", "channels-last", "amp"):
        assert line in out
    if not torch.cuda.is_available():
        assert "skipped cuda-graph" in out and "skipped fused" in out
    rows = {row["config"]: row for row in json.loads((tmp_path / "ablation.json").read_text())["results"]}
    amp, device = rows["amp"], rows["device"]
    assert amp["speedup_vs_previous"] == pytest.approx(amp["images_per_second"] /
                                                       rows["channels-last"]["images_per_second"])
    assert device["speedup_vs_previous"] == pytest.approx(device["images_per_second"] /
                                                          rows["reference"]["images_per_second"])
    if "images_per_second" in rows["dali"]:  # DALI replaces the loader: it adds nothing to the line before it
        assert rows["dali"]["speedup_vs_previous"] is None


def test_an_interrupted_bench_writes_what_it_measured_and_exits_130(tmp_path, capsys, monkeypatch):
    # A time limit's SIGINT arrives while the second configuration is measured: the first one's numbers are
    # printed and written (atomically), marked as interrupted, and the exit status is still that of Ctrl-C.
    import fastcnn.bench

    real_time_steps = fastcnn.bench.time_steps
    calls = []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_time_steps(*args, **kwargs)

    monkeypatch.setattr(fastcnn.bench, "time_steps", interrupted_on_the_second)
    json_path = tmp_path / "bench.json"
    code = main(["bench", "--synthetic-size", "600,100", "--steps", "2", "--warmup", "0", "--repeats", "1",
                 "--configs", "reference,device,fast", "--json", str(json_path)])
    captured = capsys.readouterr()
    assert code == 130
    doc = json.loads(json_path.read_text())
    assert doc["interrupted"] is True
    reference, device, fast = doc["results"]
    assert reference["images_per_second"] > 0
    assert device["failed"].startswith("not measured") and fast["failed"].startswith("not measured")
    assert "INTERRUPTED" in captured.out and "reference: " in captured.err  # the per-configuration log line


def test_an_interrupted_epoch_bench_keeps_only_whole_rounds(capsys, monkeypatch):
    # Interrupted in round 2 of 3, after `reference` ran twice and `device` once: comparing reference's two runs
    # with device's one would not be one interleaved measurement; round 1 alone is.
    import fastcnn.bench

    calls = []

    def scripted_epoch(rc, train_set, test_set, profile=0):
        calls.append(rc.loader)
        if len(calls) == 4:
            raise KeyboardInterrupt
        seconds = {"torch": 2.0, "device": 1.0}[rc.loader] * calls.count(rc.loader)  # later rounds: slower
        return dict(epoch_seconds=seconds, images_per_second=100 / seconds, ms_per_step=seconds, test_acc=90.0,
                    compile_seconds=0.0, peak_memory_mb=None, step_memory_mb=None, kernel_choices=[],
                    cuda_graph="off")

    monkeypatch.setattr(fastcnn.bench, "time_epoch", scripted_epoch)
    code = main(["bench", "--epoch", "--synthetic-size", "600,100", "--configs", "reference,device", "--repeats", "3"])
    captured = capsys.readouterr()
    assert code == 130 and calls == ["torch", "device", "torch", "device"]
    assert "median of 1 interleaved round(s)" in captured.out
    rows = {line.split()[0]: line.split() for line in captured.out.splitlines()
            if line.strip().startswith(("reference", "device"))}
    assert rows["reference"][3] == "2.00" and rows["device"][3] == "1.00"  # round 1's epoch seconds, not round 2's


def test_an_even_number_of_epoch_rounds_reports_their_median_not_the_faster():
    from fastcnn.bench import _median_epoch

    runs = [dict(epoch_seconds=s, images_per_second=60 / s, ms_per_step=s, test_acc=a)
            for s, a in ((2.0, 90.0), (4.0, 92.0))]
    middle = _median_epoch(runs)
    assert middle["epoch_seconds"] == 3.0 and middle["images_per_second"] == 22.5 and middle["test_acc"] == 91.0


def test_bench_epoch_mode_reports_accuracy(capsys):
    code = main(["bench", "--epoch", "--synthetic-size", "1500,300", "--configs", "reference,fast"])
    out = capsys.readouterr().out
    assert code == 0 and "test acc" in out and "epoch s" in out


def test_env_reports_versions_and_features(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "triton", "torchvision", "dali", "fused Triton kernel", "CUDA graphs"):
        assert word in out
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "features" in info and "versions" in info


def test_python_dash_m_and_console_script():
    result = subprocess.run([sys.executable, "-m", "fastcnn", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "bench" in result.stdout
    result = subprocess.run([sys.executable, "-m", "fastcnn", "train", "--help"], capture_output=True, text=True)
    for flag in ("--model", "--dataset", "--data-dir", "--epochs", "--batch-size", "--lr", "--opt", "--seed",
                 "--device", "--preset", "--loader", "--amp", "--amp-dtype", "--channels-last", "--compile",
                 "--compile-mode", "--cuda-graph", "--kernel", "--output", "--resume", "--no-progress"):
        assert flag in result.stdout, flag


def write_image_folder(root, per_class=12):
    """Three classes a CNN can tell apart: a bright square, a horizontal bar, a vertical bar, of varying size."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for name in ("square", "hbar", "vbar"):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = 40 + int(torch.randint(0, 30, (1,), generator=gen))
            pixels = torch.zeros(size, size, dtype=torch.uint8)
            a, b = size // 4, 3 * size // 4
            if name == "square":
                pixels[a:b, a:b] = 255
            elif name == "hbar":
                pixels[size // 2 - 3:size // 2 + 3, 4:-4] = 255
            else:
                pixels[4:-4, size // 2 - 3:size // 2 + 3] = 255
            Image.fromarray(pixels.numpy()).convert("RGB").save(folder / f"{i}.png")


def test_train_eval_predict_on_an_image_folder_with_dali_augmentation(tmp_path, capsys):
    root = tmp_path / "shapes"
    write_image_folder(root)
    run = tmp_path / "run"
    code = main(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--loader", "dali", "--augment",
                 "--epochs", "8", "-b", "8", "--lr", "3e-3", "--output", str(run), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["augment"] and summary["config"]["loader"] == "dali"
    assert summary["test_acc"] >= 80.0
    assert main(["eval", str(run / "checkpoint.pt"), "--data-dir", str(root)]) == 0
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["classes"] == ["hbar", "square", "vbar"]
    assert main(["predict", str(run / "checkpoint.pt"), str(root / "vbar" / "0.png")]) == 0
    assert "vbar" in capsys.readouterr().out


def test_augmentation_needs_the_dali_loader_and_the_tutorial_models_take_any_shape(tmp_path, capsys):
    root = tmp_path / "shapes"
    write_image_folder(root, per_class=3)
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--augment"]) == 2
    assert "--loader dali" in capsys.readouterr().err
    # the tutorial's own class, sized to 3 classes of RGB 53x53 images (files stored as RGB stay RGB)
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--preset", "reference",
                 "--output", str(tmp_path / "r"), "--no-progress"]) == 0
    assert "3 classes (hbar, square, vbar), RGB 3x53x53" in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert checkpoint["image_shape"] == [3, 53, 53] and checkpoint["config"]["reference_model"]


def help_of(command, flag):
    from fastcnn.cli import build_parser

    parser = build_parser().subcommands[command]
    return " ".join(next(a.help for a in parser._actions if flag in a.option_strings).split())


def test_help_texts_say_what_the_presets_do():
    from fastcnn.env_report import cuda_graph_feature

    assert "on in the fast preset, on a CPU and on CUDA" in help_of("train", "--fused-opt")
    assert "slower" not in help_of("train", "--deterministic")
    assert "no measurable cost on the CPU" in help_of("train", "--deterministic")
    available, detail = cuda_graph_feature(True)
    assert available and "on in the fast preset" in detail and "off by default" not in detail
    assert cuda_graph_feature(False) == (False, "needs a CUDA GPU")


@pytest.mark.parametrize("command", ["train", "bench", "eval", "predict"])
def test_kernel_takes_the_new_names_and_the_old_ones(command, capsys):
    from fastcnn.cli import build_parser

    text = help_of(command, "--kernel")
    for word in ("fused", "aten", "auto", "triton (fused)", "torch (aten)", "still accepted"):
        assert word in text, (word, text)
    positionals = {"eval": ["run"], "predict": ["run", "a.png"]}.get(command, [])
    for given, meant in (("fused", "fused"), ("aten", "aten"), ("auto", "auto"), ("triton", "fused"),
                         ("torch", "aten")):
        assert build_parser().parse_args([command, *positionals, "--kernel", given]).kernel == meant
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0 and "--kernel {auto,fused,aten}" in out


def test_verbose_is_a_train_and_bench_flag(capsys):
    from fastcnn.cli import build_parser

    for command in ("train", "bench"):
        assert build_parser().parse_args([command]).verbose is False
        assert build_parser().parse_args([command, "--verbose"]).verbose is True
    code, _, err = run_cli(["eval", "run", "--verbose"], capsys)
    assert code == 2 and "unrecognized arguments: --verbose" in err

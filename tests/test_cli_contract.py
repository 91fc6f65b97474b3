"""The CLI's contract, pinned as literals: every subcommand's flags and every choice value it accepts, every bench
configuration name, and the keys a short run writes to summary.json and eval.json.

The lists were read from the parser as it stood before the package was re-cut; they are deliberately not derived
from the parser at test time (a parser compared with itself cannot fail). A flag or value that gets a better name
keeps the old one as an alias, so every name here must stay accepted; new names may be added freely.
"""

import json

import pytest
from helpers import run_cli

from fastcnn.cli import build_parser

SUBCOMMANDS = ["train", "bench", "env", "eval", "predict"]

# flag -> (the args attribute it sets, sample values; None for a flag that takes no value)
TRAINING_OPTIONS = {  # shared by train and bench
    "--model": ("model", ["cifarnet", "fastnet", "lenet", "mnistfast", "simplecnn"]),
    "--dataset": ("dataset", ["mnist", "fashion-mnist", "synthetic", "imagefolder", "cifar10"]),
    "--data-dir": ("data_dir", ["data"]),
    "--channels": ("channels", ["1", "3"]),
    "--image-size": ("image_size", ["32", "48x64"]),
    "--download": ("download", None),
    "--no-download": ("download", None),
    "--widths": ("widths", ["16,32,128"]),
    "--train-subset": ("train_subset", ["100"]),
    "--test-subset": ("test_subset", ["100"]),
    "--synthetic-size": ("synthetic_size", ["600,100"]),
    "--augment": ("augment", None),
    "--no-augment": ("augment", None),
    "--flip": ("flip", None),
    "--no-flip": ("flip", None),
    "--epochs": ("epochs", ["2"]),
    "-b": ("batch_size", ["32"]),
    "--batch-size": ("batch_size", ["32"]),
    "--lr": ("lr", ["0.01"]),
    "--opt": ("opt", ["adam", "sgd"]),
    "--seed": ("seed", ["1"]),
    "--sched": ("schedule", ["constant", "onecycle"]),
    "--betas": ("betas", ["0.9,0.99"]),
    "--label-smoothing": ("label_smoothing", ["0.1"]),
    "--recipe": ("recipe", ["cifar10", "public", "speedrun"]),
    "--device": ("device", ["auto", "cpu", "cuda"]),
    "--preset": ("preset", ["fast", "reference"]),
    "--loader": ("loader", ["device", "dali", "torch"]),
    "--amp": ("amp", None),
    "--no-amp": ("amp", None),
    "--amp-dtype": ("amp_dtype", ["bfloat16", "float16"]),
    "--channels-last": ("channels_last", None),
    "--no-channels-last": ("channels_last", None),
    "--compile": ("compile", None),
    "--no-compile": ("compile", None),
    "--compile-mode": ("compile_mode", ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]),
    "--cuda-graph": ("cuda_graph", None),
    "--no-cuda-graph": ("cuda_graph", None),
    "--kernel": ("kernel", ["auto", "triton", "torch", "fused", "aten"]),
    "--fused-opt": ("fused_optimizer", None),
    "--no-fused-opt": ("fused_optimizer", None),
    "--workers": ("num_workers", ["0"]),
}

FLAGS = {
    "train": {
        **TRAINING_OPTIONS,
        "--output": ("output", ["out"]),
        "--overwrite": ("overwrite", None),
        "--resume": ("resume", ["run/checkpoint.pt"]),
        "--target-acc": ("target_acc", ["98.5"]),
        "--eval-every": ("eval_every", ["10"]),
        "--runs": ("runs", ["2"]),
        "--nproc": ("nproc", ["2"]),
        "--deterministic": ("deterministic", None),
        "--no-progress": ("progress", None),
        "--debug": ("debug", None),
    },
    "bench": {
        **TRAINING_OPTIONS,
        "--configs": ("configs", ["reference,fast"]),
        "--list": ("list", None),
        "--steps": ("steps", ["3"]),
        "--warmup": ("warmup", ["1"]),
        "--repeats": ("repeats", ["2"]),
        "--epoch": ("epoch", None),
        "--ablation": ("ablation", None),
        "--profile": ("profile", ["2"]),
        "--race": ("race", None),
        "--runs": ("runs", ["3"]),
        "--target-acc": ("target_acc", ["98.5"]),
        "--json": ("json", ["out.json"]),
        "--plot": ("plot", ["out.png"]),
        "--overwrite": ("overwrite", None),
        "--debug": ("debug", None),
    },
    "env": {
        "--json": ("json", None),
        "--debug": ("debug", None),
    },
    "eval": {
        "--dataset": ("dataset", ["mnist", "fashion-mnist", "synthetic", "imagefolder", "cifar10"]),
        "--data-dir": ("data_dir", ["data"]),
        "--download": ("download", None),
        "--no-download": ("download", None),
        "--test-subset": ("test_subset", ["100", "all"]),
        "-b": ("batch_size", ["32"]),
        "--batch-size": ("batch_size", ["32"]),
        "--device": ("device", ["auto", "cpu", "cuda"]),
        "--amp": ("amp", None),
        "--no-amp": ("amp", None),
        "--amp-dtype": ("amp_dtype", ["bfloat16", "float16"]),
        "--channels-last": ("channels_last", None),
        "--no-channels-last": ("channels_last", None),
        "--kernel": ("kernel", ["auto", "triton", "torch", "fused", "aten"]),
        "--output": ("output", ["evaldir"]),
        "--overwrite": ("overwrite", None),
        "--debug": ("debug", None),
    },
    "predict": {
        "--top": ("top", ["3"]),
        "--fit": ("fit", ["auto", "digit", "resize"]),
        "--invert": ("invert", ["auto", "yes", "no"]),
        "--json": ("json", None),
        "--device": ("device", ["auto", "cpu", "cuda"]),
        "--kernel": ("kernel", ["auto", "triton", "torch", "fused", "aten"]),
        "--debug": ("debug", None),
    },
}

POSITIONALS = {"train": [], "bench": [], "env": [], "eval": ["run/checkpoint.pt"],
               "predict": ["run/checkpoint.pt", "digit.png"]}

BENCH_CONFIGS = ["reference", "device", "channels-last", "amp", "compile", "fused", "fused-opt", "cuda-graph", "dali",
                 "fast", "fast-default-opt", "fast-fp32", "fast-nchw", "fast-cudnn", "fused-eager"]

# What a short synthetic run writes (keys may be added, never dropped)
SUMMARY_KEYS = {"command", "config", "cuda_graph", "dataset", "device_name", "epochs", "eval_seconds", "evals",
                "finished_at", "git_commit", "images_per_second", "kernel_choices", "model", "output", "preset",
                "setup_seconds", "target_acc", "test_acc", "test_loss", "time_to_target", "train_acc", "train_loss",
                "train_seconds", "versions", "warmup_seconds"}
SUMMARY_CONFIG_KEYS = {"amp", "amp_dtype", "augment", "batch_size", "betas", "channels", "channels_last", "compile",
                       "compile_mode", "cuda_graph", "data_dir", "dataset", "deterministic", "device", "download",
                       "epochs", "eval_every", "flip", "fused_optimizer", "image_size", "kernel", "label_smoothing",
                       "loader", "lr", "mean", "model", "num_workers", "opt", "preset", "recipe", "reference_model",
                       "schedule", "seed", "std", "synthetic_size", "target_acc", "test_subset", "train_subset",
                       "widths"}
METRICS_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds", "images_per_second"}
EVAL_KEYS = {"accuracy", "checkpoint", "classes", "confusion", "correct", "dataset", "device", "device_name",
             "epochs_trained", "finished_at", "loss", "model", "notes", "per_class", "run_test_acc", "run_test_loss",
             "samples", "settings", "split", "top_confusions", "trained_on", "versions"}
EVAL_SETTINGS_KEYS = {"amp", "amp_dtype", "batch_size", "channels_last", "kernel", "mean", "reference_model", "std",
                      "test_subset"}
EVAL_PER_CLASS_KEYS = {"index", "name", "samples", "correct", "accuracy", "precision"}


def flag_samples():
    for command, flags in FLAGS.items():
        for flag, (dest, values) in flags.items():
            for value in values or [None]:
                yield pytest.param(command, flag, dest, value, id=f"{command} {flag} {value or ''}".strip())


def parse(argv):
    try:
        return build_parser().parse_args(argv)
    except SystemExit as done:
        pytest.fail(f"fastcnn {' '.join(argv)} was refused (exit {done.code})")


def test_the_subcommands_are_all_there():
    for command in SUBCOMMANDS:
        assert parse([command, *POSITIONALS[command]]).command == command


@pytest.mark.parametrize(("command", "flag", "dest", "value"), list(flag_samples()))
def test_every_flag_and_choice_value_is_accepted(command, flag, dest, value):
    argv = [command, *POSITIONALS[command], flag, *([] if value is None else [value])]
    args = parse(argv)
    assert dest in vars(args), (argv, sorted(vars(args)))


@pytest.mark.parametrize("argv", [["train", "--epoch", "1"], ["train", "--channel", "1"], ["bench", "--conf", "fast"],
                                  ["eval", "run/checkpoint.pt", "--data", "d"], ["train", "--lr=0.1", "--epo", "2"]])
def test_options_are_never_abbreviated(argv, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(argv)
    assert done.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_version_and_help_exit_0(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.startswith("fastcnn ")
    for argv in (["--help"], *([command, "--help"] for command in SUBCOMMANDS)):
        code, out, _ = run_cli(argv, capsys)
        assert code == 0 and out.startswith("usage: fastcnn"), argv


def test_every_bench_configuration_name_is_accepted(capsys):
    from fastcnn.bench_configs import parse_configs

    assert len(parse_configs(",".join(BENCH_CONFIGS))) == len(BENCH_CONFIGS)
    code, out, _ = run_cli(["bench", "--list"], capsys)
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines() if line.strip() and not line.startswith(("-", " "))]
    assert listed and len(parse_configs(",".join(listed))) == len(listed), out


def test_a_short_runs_summary_and_eval_keys(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--dataset", "synthetic", "--synthetic-size", "200,100", "--epochs", "1",
                            "--output", str(run), "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS, SUMMARY_KEYS - set(summary)
    assert set(summary["config"]) >= SUMMARY_CONFIG_KEYS, SUMMARY_CONFIG_KEYS - set(summary["config"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[0]) >= METRICS_KEYS
    code, _, err = run_cli(["eval", str(run / "checkpoint.pt")], capsys)
    assert code == 0, err
    evaluated = json.loads((run / "eval.json").read_text())
    assert set(evaluated) >= EVAL_KEYS, EVAL_KEYS - set(evaluated)
    assert set(evaluated["settings"]) >= EVAL_SETTINGS_KEYS
    assert set(evaluated["per_class"][0]) >= EVAL_PER_CLASS_KEYS

"""``fastcnn bench --race``: fastcnn's speedrun recipe against the best public MNIST recipe, on the same device
and the same data, n runs each, interleaved (public, speedrun, public, ...) so that both see the same machine.

Each run is a full ``fastcnn train`` run (same timing rules: warm-up excluded, evaluation excluded from the
training clock but reported); its test accuracy is on the full official test set.
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import sys
import tempfile

from fastcnn.build import load_splits
from fastcnn.checkpoint import atomic_write_bytes
from fastcnn.config import TrainConfig, resolve
from fastcnn.env import device_name, git_commit, versions
from fastcnn.errors import UsageError
from fastcnn.report import format_table, refuse_existing, speedup_words, write_results
from fastcnn.runs import mean_std
from fastcnn.train import run_training

CONTENDERS = ("public", "speedrun")


def run_race(base: TrainConfig, *, runs: int = 3, eval_points: int = 10, log=None) -> dict:
    log = log or sys.stderr
    if runs < 1:
        raise UsageError(f"--runs must be at least 1, got {runs}")
    dataset = base.dataset or "mnist"
    configs = {name: dataclasses.replace(base, recipe=name, dataset=dataset, runs=1, progress=False,
                                         overwrite=False, resume=None)
               for name in CONTENDERS}
    resolved = {name: resolve(cfg) for name, cfg in configs.items()}
    datasets = load_splits(resolved["public"])
    results = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory(prefix="fastcnn-race-") as scratch:
        for index in range(runs):
            for name in CONTENDERS:
                rc = resolved[name]
                steps = rc.epochs * -(-len(datasets[0]) // rc.batch_size)
                cfg = dataclasses.replace(configs[name], seed=base.seed + index,
                                          eval_every=max(1, steps // eval_points),
                                          output=str(pathlib.Path(scratch) / f"{name}-{index + 1}"))
                summary = run_training(cfg, stream=_Discard(), datasets=datasets)
                print(f"  {name} run {index + 1}/{runs}: {summary['test_acc']:.2f}% in "
                      f"{summary['train_seconds']:.3f} s", file=log)
                results[name].append(dict(seed=cfg.seed, test_acc=summary["test_acc"],
                                          train_seconds=summary["train_seconds"],
                                          time_to_target=summary["time_to_target"],
                                          setup_seconds=summary["setup_seconds"], evals=summary["evals"]))
    contenders = {}
    for name in CONTENDERS:
        rows = results[name]
        rc = resolved[name]
        test_acc, test_acc_std = mean_std([r["test_acc"] for r in rows])
        train_seconds, train_seconds_std = mean_std([r["train_seconds"] for r in rows])
        contenders[name] = dict(
            recipe=name, model=rc.model, batch_size=rc.batch_size, epochs=rc.epochs, opt=rc.opt, lr=rc.lr,
            schedule=rc.schedule, label_smoothing=rc.label_smoothing,
            settings=dict(preset=rc.preset, loader=rc.loader, amp=rc.amp, channels_last=rc.channels_last,
                          compile=rc.compile, kernel=rc.kernel),
            test_acc=test_acc, test_acc_std=test_acc_std, train_seconds=train_seconds,
            train_seconds_std=train_seconds_std, per_run=rows)
    device = resolved["public"].torch_device
    return dict(
        dataset=dataset, runs=runs, target_acc=base.target_acc, device=str(device),
        device_name=device_name(device), versions=versions(), git_commit=git_commit(),
        command=" ".join(["fastcnn"] + sys.argv[1:]), date=datetime.datetime.now().isoformat(timespec="seconds"),
        contenders=contenders,
        speedup=contenders["public"]["train_seconds"] / contenders["speedrun"]["train_seconds"])


class _Discard:
    def write(self, text):
        return len(text)

    def flush(self):
        pass


def format_race(doc: dict) -> str:
    """The race's table (a "± std" of one run is no spread: "-", though the JSON keeps its 0.0) and the ratio of
    the mean training seconds in words (fastcnn.report.speedup_words)."""
    spread = doc["runs"] > 1
    rows = [dict(recipe=name, model=c["model"], batch=c["batch_size"], test_acc=c["test_acc"],
                 test_acc_std=c["test_acc_std"] if spread else None, seconds=c["train_seconds"],
                 seconds_std=c["train_seconds_std"] if spread else None)
            for name, c in doc["contenders"].items()]
    columns = [("recipe", "recipe", "s"), ("model", "model", "s"), ("batch", "batch", "d"),
               ("test_acc", "test acc %", ".2f"), ("test_acc_std", "± std", ".2f"),
               ("seconds", "train s", ".3f"), ("seconds_std", "± std", ".3f")]
    runs = f"{doc['runs']} runs each, interleaved" if spread else "1 run each"
    head = f"race on {doc['dataset']}: {runs} | {doc['device_name']} | torch {doc['versions']['torch']}"
    return (f"{head}\n\n{format_table(rows, columns)}\n\nspeedrun against the public recipe, mean training seconds: "
            f"{speedup_words(doc['speedup'])}")


def plot_race(path: pathlib.Path, doc: dict) -> None:
    """Test accuracy against training seconds, every run of both recipes."""
    import matplotlib  # optional dependency, and slow to import: only a race asked for a plot pays for it

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, contender), color in zip(doc["contenders"].items(), ("tab:gray", "tab:red"), strict=True):
        for index, run in enumerate(contender["per_run"]):
            points = run["evals"]
            ax.plot([p["train_seconds"] for p in points], [p["test_acc"] for p in points], "o-", color=color,
                    alpha=0.6, markersize=3, label=f"{name} ({contender['model']})" if index == 0 else None)
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(95, 100) if doc["dataset"] == "mnist" else ax.set_ylim(80, 95)
    ax.axhline(doc["target_acc"] or (99.0 if doc["dataset"] == "mnist" else 91.0), color="k", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{doc['dataset']}: {doc['device_name']}", fontsize=9)
    fig.tight_layout()
    atomic_write_bytes(path, lambda file: fig.savefig(file, format="png", dpi=100))
    plt.close(fig)


def run_race_command(args, base: TrainConfig) -> dict:
    refuse_existing((args.json, args.plot), args.overwrite)
    doc = run_race(dataclasses.replace(base, dataset=base.dataset or "mnist"), runs=args.runs)
    print(format_race(doc))
    write_results(doc, args.json, args.plot, plot_race)
    return doc

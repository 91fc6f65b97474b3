"""Repeated runs (``--runs N``, the race, the ablation): their aggregate summary, the "mean ± std" they report,
and the log a repeated run prints."""

from __future__ import annotations

import datetime
import json
import pathlib
import statistics
import sys

from fastcnn.config import ResolvedConfig
from fastcnn.report import format_table


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_mean_std(values: list[float], digits: int = 2, unit: str = "") -> str:
    """``values`` as users read repeated runs: "98.81 ± 0.05%" (``unit`` "%"), "1.234 ± 0.010 s" (unit " s")."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}{unit}"


def aggregate_runs(summaries: list[dict], rc: ResolvedConfig, output: pathlib.Path) -> dict:
    """The summary.json of N runs: means and standard deviations, and each run's own figures."""
    test_acc, test_acc_std = mean_std([s["test_acc"] for s in summaries])
    train_seconds, train_seconds_std = mean_std([s["train_seconds"] for s in summaries])
    reached = [s["time_to_target"] for s in summaries]
    per_run = [dict(run=i + 1, seed=s["config"]["seed"], test_acc=s["test_acc"], train_seconds=s["train_seconds"],
                    time_to_target=s["time_to_target"], setup_seconds=s["setup_seconds"],
                    eval_seconds=s["eval_seconds"], evals=s["evals"], output=s["output"])
               for i, s in enumerate(summaries)]
    first = summaries[0]
    return dict(
        model=rc.model, dataset=rc.dataset, preset=rc.preset, recipe=rc.recipe, runs=len(summaries),
        epochs=first["epochs"], test_acc=test_acc, test_acc_std=test_acc_std, train_seconds=train_seconds,
        train_seconds_std=train_seconds_std,
        setup_seconds=statistics.fmean(s["setup_seconds"] for s in summaries),
        eval_seconds=statistics.fmean(s["eval_seconds"] for s in summaries),
        images_per_second=statistics.fmean(s["images_per_second"] for s in summaries),
        target_acc=rc.target_acc,
        time_to_target=statistics.fmean(reached) if reached and None not in reached else None,
        runs_reaching_target=sum(r is not None for r in reached) if rc.target_acc is not None else None,
        per_run=per_run, config=first["config"], device_name=first["device_name"], versions=first["versions"],
        git_commit=first["git_commit"], output=str(output), command=" ".join(sys.argv),
        finished_at=datetime.datetime.now().isoformat(timespec="seconds"))


def print_repeated_log(summary: dict, summaries: list[dict], stream) -> None:
    """Every run's epochs (accuracy, cumulative training seconds), then the means, as a speedrun log reads."""
    rows = []
    for index, run in enumerate(summaries):
        history = json_lines(pathlib.Path(run["output"]) / "metrics.jsonl")
        elapsed = 0.0
        for row in history:
            elapsed += row["epoch_seconds"]
            rows.append(dict(run=index + 1, epoch=row["epoch"], train_acc=row["train_acc"], test_acc=row["test_acc"],
                             seconds=elapsed))
    columns = [("run", "run", "d"), ("epoch", "epoch", "d"), ("train_acc", "train acc", ".2f"),
               ("test_acc", "test acc", ".2f"), ("seconds", "seconds", ".3f")]
    print(format_table(rows, columns), file=stream)
    accuracy = format_mean_std([s["test_acc"] for s in summaries], 2, "%")
    seconds = format_mean_std([s["train_seconds"] for s in summaries], 3, " s")
    line = (f"\n{summary['model']} on {summary['dataset']}, {summary['runs']} runs: test acc {accuracy} in "
            f"{seconds} of training | {summary['device_name']}")
    if summary["target_acc"] is not None:
        line += (f"\ntime to {summary['target_acc']:.2f}%: " + (
            f"{summary['time_to_target']:.3f} s (mean over runs)" if summary["time_to_target"] is not None else
            f"reached by {summary['runs_reaching_target']} of {summary['runs']} runs"))
    print(line + f"\noutputs in {summary['output']}", file=stream)


def json_lines(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""What a training run prints, as it happens: an opening line (what it trains on and how; where a resumed run
picks up), one line per epoch as soon as the epoch is evaluated (stdout, flushed, with or without a progress
bar), a progress bar with the run's ETA (stderr, on a terminal only), and the summary at the end."""

from __future__ import annotations

import sys

from tqdm import tqdm

from fastcnn.config import ResolvedConfig
from fastcnn.data import ImageDataset
from fastcnn.data.image_shape import describe_shape
from fastcnn.env import device_name
from fastcnn.report import EPOCH_COLUMNS

# tqdm's own bar, counting the run's steps (its remaining time is then the run's, not the epoch's)
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| step {n_fmt}/{total_fmt} [{elapsed} elapsed, ETA {remaining}{postfix}]"


def describe_run(rc: ResolvedConfig, train_set: ImageDataset, test_set: ImageDataset, output, *,
                 runs: int = 1) -> str:
    """The run's opening line: what it trains on (dataset, counts, classes, shape, normalization) and how (model,
    device, preset, output folder)."""
    names = ", ".join(train_set.classes[:4]) + (", ..." if len(train_set.classes) > 4 else "")
    source = f" {train_set.source}" if train_set.source else ""
    shape = describe_shape(train_set.image_shape)

    def values(numbers):
        return ",".join(f"{v:.4g}" for v in numbers)

    model = rc.model + (f" {'-'.join(str(w) for w in rc.widths)}" if rc.widths else "")
    recipe = f", recipe {rc.recipe}" if rc.recipe else ""
    repeat = f", {runs} runs (seeds {rc.seed}..{rc.seed + runs - 1})" if runs > 1 else ""
    augment = (" | augment: translate" + (" + flip" if rc.flip else "")) if rc.augment else ""
    return (f"training on {rc.dataset}{source}: {len(train_set):,} train / {len(test_set):,} test images, "
            f"{train_set.num_classes} classes ({names}), {shape}, mean {values(rc.mean)} std {values(rc.std)}"
            f"{augment} | model {model} | device {device_name(rc.torch_device)} | preset {rc.preset}"
            f"{recipe}, {rc.epochs} epoch{'s' if rc.epochs != 1 else ''}{repeat} | output {output}")


def print_opening(rc: ResolvedConfig, train_set: ImageDataset, test_set: ImageDataset, output, stream, *,
                  runs: int = 1) -> None:
    print(describe_run(rc, train_set, test_set, output, runs=runs), file=stream)
    for note in dict.fromkeys([*train_set.notes, *test_set.notes]):  # in order, once each
        print(f"note: {note}", file=stream)
    stream.flush()


def describe_resume(checkpoint: str, state: dict, rc: ResolvedConfig, steps_per_epoch: int, processes: int) -> str:
    """Where a resumed run picks up: the epoch it continues, the step in it, and how many processes train it."""
    epoch, batch = state["epoch"], state["batch"]
    done, total = epoch * steps_per_epoch + batch, rc.epochs * steps_per_epoch
    saved = state.get("nproc")
    how = ""
    if processes > 1 or saved:
        how = f", {processes} process{'es' if processes > 1 else ''}" + (
            " as it was trained" if saved == processes else f"; it was trained with {saved or 1}")
    return (f"resuming {checkpoint} at epoch {epoch + 1}/{rc.epochs}, step {batch}/{steps_per_epoch} "
            f"({done}/{total} steps done){how}")


def progress_bar(total_steps: int, steps_done: int, *, enabled: bool, file=None) -> tqdm:
    """One bar for the whole run, on ``file`` (stderr) when it is a terminal: its ETA is the run's."""
    return tqdm(total=total_steps, initial=steps_done, unit="step", bar_format=BAR_FORMAT, dynamic_ncols=True,
                file=file or sys.stderr, disable=None if enabled else True)  # None: off unless a terminal


class EpochLog:
    """One aligned line per epoch, printed (and flushed) as soon as the epoch is evaluated; the header before the
    first. ``eta`` is the run's estimated time left, from this process's epochs so far."""

    COLUMNS = [*EPOCH_COLUMNS, ("eta", "ETA", "s")]
    MIN_WIDTHS = {"images_per_second": 9, "eta": 5}

    def __init__(self, stream):
        self.stream = stream
        self.header_printed = False
        self.widths = [max(len(header), self.MIN_WIDTHS.get(key, 0)) for key, header, _ in self.COLUMNS]

    def line(self, cells: list[str]) -> str:
        return "  ".join(cell.rjust(width) for cell, width in zip(cells, self.widths, strict=True))

    def epoch_done(self, row: dict, eta_seconds: float | None, bar: tqdm | None = None) -> None:
        values = {**row, "eta": tqdm.format_interval(eta_seconds) if eta_seconds is not None else None}
        cells = [format(values[key], spec) if values.get(key) is not None else "-" for key, _, spec in self.COLUMNS]
        lines = [self.line(cells)]
        if not self.header_printed:
            headers = [header for _, header, _ in self.COLUMNS]
            lines[:0] = [self.line(headers), self.line(["-" * width for width in self.widths])]
            self.header_printed = True
        for text in lines:
            if bar is not None and not bar.disable:
                bar.write(text, file=self.stream)  # clears the bar, writes, redraws it
            else:
                print(text, file=self.stream)
        self.stream.flush()


def print_summary(summary: dict, stream) -> None:
    """The run's result after its epoch lines: accuracy, time and throughput, time to target, kernel choices."""
    line = (f"\n{summary['model']} on {summary['dataset']}: test acc {summary['test_acc']:.2f}% | train "
            f"{summary['train_seconds']:.2f} s ({summary['images_per_second']:,.0f} images/s) | setup "
            f"{summary['setup_seconds']:.2f} s | eval {summary['eval_seconds']:.2f} s | {summary['device_name']}")
    if summary["target_acc"] is not None:
        reached = summary["time_to_target"]
        line += (f"\ntime to {summary['target_acc']:.2f}% test accuracy: " +
                 (f"{reached:.2f} s of training" if reached is not None else "not reached"))
    for choice in summary.get("kernel_choices", []):
        line += (f"\nkernel auto: {choice['layer']} [{choice['call']}] -> {choice['choice']} (fused "
                 f"{choice['fused_ms']:.4f} ms, aten {choice['aten_ms']:.4f} ms)")
    print(line + f"\noutputs in {summary['output']}", file=stream)
    stream.flush()

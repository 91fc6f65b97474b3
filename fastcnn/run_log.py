"""What a training run prints: its opening line (what it trains on and how), and its summary at the end."""

from __future__ import annotations

from fastcnn.config import ResolvedConfig
from fastcnn.data import ImageDataset
from fastcnn.data.datasets import describe_shape
from fastcnn.env import device_name
from fastcnn.report import EPOCH_COLUMNS, format_table


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


def print_summary(summary: dict, history: list[dict], stream) -> None:
    print(format_table(history, EPOCH_COLUMNS), file=stream)
    line = (f"\n{summary['model']} on {summary['dataset']}: test acc {summary['test_acc']:.2f}% | train "
            f"{summary['train_seconds']:.2f} s ({summary['images_per_second']:,.0f} images/s) | setup "
            f"{summary['setup_seconds']:.2f} s | eval {summary['eval_seconds']:.2f} s | {summary['device_name']}")
    if summary["target_acc"] is not None:
        reached = summary["time_to_target"]
        line += (f"\ntime to {summary['target_acc']:.2f}% test accuracy: " +
                 (f"{reached:.2f} s of training" if reached is not None else "not reached"))
    for choice in summary.get("kernel_choices", []):
        line += (f"\nkernel auto: {choice['layer']} [{choice['call']}] -> {choice['choice']} (fused "
                 f"{choice['fused_ms']:.4f} ms, plain chain {choice['torch_ms']:.4f} ms)")
    print(line + f"\noutputs in {summary['output']}", file=stream)

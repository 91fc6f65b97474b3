"""What a run leaves behind and prints: metrics.jsonl, summary.json, curves.png, and the end-of-run table."""

from __future__ import annotations

import json
import pathlib

from fastcnn.checkpoint import atomic_write_bytes, atomic_write_text

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds", "images_per_second")


def refuse_existing(paths, overwrite: bool) -> None:
    """Results are never overwritten silently: refuse before any measuring, not after."""
    from fastcnn.errors import UsageError

    for path in paths:
        if path and pathlib.Path(path).exists() and not overwrite:
            raise UsageError(f"{path} already exists; pass --overwrite or another path")
        if path and not pathlib.Path(path).resolve().parent.is_dir():
            raise UsageError(f"the folder of {path} does not exist; create it or choose another path")


def write_results(doc: dict, json_path: str | None, plot_path: str | None, plot) -> None:
    """Write a benchmark document as JSON and its chart (``plot(path, doc)``) where asked, and say where."""
    if json_path:
        write_json(pathlib.Path(json_path), doc)
        print(f"\nresults written to {json_path}")
    if plot_path:
        plot(pathlib.Path(plot_path), doc)
        print(f"chart written to {plot_path}")


def write_metrics(path: pathlib.Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the whole history (atomic, so a resumed run never holds stale lines)."""
    atomic_write_text(path, "".join(json.dumps({k: row[k] for k in METRIC_FIELDS}) + "\n" for row in history))


def write_json(path: pathlib.Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def plot_curves(path: pathlib.Path, history: list[dict], title: str) -> None:
    """Loss and accuracy per epoch, train and test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((loss_ax, "loss", "cross-entropy"), (acc_ax, "acc", "accuracy (%)")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train")
        ax.plot(epochs, [row[f"test_{key}"] for row in history], "s-", label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write_bytes(path, lambda file: fig.savefig(file, format="png", dpi=100))
    plt.close(fig)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain aligned table. columns: (key, header, format spec)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([format(row[key], spec) if row.get(key) is not None else "-" for key, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


EPOCH_COLUMNS = [("epoch", "epoch", "d"), ("train_loss", "train loss", ".4f"), ("train_acc", "train acc", ".2f"),
                 ("test_loss", "test loss", ".4f"), ("test_acc", "test acc", ".2f"),
                 ("epoch_seconds", "seconds", ".2f"), ("images_per_second", "images/s", ",.0f")]

"""What a run leaves behind and prints: metrics.jsonl, summary.json, curves.png, results documents, and the plain
tables and wording the commands print them with."""

from __future__ import annotations

import json
import pathlib

from fastcnn.checkpoint import atomic_write_bytes, atomic_write_text
from fastcnn.errors import UsageError

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds", "images_per_second")
# Up to this many points a curve marks each of them; a longer one is a plain line (markers would merge).
_MARKED_POINTS = 30


def refuse_existing(paths, overwrite: bool) -> None:
    """Results are never overwritten silently: refuse before any measuring, not after."""
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


def plot_curves(path: pathlib.Path, history: list[dict], title: str, *, step_losses: list[dict] | None = None,
                evals: list[dict] | None = None) -> None:
    """Write curves.png: ``curves_figure``'s loss and accuracy curves."""
    fig = curves_figure(history, title, step_losses=step_losses, evals=evals)
    import matplotlib.pyplot as plt  # matplotlib: optional; curves_figure imported it and chose the backend

    atomic_write_bytes(path, lambda file: fig.savefig(file, format="png", dpi=100))
    plt.close(fig)


def curves_figure(history: list[dict], title: str, *, step_losses: list[dict] | None = None,
                  evals: list[dict] | None = None):
    """Loss and accuracy against epochs, train and test, readable from one epoch to hundreds (a matplotlib
    figure: the loss axes, then the accuracy axes).

    ``history``: one row per epoch (``METRIC_FIELDS``). ``step_losses`` (optional): the training loss within
    epochs, rows ``{"epoch": float, "train_loss": float}`` where ``epoch`` is fractional (2.5: half-way through the
    third epoch) and ``train_loss`` the mean over the steps since the row before; with them the train loss is drawn
    step by step instead of once per epoch (one epoch is then a curve, not a dot). ``evals`` (optional): test
    evaluations within epochs, rows with ``epoch`` (fractional), ``test_loss`` and ``test_acc`` (``fastcnn train
    --eval-every``'s); without them the test curves have one point per epoch.
    """
    import matplotlib  # optional dependency, and slow to import: only runs that plot pay for it

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    tests = evals if evals and len(evals) > len(history) else history
    train_loss = (([row["epoch"] for row in step_losses], [row["train_loss"] for row in step_losses])
                  if step_losses else (epochs, [row["train_loss"] for row in history]))
    test_epochs = [row["epoch"] for row in tests]
    curves = {
        "loss": [("train", *train_loss), ("test", test_epochs, [row["test_loss"] for row in tests])],
        "acc": [("train", epochs, [row["train_acc"] for row in history]),
                ("test", test_epochs, [row["test_acc"] for row in tests])],
    }
    # One epoch axis for both: accuracy (per epoch) lines up with the loss (per step when given).
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, key, label in ((loss_ax, "loss", "cross-entropy"), (acc_ax, "acc", "accuracy (%)")):
        for (name, xs, ys), marker in zip(curves[key], ("o", "s"), strict=True):
            ax.plot(xs, ys, f"{marker}-" if len(xs) <= _MARKED_POINTS else "-", label=name,
                    markersize=4, linewidth=1.2 if len(xs) > _MARKED_POINTS else 1.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    _set_epoch_ticks(loss_ax, [x for lines in curves.values() for _, xs, _ in lines for x in xs])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _set_epoch_ticks(ax, xs: list[float]) -> None:
    """Whole epochs, at most about ten labels: every epoch for a short run, every 2nd, 5th or 10th for a longer
    one (a label per epoch runs together from about 20 on). Curves inside a run of under three epochs keep
    matplotlib's fractional ticks (0.2, 0.4, ...), which say where in an epoch a point is."""
    from matplotlib.ticker import MaxNLocator  # matplotlib: imported by the plot that calls this

    within_epochs = any(x != int(x) for x in xs)
    if within_epochs and max(xs) - min(xs) < 3:
        return
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, steps=[1, 2, 5, 10], integer=True, min_n_ticks=1))


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain aligned table. columns: (key, header, format spec); a missing or None value prints as "-"."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([format(row[key], spec) if row.get(key) is not None else "-" for key, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def speedup_words(ratio: float | None, digits: int = 2) -> str | None:
    """A speed ratio (new rate over old rate, or old time over new time) in words that cannot be misread:
    "2.40x faster", "0.80x: slower", "1.00x: as fast" (equal at the digits shown); None stays None."""
    if ratio is None:
        return None
    shown = f"{ratio:.{digits}f}x"
    if shown == f"{1:.{digits}f}x":
        return f"{shown}: as fast"
    return f"{shown} faster" if ratio > 1 else f"{shown}: slower"


def spread(low: float | None, high: float | None, spec: str) -> str | None:
    """``low-high`` for a table cell (a spread beside a median); None when there is no spread to show."""
    if low is None or high is None:
        return None
    return f"{format(low, spec)}-{format(high, spec)}"


EPOCH_COLUMNS = [("epoch", "epoch", "d"), ("train_loss", "train loss", ".4f"), ("train_acc", "train acc", ".2f"),
                 ("test_loss", "test loss", ".4f"), ("test_acc", "test acc", ".2f"),
                 ("epoch_seconds", "seconds", ".2f"), ("images_per_second", "images/s", ",.0f")]

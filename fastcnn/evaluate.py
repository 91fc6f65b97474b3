"""``fastcnn eval CKPT``: a trained run's test accuracy, loss, per-class accuracy and confusion matrix.

The model is rebuilt from the checkpoint's own configuration and evaluated the way the run evaluated it
(same test split and subset, normalization, device-resident loader, batch size, autocast dtype and memory
layout), so with matching settings the accuracy and loss equal the run's last ``test_acc`` / ``test_loss``.
Results go to stdout (tables) and to ``eval.json`` + ``confusion.png`` beside the checkpoint (or ``--output``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch import nn

from fastcnn.build import EVAL_BATCH_SIZE
from fastcnn.checkpoint import atomic_write_bytes, checkpoint_file, load_checkpoint
from fastcnn.config import AMP_DTYPES, pick_device
from fastcnn.data import DeviceLoader, load_dataset
from fastcnn.env import device_name, versions
from fastcnn.errors import FastcnnError, UsageError
from fastcnn.models import MODELS, build_model
from fastcnn.report import format_table, write_json
from fastcnn.run_folder import EVAL_FILES
from fastcnn.vocabulary import canonical_kernel


@dataclasses.dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, on its device, in eval mode."""

    model: nn.Module
    name: str
    config: dict
    state: dict
    path: pathlib.Path
    device: torch.device


def load_model(path: str | pathlib.Path, *, device: torch.device | str = "cpu", kernel: str | None = None,
               channels_last: bool = False) -> LoadedModel:
    """Rebuild the model saved in checkpoint ``path``, a checkpoint file or its run folder (read with
    ``weights_only=True`` via ``load_checkpoint``).

    ``kernel`` overrides the run's Conv-ReLU-Pool implementation choice. Raises FastcnnError, naming the
    checkpoint, when it is not a usable fastcnn checkpoint or its weights do not fit its model.
    """
    path = checkpoint_file(path)
    state = load_checkpoint(path)
    name, config, weights = state.get("model_name"), state.get("config"), state.get("model")
    if name not in MODELS or not isinstance(config, dict) or not isinstance(weights, dict):
        raise FastcnnError(f"cannot use checkpoint {path}: it lacks a known model name, configuration or weights "
                           f"(model {name!r}); was it written by another version of fastcnn?")
    classes = state.get("classes") or [str(i) for i in range(10)]  # checkpoints record their class names
    model = build_model(name, kernel=run_kernel(kernel, config),
                        reference_impl=bool(config.get("reference_model", False)), num_classes=len(classes),
                        image_shape=tuple(state.get("image_shape") or (1, 28, 28)),
                        widths=tuple(config["widths"]) if config.get("widths") else None)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise FastcnnError(f"cannot use checkpoint {path}: its weights do not fit model {name} "
                           f"({' '.join(str(err).split())[:200]})") from None
    device = torch.device(device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    return LoadedModel(model, name, config, state, path, device)


def run_kernel(kernel: str | None, config: dict) -> str:
    """The implementation to evaluate with: ``kernel`` when given, else the run's, in the current vocabulary
    (a checkpoint written before the rename says triton or torch)."""
    chosen = kernel or config.get("kernel") or "auto"
    try:
        return canonical_kernel(chosen)
    except ValueError as err:
        raise (UsageError(f"--kernel: {err}") if kernel else FastcnnError(f"the checkpoint's {err}")) from None


def count_outputs(model: nn.Module) -> int:
    """Number of classes the model predicts (out_features of its last Linear layer)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features


def input_channels(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


@torch.no_grad()
def confusion_and_loss(model: nn.Module, loader, num_classes: int, *, amp_dtype: torch.dtype | None,
                       device: torch.device) -> tuple[torch.Tensor, float]:
    """Confusion matrix (int64 (C, C), rows = true class, columns = predicted) and mean cross-entropy.

    The loss and the argmax are computed as ``Trainer.evaluate`` computes them, so they match the run's numbers.
    """
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    samples = 0
    for images, labels in loader:
        if amp_dtype is None:
            logits = model(images)
        else:
            with torch.autocast(device.type, dtype=amp_dtype):
                logits = model(images)
        if logits.shape[1] != num_classes:
            raise FastcnnError(f"the model predicts {logits.shape[1]} classes but the dataset has {num_classes}; "
                               "evaluate it on the dataset it was trained on")
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
        samples += labels.shape[0]
    return confusion.view(num_classes, num_classes).cpu(), float(loss_sum) / max(samples, 1)


def per_class_stats(confusion: torch.Tensor, classes: list[str]) -> list[dict]:
    """Per class: samples (row sum), correct (diagonal), accuracy = recall (percent), precision (percent)."""
    rows = []
    for index, name in enumerate(classes):
        samples = int(confusion[index].sum())
        predicted = int(confusion[:, index].sum())
        correct = int(confusion[index, index])
        rows.append(dict(index=index, name=name, samples=samples, correct=correct,
                         accuracy=100.0 * correct / samples if samples else None,
                         precision=100.0 * correct / predicted if predicted else None))
    return rows


def top_confusions(confusion: torch.Tensor, classes: list[str], count: int = 5) -> list[dict]:
    """The most frequent mistakes: (true class, predicted class, count), largest first."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    values, flat = off.flatten().sort(descending=True, stable=True)
    c = confusion.shape[0]
    return [dict(true=classes[int(i) // c], predicted=classes[int(i) % c], count=int(v))
            for v, i in zip(values[:count], flat[:count], strict=True) if int(v) > 0]


def plot_confusion(path: pathlib.Path, confusion: torch.Tensor, classes: list[str], title: str) -> None:
    """confusion.png: counts annotated in each cell, class names on both axes (written atomically)."""
    import matplotlib  # imported when a plot is drawn: matplotlib takes a second to import, and not every caller plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = confusion.numpy()
    n = len(classes)
    side = max(6.0, 0.6 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > threshold else "black")
    ax.set_xticks(range(n), labels=classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    atomic_write_bytes(path, lambda file: fig.savefig(file, format="png", dpi=100))
    plt.close(fig)


def check_output(output: pathlib.Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} exists and is not a directory; choose another --output")
    existing = [name for name in EVAL_FILES if (output / name).exists()]
    if existing and not overwrite:
        raise UsageError(f"{output} already holds {', '.join(existing)}; pass --overwrite to replace "
                         f"{'it' if len(existing) == 1 else 'them'}, or choose another --output")


def evaluate_checkpoint(checkpoint: str | pathlib.Path, *, dataset: str | None = None, data_dir: str | None = None,
                        download: bool | None = None, test_subset: int | None = None,
                        batch_size: int | None = None, device: str = "auto", amp: bool | None = None,
                        amp_dtype: str | None = None, channels_last: bool | None = None, kernel: str | None = None,
                        output: str | pathlib.Path | None = None, overwrite: bool = False, stream=None) -> dict:
    """Evaluate ``checkpoint`` and write ``eval.json`` and ``confusion.png``; return eval.json's content.

    Every option left at None takes the run's value from the checkpoint's configuration. ``test_subset=0``
    means the whole test split. Accuracies are percentages; ``confusion[i][j]`` counts test images of class i
    predicted as class j.
    """
    stream = stream or sys.stdout
    checkpoint = checkpoint_file(checkpoint)  # a run folder means its checkpoint.pt
    output = pathlib.Path(output) if output is not None else checkpoint.parent
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    check_output(output, overwrite)
    torch_device = torch.device(pick_device(device))

    # The checkpoint first (cheap), so that a bad one fails before any data is read.
    loaded = load_model(checkpoint, kernel=kernel)
    cfg = loaded.config
    try:
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        run_dataset, seed = cfg["dataset"], int(cfg.get("seed", 0))
        synthetic_size = tuple(cfg.get("synthetic_size", (60_000, 10_000)))
    except (KeyError, TypeError) as err:
        raise FastcnnError(f"checkpoint {checkpoint} has an incomplete configuration ({err})") from None
    use_amp = bool(cfg.get("amp", False)) if amp is None else amp
    dtype_name = amp_dtype or cfg.get("amp_dtype") or "bfloat16"
    notes = []
    if use_amp and dtype_name == "float16" and torch_device.type == "cpu":
        notes.append("float16 autocast needs a GPU; evaluating with bfloat16 on the CPU")
        dtype_name = "bfloat16"
    autocast_dtype = AMP_DTYPES[dtype_name] if use_amp else None
    use_channels_last = bool(cfg.get("channels_last", False)) if channels_last is None else channels_last
    loaded.model = loaded.model.to(torch_device)
    if use_channels_last:
        loaded.model = loaded.model.to(memory_format=torch.channels_last)

    name = dataset or run_dataset
    subset = cfg.get("test_subset") if test_subset is None else (test_subset or None)
    # The test split in the shape the model was trained on: an image folder is decoded to it, another dataset
    # converted to it (and said so).
    channels, height, width = (int(v) for v in loaded.state.get("image_shape") or (1, 28, 28))
    test_set = load_dataset(name, False, root=data_root(data_dir, name, cfg),
                            download=bool(cfg.get("download", True)) if download is None else download,
                            synthetic_size=synthetic_size, seed=seed, channels=channels, image_size=(height, width),
                            subset=subset)
    notes.extend(test_set.notes)
    classes = list(test_set.classes)
    if len(classes) != count_outputs(loaded.model):
        raise FastcnnError(f"model {loaded.name} predicts {count_outputs(loaded.model)} classes but {name} has "
                           f"{len(classes)}; evaluate it on a dataset with the same classes")
    batch = batch_size or max(int(cfg.get("batch_size", 1)), EVAL_BATCH_SIZE)
    # As in training: the device loader emits the autocast dtype directly (the first layer would cast to it).
    loader_dtype = autocast_dtype if (autocast_dtype is not None and cfg.get("loader") != "torch") else torch.float32
    loader = DeviceLoader(test_set, batch, device=torch_device, shuffle=False, mean=mean, std=std,
                          dtype=loader_dtype, channels_last=use_channels_last)
    confusion, loss = confusion_and_loss(loaded.model, loader, len(classes), amp_dtype=autocast_dtype,
                                         device=torch_device)
    total = int(confusion.sum())
    correct = int(confusion.trace())
    accuracy = 100.0 * correct / total if total else 0.0
    per_class = per_class_stats(confusion, classes)
    mistakes = top_confusions(confusion, classes)
    history = loaded.state.get("history") or []
    result = dict(
        checkpoint=str(checkpoint), model=loaded.name, dataset=name, trained_on=run_dataset, split="test",
        samples=total, correct=correct, accuracy=accuracy, loss=loss,
        run_test_acc=history[-1].get("test_acc") if history else None,
        run_test_loss=history[-1].get("test_loss") if history else None,
        epochs_trained=loaded.state.get("epoch"), classes=classes, per_class=per_class,
        confusion=confusion.tolist(), top_confusions=mistakes,
        settings=dict(batch_size=batch, test_subset=subset, amp=use_amp, amp_dtype=dtype_name if use_amp else None,
                      channels_last=use_channels_last, kernel=run_kernel(kernel, cfg),
                      reference_model=bool(cfg.get("reference_model", False)), mean=list(mean), std=list(std)),
        notes=notes, device=str(torch_device), device_name=device_name(torch_device), versions=versions(),
        finished_at=datetime.datetime.now().isoformat(timespec="seconds"))

    output.mkdir(parents=True, exist_ok=True)
    title = f"{loaded.name} on {name} test: {accuracy:.2f}% ({correct}/{total})"
    plot_confusion(output / "confusion.png", confusion, classes, title)
    write_json(output / "eval.json", result)
    print_report(result, stream, format_table)
    print(f"\nwrote {output / 'eval.json'} and {output / 'confusion.png'}", file=stream)
    return result


def data_root(data_dir: str | None, dataset: str, config: dict) -> str | None:
    """Where to read ``dataset`` from: --data-dir; else the run's own --data-dir when it is the run's dataset; else
    None, which means $FASTCNN_DATA, else ./data, as for `fastcnn train` (the run's folder of another dataset, an
    image folder say, is no place to look for MNIST)."""
    if data_dir is not None:
        return data_dir
    return config.get("data_dir") if dataset == config.get("dataset") else None


def print_report(result: dict, stream, format_table) -> None:
    for note in result["notes"]:
        print(f"note: {note}", file=stream)
    print(f"{result['model']} ({result['checkpoint']}) on the {result['dataset']} test split: "
          f"accuracy {result['accuracy']:.2f}% ({result['correct']}/{result['samples']}), "
          f"loss {result['loss']:.4f}", file=stream)
    columns = [("index", "#", "d"), ("name", "class", "s"), ("samples", "samples", "d"), ("correct", "correct", "d"),
               ("accuracy", "accuracy %", ".2f"), ("precision", "precision %", ".2f")]
    print("\nper class\n" + format_table(result["per_class"], columns), file=stream)
    classes = result["classes"]
    rows = []
    for i, (name, counts) in enumerate(zip(classes, result["confusion"], strict=True)):
        label = name if name.split(" ")[0] == str(i) else f"{i} {name}"  # MNIST's names start with the digit
        rows.append({"true": label, **{str(j): count for j, count in enumerate(counts)}})
    columns = [("true", "true \\ predicted", "s")] + [(str(j), str(j), "d") for j in range(len(classes))]
    print("\nconfusion matrix (rows: true class, columns: predicted class)\n" + format_table(rows, columns),
          file=stream)
    if result["top_confusions"]:
        print("\nmost frequent mistakes: " + ", ".join(
            f"{m['true']} -> {m['predicted']} ({m['count']})" for m in result["top_confusions"]), file=stream)


def run_command(args: argparse.Namespace) -> int:
    """Entry point of ``fastcnn eval`` (args from the parser built by ``add_parser``)."""
    evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, download=args.download,
                        test_subset=args.test_subset, batch_size=args.batch_size, device=args.device,
                        amp=args.amp, amp_dtype=args.amp_dtype, channels_last=args.channels_last,
                        kernel=args.kernel, output=args.output, overwrite=args.overwrite)
    return 0

"""The ``fastcnn`` command line: every subcommand, flag and choice, built without importing torch (``--help``,
``--version`` and ``<command> --help`` answer at once; the heavy modules are imported once a command runs).

The names offered as choices come from ``fastcnn.vocabulary`` and ``fastcnn.bench_configs``, both torch-free.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

from fastcnn.bench_configs import ABLATION
from fastcnn.vocabulary import (
    AMP_DTYPE_NAMES,
    COMPILE_MODES,
    DATASETS,
    DEVICES,
    FIT_CHOICES,
    INVERT_CHOICES,
    KERNEL_ALIASES,
    KERNELS,
    LOADERS,
    MODEL_NAMES,
    OPTIMIZERS,
    PRESETS,
    RECIPE_NAMES,
    SCHEDULES,
    canonical_kernel,
)


def fastcnn_version() -> str:
    """The installed distribution's version (read from its metadata: importing the package root would import
    torch)."""
    try:
        return importlib.metadata.version("fastcnn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, ``fastcnn: error: ... (see `fastcnn CMD --help`)`` (exit 2), and
    options are never abbreviated (``--channels`` must not be taken for ``--channels-last``, nor ``--epoch`` for
    ``--epochs``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.subcommands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message):
        sys.stderr.write(f"fastcnn: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        # argparse reports a subcommand's unknown flags from the top parser, whose hint would be `fastcnn --help`;
        # the subcommand's own parser names itself (`fastcnn train --help`), where the flags are listed.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = self.subcommands.get(getattr(parsed, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def int_triple(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers like 16,32,128, got {text!r}")
    return values


def float_pair(text: str) -> tuple[float, float]:
    try:
        first, second = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.999, got {text!r}") from None
    return first, second


def positive_pair(text: str) -> tuple[int, int]:
    try:
        train, test = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,TEST sample counts like 60000,10000, got {text!r}") from None
    if train < 1 or test < 1:
        raise argparse.ArgumentTypeError(f"sample counts must be positive, got {text!r}")
    return train, test


def channel_count(text: str) -> int:
    if text not in ("1", "3"):
        raise argparse.ArgumentTypeError(f"must be 1 (grayscale) or 3 (RGB), got {text!r}")
    return int(text)


def image_size(text: str) -> tuple[int, int]:
    """``32`` -> (32, 32); ``48x64`` -> (48, 64) (height x width)."""
    try:
        values = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected N or HxW (pixels, like 32 or 48x64), got {text!r}")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"an image side must be at least 1 pixel, got {text!r}")
    return values


def subset_arg(text: str) -> int:
    """eval's --test-subset: a positive count, or "all" (the whole test split; returned as 0)."""
    if text == "all":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of images or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (or 'all'), got {value}")
    return value


def kernel_name(text: str) -> str:
    """--kernel: a name of the current vocabulary, the old ones (triton, torch) translated."""
    try:
        return canonical_kernel(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


OLD_KERNEL_NAMES = " and ".join(f"{old} ({new})" for old, new in KERNEL_ALIASES.items())


def add_kernel_option(group, default_text: str) -> None:
    group.add_argument("--kernel", type=kernel_name, choices=KERNELS, help="Conv-ReLU-Pool implementation: fused "
                       "(fastcnn's one kernel: Triton on a GPU, native C on a CPU), aten (PyTorch's conv2d -> relu "
                       f"-> max_pool2d chain) or auto (the faster one here) ({default_text}); the old names "
                       f"{OLD_KERNEL_NAMES} are still accepted")


def add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", choices=MODEL_NAMES, help="model to train (default: simplecnn, or the recipe's)")
    g.add_argument("--dataset", choices=DATASETS, help="dataset (default: the model's tutorial dataset)")
    g.add_argument("--data-dir", help="dataset root in torchvision's layout (default: $FASTCNN_DATA, else ./data); "
                   "for --dataset imagefolder, a folder of <class>/<image>.png (or train/ and test/ subfolders)")
    g.add_argument("--channels", type=channel_count, metavar="{1,3}", help="train on grayscale (1) or RGB (3) "
                   "images, converting if needed (default: the dataset's; an image folder's: RGB when its images "
                   "are colour)")
    g.add_argument("--image-size", type=image_size, metavar="N|HxW", help="resize the images to N x N or H x W "
                   "pixels (default: the dataset's; an image folder's: its images' most common size)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download a missing dataset when the network allows (default: on)")
    g.add_argument("--widths", type=int_triple, metavar="C1,C2,H", help="fastnet's widths: conv1 and conv2 "
                   "channels, hidden units; cifarnet's: its three conv widths (default: the recipe's)")
    g.add_argument("--train-subset", type=int, metavar="N", help="use only the first N training images")
    g.add_argument("--test-subset", type=int, metavar="N", help="use only the first N test images")
    g.add_argument("--synthetic-size", type=positive_pair, default=(60_000, 10_000), metavar="TRAIN,TEST",
                   help="sample counts of --dataset synthetic (default: 60000,10000)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random translation by up to 2 pixels (DALI loader) (default: off, or the recipe's)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="with --augment: random "
                   "horizontal flips too (never for digits; fine for most photos) (default: off, or the recipe's)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, help="epochs (default: the tutorial's, 1)")
    g.add_argument("-b", "--batch-size", type=int, help="batch size (default: the tutorial's: 64 simplecnn, 100 lenet)")
    g.add_argument("--lr", type=float, help="learning rate (default: the tutorial's)")
    g.add_argument("--opt", choices=OPTIMIZERS, help="optimizer (default: adam, as in the tutorials)")
    g.add_argument("--seed", type=int, default=0, help="seed of weights and data order (default: 0)")
    g.add_argument("--sched", dest="schedule", choices=SCHEDULES, help="learning-rate schedule per step "
                   "(default: constant, as in the tutorials)")
    g.add_argument("--betas", type=float_pair, metavar="B1,B2", help="Adam betas (default: 0.9,0.999)")
    g.add_argument("--label-smoothing", type=float, metavar="EPS", help="cross-entropy label smoothing (default: 0)")
    g.add_argument("--recipe", choices=RECIPE_NAMES, help="a named recipe: speedrun (fastcnn's time-to-accuracy "
                   "recipe), public (the best public MNIST recipe) or cifar10 (CIFAR-10 and other small colour "
                   "images); it picks model, batch, optimizer, schedule, augmentation")
    g = p.add_argument_group("speed (defaults come from --preset; explicit flags override it)")
    g.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda when a GPU is visible")
    g.add_argument("--preset", choices=PRESETS,
                   help="fast: what helps on this device; reference: the tutorial program exactly")
    g.add_argument("--loader", choices=LOADERS, help="device: dataset resident on the device; dali: NVIDIA DALI "
                   "pipeline; torch: torchvision DataLoader (the tutorials')")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="autocast mixed precision")
    g.add_argument("--amp-dtype", choices=AMP_DTYPE_NAMES, help="bfloat16 (default where supported) or float16 "
                   "(with a GradScaler)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout for data and model")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    g.add_argument("--compile-mode", choices=COMPILE_MODES, help="torch.compile mode (default: default)")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the whole training step as a CUDA graph (default: on in the fast preset on CUDA)")
    add_kernel_option(g, "default: auto in the fast preset, aten in the reference preset")
    g.add_argument("--fused-opt", dest="fused_optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="the optimizer's fused implementation: one kernel per step (default: on in the fast preset, "
                   "on a CPU and on CUDA)")
    g.add_argument("--workers", dest="num_workers", type=int, default=0,
                   help="DataLoader worker processes for --loader torch (default: 0, as in the tutorials)")


def add_verbose_option(group) -> None:
    group.add_argument("--verbose", action="store_true", help="also print the diagnostic output that is kept "
                       "quiet by default (for bug reports)")


def add_train(sub) -> None:
    train = sub.add_parser("train", help="train a model", description="Train a model and write metrics, "
                           "a checkpoint, summary.json and curves.png to --output.")
    add_training_options(train)
    g = train.add_argument_group("run")
    g.add_argument("--output", help="run folder (default: runs/<timestamp>-<model>)")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --output")
    g.add_argument("--resume", metavar="CKPT", help="continue the run saved in CKPT, a checkpoint.pt or its run "
                   "folder (its flags are kept; --epochs may extend it)")
    g.add_argument("--target-acc", type=float, metavar="PCT",
                   help="report the training seconds until test accuracy first reaches PCT")
    g.add_argument("--eval-every", type=int, default=0, metavar="STEPS",
                   help="also evaluate every STEPS steps inside an epoch (its time is excluded from training time)")
    g.add_argument("--runs", type=int, default=1, help="train N times with seeds seed..seed+N-1; summary.json "
                   "holds means and standard deviations")
    g.add_argument("--nproc", type=int, help="data parallel: run N processes with torchrun "
                   "(DistributedDataParallel; -b is the global batch; 1: DDP of one process)")
    g.add_argument("--deterministic", action="store_true", help="bitwise-repeatable runs: deterministic "
                   "algorithms only, and --kernel auto measures nothing (no measurable cost on the CPU; not yet "
                   "measured on a GPU; see README)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_verbose_option(g)
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="measure training throughput of configurations on this device",
                           description="Training-step throughput of named configurations, in one run: untimed "
                           "warm-up, device synchronized at each clock read, median of repeats.")
    add_training_options(bench)
    g = bench.add_argument_group("benchmark (the dataset defaults to synthetic, or mnist with --race)")
    g.add_argument("--configs", default="reference,fast", help="comma-separated configurations (see --list)")
    g.add_argument("--list", action="store_true", help="list the configurations and exit")
    g.add_argument("--steps", type=int, default=50, help="timed steps per repeat (default: 50)")
    g.add_argument("--warmup", type=int, default=10, help="untimed warm-up steps (default: 10)")
    g.add_argument("--repeats", type=int, help="repeats; the median is reported (default: 5 timed runs of "
                   "--steps; with --epoch, 1 round)")
    g.add_argument("--epoch", action="store_true", help="time whole training epochs (with test accuracy) "
                   "instead of steps")
    g.add_argument("--ablation", action="store_true", help="add one optimization at a time: " + ", ".join(ABLATION))
    g.add_argument("--profile", type=int, default=0, metavar="STEPS", help="after timing, profile STEPS more "
                   "training steps of each configuration: kernels, host launches and device time per step, and the "
                   "top kernels (default: 0, off)")
    g.add_argument("--race", action="store_true", help="time-to-accuracy race: the speedrun recipe against the "
                   "public train_mnist_fast recipe, --runs each, interleaved")
    g.add_argument("--runs", type=int, default=3, help="runs per recipe in --race (default: 3)")
    g.add_argument("--target-acc", type=float, metavar="PCT", help="with --race: also report time to PCT")
    g.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    g.add_argument("--plot", metavar="PATH", help="also write a bar chart PNG")
    g.add_argument("--overwrite", action="store_true", help="replace existing --json / --plot files")
    add_verbose_option(g)
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def add_env(sub) -> None:
    envp = sub.add_parser("env", help="versions, devices and available features (for bug reports)")
    envp.add_argument("--json", action="store_true", help="print JSON")
    envp.add_argument("--debug", action="store_true", help="show tracebacks")


CHECKPOINT_HELP = "checkpoint.pt written by `fastcnn train`, or its run folder"


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="test accuracy, per-class accuracy and confusion matrix of a trained run",
        description="Evaluate a checkpoint on the test split of its run's dataset, with the run's normalization, "
        "autocast and layout settings; print accuracy, loss, per-class accuracy and the confusion matrix, and "
        "write eval.json and confusion.png to --output (default: the checkpoint's folder).")
    p.add_argument("checkpoint", metavar="CKPT", help=CHECKPOINT_HELP)
    g = p.add_argument_group("data (default: the run's)")
    g.add_argument("--dataset", choices=DATASETS, help="evaluate on another dataset's test split")
    g.add_argument("--data-dir", help="dataset root in torchvision's layout (default: the run's --data-dir for "
                   "the run's own dataset, else $FASTCNN_DATA, else ./data)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                   help="download a missing dataset when the network allows (default: the run's setting)")
    g.add_argument("--test-subset", type=subset_arg, metavar="N|all",
                   help="evaluate the first N test images, or all of them (default: the run's --test-subset)")
    g = p.add_argument_group("evaluation (default: the run's settings)")
    g.add_argument("-b", "--batch-size", type=int, help="batch size (default: the run's, at least 1000, as "
                   "`fastcnn train` evaluates)")
    g.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda when a GPU is visible")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="autocast mixed precision")
    g.add_argument("--amp-dtype", choices=AMP_DTYPE_NAMES, help="autocast dtype")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout for data and model")
    add_kernel_option(g, "default: the run's")
    g = p.add_argument_group("output")
    g.add_argument("--output", metavar="DIR", help="folder for eval.json and confusion.png "
                   "(default: the checkpoint's folder)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing eval.json / confusion.png")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="classify PNG/JPEG images with a trained run",
        description="Classify image files with a checkpoint. Each image is prepared the way the run's training "
        "images were: for an MNIST run the way MNIST was made (grayscale, bright object on dark background, fitted "
        "into a 20x20 box and centered by center of mass in 28x28); for every other run converted to the training "
        "channels and resized to the training size. Then it is normalized with the run's mean/std. Prints one line "
        "per image.")
    p.add_argument("checkpoint", metavar="CKPT", help=CHECKPOINT_HELP)
    p.add_argument("images", metavar="IMAGE", nargs="+", help="PNG or JPEG files (any size, any mode)")
    p.add_argument("--top", type=int, metavar="K", help="also show the K most probable classes")
    p.add_argument("--fit", choices=FIT_CHOICES, default="auto",
                   help="how to bring an image to the model's input: resize (to the training size and channels, "
                   "as an image folder is decoded), digit (MNIST's preprocessing: 20x20 box, centre of mass, "
                   "auto-invert), or auto: digit for runs trained on MNIST, resize for every other (default: auto)")
    p.add_argument("--invert", choices=INVERT_CHOICES, default="auto",
                   help="with --fit digit: make the object bright on a dark background as in MNIST: auto inverts "
                   "images whose border is mostly bright (a dark digit on white paper) (default: auto)")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda when a GPU is visible")
    add_kernel_option(p, "default: the run's")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="fastcnn", description="Train small CNNs as fast as the hardware allows.")
    parser.add_argument("--version", action="version", version=f"fastcnn {fastcnn_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add in (add_train, add_bench, add_env, add_eval, add_predict):
        add(sub)
    parser.subcommands = dict(sub.choices)
    return parser

"""The ``fastcnn`` command: ``train``, ``bench``, ``eval``, ``predict`` and ``env``.

Errors the user can fix print one line, ``fastcnn: error: ...``, on stderr and exit 2 for bad arguments, 1 for
other failures (130/143 when interrupted); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from fastcnn import __version__
from fastcnn.config import AMP_DTYPES, COMPILE_MODES, DEVICES, OPTIMIZERS, PRESETS, TrainConfig
from fastcnn.data import DATASETS, LOADERS
from fastcnn.engine import SCHEDULES
from fastcnn.errors import FastcnnError
from fastcnn.models import MODELS
from fastcnn.nn import KERNEL_CHOICES
from fastcnn.recipes import RECIPES


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: ``fastcnn: error: ...`` (exit 2), and options are never
    abbreviated (``--channels`` must not be taken for ``--channels-last``, nor a typo for another flag)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        sys.stderr.write(f"fastcnn: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


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


def add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", choices=sorted(MODELS), help="model to train (default: simplecnn, or the recipe's)")
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
    g.add_argument("--recipe", choices=sorted(RECIPES), help="a named recipe: speedrun (fastcnn's time-to-accuracy "
                   "recipe), public (the best public MNIST recipe) or cifar10 (CIFAR-10 and other small colour "
                   "images); it picks model, batch, optimizer, schedule, augmentation")
    g = p.add_argument_group("speed (defaults come from --preset; explicit flags override it)")
    g.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda when a GPU is visible")
    g.add_argument("--preset", choices=PRESETS,
                   help="fast: what helps on this device; reference: the tutorial program exactly")
    g.add_argument("--loader", choices=LOADERS, help="device: dataset resident on the device; dali: NVIDIA DALI "
                   "pipeline; torch: torchvision DataLoader (the tutorials')")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="autocast mixed precision")
    g.add_argument("--amp-dtype", choices=sorted(AMP_DTYPES), help="bfloat16 (default where supported) or float16 "
                   "(with a GradScaler)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout for data and model")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    g.add_argument("--compile-mode", choices=COMPILE_MODES, help="torch.compile mode (default: default)")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the whole training step as a CUDA graph (default: on in the fast preset on CUDA)")
    g.add_argument("--kernel", choices=KERNEL_CHOICES, help="Conv-ReLU-Pool implementation: triton (fused), torch "
                   "(cuDNN/aten chain) or auto (the faster one here)")
    g.add_argument("--fused-opt", dest="fused_optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="the optimizer's fused implementation: one kernel per step (default: on in the fast preset "
                   "on CUDA)")
    g.add_argument("--workers", dest="num_workers", type=int, default=0,
                   help="DataLoader worker processes for --loader torch (default: 0, as in the tutorials)")


def build_parser() -> argparse.ArgumentParser:
    from fastcnn.bench import ABLATION

    parser = OneLineParser(prog="fastcnn", description="Train small CNNs as fast as the hardware allows.")
    parser.add_argument("--version", action="version", version=f"fastcnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = sub.add_parser("train", help="train a model", description="Train a model and write metrics, "
                           "a checkpoint, summary.json and curves.png to --output.")
    add_training_options(train)
    g = train.add_argument_group("run")
    g.add_argument("--output", help="run folder (default: runs/<timestamp>-<model>)")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --output")
    g.add_argument("--resume", metavar="CKPT", help="continue the run saved in CKPT (its flags are kept; "
                   "--epochs may extend it)")
    g.add_argument("--target-acc", type=float, metavar="PCT",
                   help="report the training seconds until test accuracy first reaches PCT")
    g.add_argument("--eval-every", type=int, default=0, metavar="STEPS",
                   help="also evaluate every STEPS steps inside an epoch (its time is excluded from training time)")
    g.add_argument("--runs", type=int, default=1, help="train N times with seeds seed..seed+N-1; summary.json "
                   "holds means and standard deviations")
    g.add_argument("--nproc", type=int, help="data parallel: run N processes with torchrun "
                   "(DistributedDataParallel; -b is the global batch; 1: DDP of one process)")
    g.add_argument("--deterministic", action="store_true", help="bitwise-repeatable runs (deterministic "
                   "algorithms only; slower, see README)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--debug", action="store_true", help="show tracebacks")

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
    g.add_argument("--debug", action="store_true", help="show tracebacks")

    envp = sub.add_parser("env", help="versions, devices and available features (for bug reports)")
    envp.add_argument("--json", action="store_true", help="print JSON")
    envp.add_argument("--debug", action="store_true", help="show tracebacks")

    from fastcnn import evaluate, predict

    evaluate.add_parser(sub)
    predict.add_parser(sub)
    return parser


def train_config(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{name: value for name, value in vars(args).items() if name in fields})


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else 2
    try:
        if args.command == "train":
            from fastcnn.train import run_training

            if args.nproc is not None and "TORCHELASTIC_RUN_ID" not in os.environ:  # not already under torchrun
                from fastcnn.distributed import launch, strip_nproc

                return launch(args.nproc, strip_nproc(list(sys.argv[1:] if argv is None else argv)),
                              train_config(args))
            run_training(train_config(args))
        elif args.command == "bench":
            if args.race:
                from fastcnn.race import run_race_command

                run_race_command(args, train_config(args))
            else:
                from fastcnn.bench import run_bench_command

                run_bench_command(args, train_config(args))
        elif args.command in ("eval", "predict"):
            from fastcnn import evaluate, predict

            return (evaluate if args.command == "eval" else predict).run_command(args)
        elif args.command == "env":
            import json

            from fastcnn import env

            info = env.collect()
            print(json.dumps(info, indent=2) if args.json else env.format_report(info))
        return 0
    except FastcnnError as err:
        if args.debug:
            raise
        if not getattr(err, "quiet", False):  # quiet: another process (rank 0) reports the same error
            print(f"fastcnn: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("fastcnn: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from fastcnn.train import Interrupted

        if isinstance(err, Interrupted):
            return err.exit_code
        if args.debug:
            raise
        print(f"fastcnn: error: {type(err).__name__}: {' '.join(str(err).split())[:300]} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

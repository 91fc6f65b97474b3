"""The speedrun recipe's ablation: what each choice buys in training time and test accuracy.

    python bench/speedrun_ablation.py --dataset mnist --runs 3 --json bench/results/speedrun-ablation-mnist-cpu.json

Every variant is a ``fastcnn train`` configuration (its equivalent command line is recorded with it), trained
``--runs`` times with seeds 0..runs-1; the variants are interleaved run by run so that a slow spell of a shared
machine hits all of them alike. Reports mean ± std of test accuracy (full official test set) and training seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import pathlib
import sys
import tempfile

from fastcnn import env
from fastcnn.build import load_splits
from fastcnn.config import TrainConfig, resolve
from fastcnn.report import format_table
from fastcnn.runs import mean_std
from fastcnn.train import run_training

# (name, what it changes, TrainConfig fields, the same as fastcnn train flags)
VARIANTS = {
    "mnist": [
        ("public", "the public train_mnist_fast recipe (fp32, NCHW, eager)", dict(recipe="public"),
         "--recipe public"),
        ("public-net-fast", "its network on fastcnn's fast path (channels-last, bf16, fused blocks)",
         dict(recipe="speedrun", widths=(24, 32, 256), label_smoothing=0.0, amp=True),
         "--recipe speedrun --widths 24,32,256 --label-smoothing 0 --amp"),
        ("public-net-fp32", "... in fp32 (bf16 autocast is slower on this CPU)",
         dict(recipe="speedrun", widths=(24, 32, 256), label_smoothing=0.0, amp=False),
         "--recipe speedrun --widths 24,32,256 --label-smoothing 0 --no-amp"),
        ("narrow", "fastnet widths 16,32,128", dict(recipe="speedrun", label_smoothing=0.0),
         "--recipe speedrun --label-smoothing 0"),
        ("speedrun", "+ label smoothing 0.1: the speedrun recipe", dict(recipe="speedrun"), "--recipe speedrun"),
        ("narrower", "widths 12,24,96 (tried, not kept)", dict(recipe="speedrun", widths=(12, 24, 96)),
         "--recipe speedrun --widths 12,24,96"),
        ("batch-512", "batch 512, lr 2e-2 (tried, not kept)", dict(recipe="speedrun", batch_size=512, lr=2e-2),
         "--recipe speedrun -b 512 --lr 0.02"),
    ],
    "fashion-mnist": [
        ("public", "the public recipe's facts applied to Fashion-MNIST (1 epoch)", dict(recipe="public"),
         "--recipe public"),
        ("3-epochs", "fastnet, label smoothing 0.1, 3 epochs", dict(recipe="speedrun", epochs=3),
         "--recipe speedrun --epochs 3"),
        ("speedrun", "4 epochs: the speedrun recipe", dict(recipe="speedrun"), "--recipe speedrun"),
        ("no-smoothing", "4 epochs without label smoothing", dict(recipe="speedrun", label_smoothing=0.0),
         "--recipe speedrun --label-smoothing 0"),
    ],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=sorted(VARIANTS))
    parser.add_argument("--data-dir")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", help="comma-separated variant names")
    parser.add_argument("--json", help="write the results here (refuses to overwrite)")
    args = parser.parse_args(argv)
    if args.json and pathlib.Path(args.json).exists():
        parser.error(f"{args.json} exists; choose another path")
    variants = [v for v in VARIANTS[args.dataset] if not args.only or v[0] in args.only.split(",")]
    base = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, progress=False, device="cpu")
    datasets = load_splits(resolve(dataclasses.replace(base, recipe="public")))
    runs = {name: [] for name, *_ in variants}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.runs):
            for name, _, fields, _ in variants:
                cfg = dataclasses.replace(base, seed=seed, output=f"{scratch}/{name}-{seed}", **fields)
                summary = run_training(cfg, stream=io.StringIO(), datasets=datasets)
                runs[name].append(dict(test_acc=summary["test_acc"], train_seconds=summary["train_seconds"]))
                print(f"{name} seed {seed}: {summary['test_acc']:.2f}% {summary['train_seconds']:.2f} s",
                      file=sys.stderr)
    rows = []
    for name, what, _, flags in variants:
        test_acc, test_acc_std = mean_std([r["test_acc"] for r in runs[name]])
        train_seconds, train_seconds_std = mean_std([r["train_seconds"] for r in runs[name]])
        command = f"fastcnn train --dataset {args.dataset} --device cpu {flags}"
        rows.append(dict(variant=name, what=what, command=command, test_acc=test_acc, test_acc_std=test_acc_std,
                         train_seconds=train_seconds, train_seconds_std=train_seconds_std, per_run=runs[name]))
    columns = [("variant", "variant", "s"), ("test_acc", "test acc", ".2f"), ("test_acc_std", "±", ".2f"),
               ("train_seconds", "train s", ".2f"), ("train_seconds_std", "±", ".2f"), ("what", "what", "s")]
    print(format_table(rows, columns))
    doc = dict(dataset=args.dataset, runs=args.runs, device_name=env.device_name("cpu"), versions=env.versions(),
               git_commit=env.git_commit(), command=" ".join([sys.executable.split("/")[-1], *sys.argv]),
               date=datetime.datetime.now().isoformat(timespec="seconds"), variants=rows)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

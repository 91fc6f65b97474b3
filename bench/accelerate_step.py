"""What ``fastcnn.accelerate(model)`` buys a user's own CNN: milliseconds per training step (forward, loss,
backward, Adam), the original model against its accelerated copy, interleaved in one process.

The model is a plain user CNN with three fusable Conv2d -> ReLU -> MaxPool2d chains (padding 1, C_in > 1 after
the first), on 3x48x48 inputs, batch 64, as a user would write it: not one of fastcnn's models. Each variant
trains its own copy of the same initial weights; rounds alternate the variants so that the machine's drift hits
each alike, and the median (with p20 / p80) over rounds is reported. Warm-up steps are not timed.

    python bench/accelerate_step.py [--device cpu] [--steps 20] [--rounds 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import pathlib
import statistics
import sys
import time

import torch
from torch import nn

import fastcnn
from fastcnn import env


class UserCNN(nn.Module):
    """Three conv blocks and a classifier, written the usual way (nothing fastcnn-specific)."""

    def __init__(self, in_channels: int = 3, classes: int = 10, widths: tuple[int, ...] = (32, 64, 128),
                 size: int = 48):
        super().__init__()
        blocks, c = [], in_channels
        for width in widths:
            blocks += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = width
        self.features = nn.Sequential(*blocks)
        side = size // 2 ** len(widths)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, 256), nn.ReLU(),
                                        nn.Linear(256, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def step_timer(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)
        return (time.perf_counter() - started) * 1e3

    return step


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round (default: 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first (default: 5)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    original = UserCNN(size=args.size).to(device)
    images = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    variants = {
        "original": copy.deepcopy(original),
        "accelerate": fastcnn.accelerate(copy.deepcopy(original)),
        "original channels-last": copy.deepcopy(original).to(memory_format=torch.channels_last),
        "accelerate channels-last": fastcnn.accelerate(copy.deepcopy(original), channels_last=True),
    }
    inputs = {name: images.contiguous(memory_format=torch.channels_last) if "channels-last" in name else images
              for name in variants}
    steps = {name: step_timer(model, inputs[name], labels) for name, model in variants.items()}
    fused = fastcnn.accelerate_report(variants["accelerate"])
    print(f"{fused}\n", file=sys.stderr)
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.rounds):
        for name, step in steps.items():
            samples[name].append(statistics.median(step() for _ in range(args.steps)))
        print(f"round {round_index + 1}/{args.rounds}: "
              + ", ".join(f"{name} {values[-1]:.2f} ms" for name, values in samples.items()), file=sys.stderr)

    base = statistics.median(samples["original"])
    rows = []
    print(f"\nUserCNN {args.batch_size}x3x{args.size}x{args.size}, Adam, {env.device_name(device)}, "
          f"torch {torch.__version__}; median of {args.rounds} interleaved rounds of {args.steps} steps")
    print(f"{'variant':>26}  {'ms/step':>8}  {'p20-p80':>13}  {'x original':>10}")
    for name, values in samples.items():
        median = statistics.median(values)
        rows.append(dict(variant=name, ms_per_step=round(median, 4), p20=round(percentile(values, 0.2), 4),
                         p80=round(percentile(values, 0.8), 4), speedup=round(base / median, 3),
                         rounds=[round(v, 4) for v in values]))
        print(f"{name:>26}  {median:8.2f}  {percentile(values, 0.2):6.2f}-{percentile(values, 0.8):<6.2f}  "
              f"{base / median:9.2f}x")
    if args.json:
        result = dict(benchmark="accelerate_step", command=" ".join(["python"] + sys.argv),
                      device=str(device), device_name=env.device_name(device), versions=env.versions(),
                      git_commit=env.git_commit(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                      batch_size=args.batch_size, size=args.size, steps=args.steps, rounds=args.rounds,
                      fused_chains=len(fused.fused), native_kernel=fastcnn.ops.native_kernel_status(),
                      results=rows)
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

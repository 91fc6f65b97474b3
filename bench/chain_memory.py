"""Activation memory of one Conv2d -> ReLU -> MaxPool2d chain per training step: the bytes that the forward keeps
for backward (autograd's saved tensors, each storage counted once), fused op against the aten chains.

The fused op keeps its input, its weight and a 1-byte code per pooled element (the pooled output itself is the
next layer's business); the aten chains keep the full-size convolution output (or its ReLU) and the pool's int64
indices besides. The layer input and the weight are kept by every variant alike and are listed apart.

    python bench/chain_memory.py [--dtype bfloat16] [--channels-last] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import torch

from fastcnn import env
from fastcnn.ops import conv_relu_pool, conv_relu_pool_aten, conv_relu_pool_reference, native_kernel_status

# (name, batch, C_in, C_out, H, k, padding): the tutorials' layers and a user CNN's (bench/accelerate_step.py).
LAYERS = [
    ("simplecnn conv1", 64, 1, 32, 28, 3, 0),
    ("lenet conv1", 100, 1, 6, 28, 5, 0),
    ("lenet conv2", 100, 6, 12, 12, 5, 0),
    ("user conv2", 64, 32, 64, 24, 3, 1),
]
VARIANTS = {"fused": conv_relu_pool, "aten, relu after pool": conv_relu_pool_aten,
            "aten, literal chain": conv_relu_pool_reference}


def saved_bytes(fn, x, weight, bias, padding) -> tuple[int, int]:
    """(bytes of saved tensors other than the chain's own inputs, bytes of its inputs that were saved)."""
    inputs = {t.untyped_storage().data_ptr() for t in (x, weight, bias)}
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, weight, bias, padding)
    other = sum(n for ptr, n in storages.items() if ptr not in inputs)
    return other, sum(n for ptr, n in storages.items() if ptr in inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"saved for backward per chain call ({args.dtype}, {'channels-last' if args.channels_last else 'NCHW'});"
          " KiB beyond the layer's input and weight")
    print(f"{'layer':>16}  " + "  ".join(f"{name:>22}" for name in VARIANTS) + "  aten/fused")
    for name, n, c_in, c_out, h, k, p in LAYERS:
        x = torch.randn(n, c_in, h, h, dtype=dtype)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(c_in > 1)  # a first layer's input is data
        weight = torch.randn(c_out, c_in, k, k, dtype=dtype, requires_grad=True)
        bias = torch.randn(c_out, dtype=dtype, requires_grad=True)
        saved = {variant: saved_bytes(fn, x, weight, bias, p) for variant, fn in VARIANTS.items()}
        ratio = saved["aten, relu after pool"][0] / saved["fused"][0]
        rows.append(dict(layer=name, shape=[n, c_in, h, h], c_out=c_out, k=k, padding=p,
                         saved_bytes={v: s[0] for v, s in saved.items()},
                         saved_input_bytes={v: s[1] for v, s in saved.items()}, aten_over_fused=round(ratio, 2)))
        print(f"{name:>16}  " + "  ".join(f"{saved[v][0] / 1024:22.1f}" for v in VARIANTS) + f"  {ratio:9.1f}x")
    if args.json:
        result = dict(benchmark="chain_memory", command=" ".join(["python"] + sys.argv), dtype=args.dtype,
                      channels_last=args.channels_last, versions=env.versions(), git_commit=env.git_commit(),
                      native_kernel=native_kernel_status(),
                      date=datetime.datetime.now().isoformat(timespec="seconds"), results=rows)
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

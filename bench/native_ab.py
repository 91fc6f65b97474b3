"""Two builds of the native CPU kernel, side by side: are their numbers the same, bit for bit, and which is faster?

The check every change to kernels/conv_relu_pool_cpu.c should pass before it is timed anywhere else. Both builds
are compiled here, with one command (setup.py's flags for the build this CPU loads), so that only the source
differs: the baseline from the C source at a git revision (default HEAD), the candidate from the working tree's
(or from another revision). ``--baseline-lib`` / ``--candidate-lib`` take built libraries instead.

1. Bitwise: forward (output and code), grad_weight / grad_bias and grad_input of both builds on a grid of awkward
   problems (batch 1 and 3, C_in 1-16, C_out 5 and 12, every kernel size and padding, odd sizes, fp32 and bf16
   with float32 or bf16 parameters, NCHW and channels-last, a NaN and an inf in the gradient) must match exactly.
   A change meant to alter the numbers (a new summation order) shows here as a difference, and then needs the
   reference-twin tests of tests/test_conv_relu_pool_cpu.py to say it is still right.
2. Speed: each kernel on the layers the benchmarks train (the tutorials' and bench/accelerate_step.py's), the two
   builds interleaved in rounds within one process (this VM's speed drifts within minutes); the median of the
   rounds and the range of the per-round ratios.
3. With ``--steps``: whole training steps, the library swapped under the same model and optimizer, interleaved
   the same way: LeNet's fast step (bf16 autocast, channels-last, batch 100, LeanFusedAdam) and
   bench/accelerate_step.py's user CNN through ``fastcnn.accelerate`` (fp32, batch 64, Adam).

    python bench/native_ab.py [--baseline REV | --baseline-lib PATH] [--candidate REV | --candidate-lib PATH]
                              [--rounds 7] [--no-speed] [--steps] [--quick]

Exits 1 when any result differs.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from fastcnn.kernels import conv_relu_pool_cpu as native
from fastcnn.kernels.layout import memory_format_of

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCE = "kernels/conv_relu_pool_cpu.c"

# (name, batch, C_in, C_out, H, k, padding): as in bench/chain_memory.py, plus the user CNN's third layer.
LAYERS = [
    ("simplecnn conv1", 64, 1, 32, 28, 3, 0),
    ("lenet conv1", 100, 1, 6, 28, 5, 0),
    ("lenet conv2", 100, 6, 12, 12, 5, 0),
    ("user conv2", 64, 32, 64, 24, 3, 1),
    ("user conv3", 64, 64, 128, 12, 3, 1),
]
FIRST_LAYERS = {"simplecnn conv1", "lenet conv1"}  # their input is data: training never asks for grad_input


def setup_flags() -> tuple[str, list[str]]:
    """(build name, compiler flags) of the build this CPU loads, as setup.py compiles it."""
    namespace: dict = {}
    text = (REPO / "setup.py").read_text()
    head = text[:text.index("class CtypesLibrary")]  # the flag tables, without running setup()
    exec(compile(head, "setup.py", "exec"), namespace)
    name = native.build_names()[0]
    return name, namespace["COMMON"] + namespace["BUILDS"][name]


def source_at(rev: str) -> str:
    """The C source at git revision ``rev``, or the working tree's for "worktree"."""
    if rev == "worktree":
        return (REPO / SOURCE).read_text()
    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{SOURCE}"], capture_output=True, text=True)
    if shown.returncode != 0:
        sys.exit(f"native_ab: cannot read {SOURCE} at {rev!r}: {shown.stderr.strip()}")
    return shown.stdout


def build(text: str, directory: pathlib.Path, rev: str = "the given source") -> pathlib.Path:
    """C source ``text`` compiled into ``directory`` as setup.py compiles this CPU's build."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "source.c").write_text(text)
    name, flags = setup_flags()
    library = directory / f"libfastcnn_cpu_{name}.so"
    compiled = subprocess.run(["gcc", *flags, "-shared", "-fPIC", str(directory / "source.c"), "-o", str(library),
                               "-fopenmp"], capture_output=True, text=True)
    if compiled.returncode != 0:
        sys.exit(f"native_ab: {rev} does not compile:\n{compiled.stderr}")
    return library


def load(path: pathlib.Path):
    lib, status = native.load_library(path)
    if lib is None:
        sys.exit(f"native_ab: {status}")
    return lib


def with_library(lib, fn, *args):
    saved, native.LIBRARY = native.LIBRARY, lib
    try:
        return fn(*args)
    finally:
        native.LIBRARY = saved


def all_kernels(x, weight, bias, padding, grad_seed):
    out, code = native.conv_relu_pool_forward(x, weight, bias, padding)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    g = g.to(memory_format=memory_format_of(out))
    g[0, 0, 0, 0] = float("nan")
    g[-1, -1, -1, -1] = float("inf")
    gw, gb = native.conv_relu_pool_backward_weight(g, code, x, weight, padding)
    gx = native.conv_relu_pool_backward_input(g, code, x, weight, padding)
    return dict(out=out, code=code, grad_weight=gw, grad_bias=gb, grad_input=gx)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.stride() != b.stride():
        return False
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16}.get(a.dtype)
    return bool((a.view(view) == b.view(view)).all()) if view else bool((a == b).all())


def bitwise(baseline, candidate, quick: bool = False) -> int:
    """Runs the grid (``quick``: a sixth of it, every kernel size and dtype still); prints each difference;
    returns how many problems differed."""
    problems = differ = 0
    grid = itertools.product((3,) if quick else (1, 3), (1, 6, 9) if quick else (1, 3, 6, 8, 9, 16), (5, 12),
                             (12,) if quick else (7, 12), (1, 3, 5, 7), (0, 1, 3),
                             ("float32", "bfloat16", "bfloat16+fp32-params"), (False, True))
    for n, c_in, c_out, h, k, pad, dtype, channels_last in grid:
        w = h - 2  # odd widths next to even heights
        if pad > k // 2 or (h + 2 * pad - k + 1) // 2 < 1 or (w + 2 * pad - k + 1) // 2 < 1:
            continue
        gen = torch.Generator().manual_seed(problems)
        data_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
        param_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        x = torch.randn(n, c_in, h, w, generator=gen).to(data_dtype)
        x = x.to(memory_format=torch.channels_last) if channels_last else x
        weight = torch.randn(c_out, c_in, k, k, generator=gen).to(param_dtype)
        bias = torch.randn(c_out, generator=gen).to(param_dtype)
        a = with_library(baseline, all_kernels, x, weight, bias, pad, problems)
        b = with_library(candidate, all_kernels, x, weight, bias, pad, problems)
        wrong = [name for name in a if not same_bits(a[name], b[name])]
        if wrong:
            differ += 1
            print(f"DIFFERS n={n} C_in={c_in} C_out={c_out} {h}x{w} k={k} pad={pad} {dtype} "
                  f"{'channels-last' if channels_last else 'NCHW'}: {', '.join(wrong)}")
        problems += 1
    print(f"bitwise: {problems - differ} of {problems} problems the same in every output")
    return differ


def time_us(lib, fn, args, calls: int) -> float:
    def run():
        for _ in range(calls):
            fn(*args)
    with_library(lib, run)  # warm-up
    started = time.perf_counter()
    with_library(lib, run)
    return (time.perf_counter() - started) / calls * 1e6


def interleaved(baseline, candidate, fn, args, rounds: int, seconds: float) -> str:
    """``fn(*args)`` timed on each library in turn, ``rounds`` times, about ``seconds`` per timing: the table's
    columns (medians in us, their ratio, the range of the per-round ratios)."""
    calls = max(3, round(seconds / (time_us(baseline, fn, args, 3) * 1e-6)))
    a, b = [], []
    for _ in range(rounds):
        a.append(time_us(baseline, fn, args, calls))
        b.append(time_us(candidate, fn, args, calls))
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return (f"{statistics.median(a):9.1f} {statistics.median(b):9.1f} "
            f"{statistics.median(a) / statistics.median(b):5.2f}x {min(ratios):5.2f}-{max(ratios):.2f}x")


def speed(baseline, candidate, rounds: int, dtype: torch.dtype) -> None:
    print(f"\n{dtype} (float32 parameters with bf16 data, as autocast's fast preset runs), channels-last, "
          f"{torch.get_num_threads()} threads; median of {rounds} interleaved rounds, us per call")
    print(f"{'layer':>16} {'kernel':>16} {'baseline':>9} {'candidate':>9} {'ratio':>6} {'per round':>12}")
    for name, n, c_in, c_out, h, k, pad in LAYERS:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, c_in, h, h, generator=gen).to(dtype).to(memory_format=torch.channels_last)
        weight, bias = torch.randn(c_out, c_in, k, k, generator=gen), torch.randn(c_out, generator=gen)
        out, code = with_library(baseline, native.conv_relu_pool_forward, x, weight, bias, pad)
        g = torch.randn(out.shape, generator=gen).to(dtype).to(memory_format=torch.channels_last)
        kernels = {"forward": (native.conv_relu_pool_forward, (x, weight, bias, pad)),
                   "grad_weight": (native.conv_relu_pool_backward_weight, (g, code, x, weight, pad))}
        if name not in FIRST_LAYERS:
            kernels["grad_input"] = (native.conv_relu_pool_backward_input, (g, code, x, weight, pad))
        for kernel, (fn, args) in kernels.items():
            print(f"{name:>16} {kernel:>16} {interleaved(baseline, candidate, fn, args, rounds, 0.02)}")


def training_steps(batch_scale: float = 1.0):
    """(name, one training step) for the two models ``--steps`` times; ``batch_scale`` shrinks the batches (tests)."""
    import torch.nn.functional as F

    import fastcnn
    from fastcnn.lean_adam import LeanFusedAdam
    from fastcnn.models import LeNet

    sys.path.insert(0, str(REPO / "bench"))
    from accelerate_step import UserCNN

    def make(model, optimizer, images, amp):
        labels = torch.randint(0, 10, (images.shape[0],), generator=torch.Generator().manual_seed(1))

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    lenet_batch, user_batch = max(1, round(100 * batch_scale)), max(1, round(64 * batch_scale))
    with torch.random.fork_rng():  # the caller's random state stays as it was
        torch.manual_seed(0)
        lenet = LeNet().to(memory_format=torch.channels_last)
        user = fastcnn.accelerate(UserCNN())
        return [
            (f"LeNet fast step, batch {lenet_batch}", make(lenet, LeanFusedAdam(lenet.parameters(), lr=1e-3),
             torch.randn(lenet_batch, 1, 28, 28).to(memory_format=torch.channels_last), True)),
            (f"user CNN accelerated, batch {user_batch}", make(user, torch.optim.Adam(user.parameters(), lr=1e-3),
             torch.randn(user_batch, 3, 48, 48), False)),
        ]


def step_speed(baseline, candidate, rounds: int, batch_scale: float = 1.0) -> None:
    print(f"\nwhole training steps, {torch.get_num_threads()} threads; median of {rounds} interleaved rounds, "
          "us per step")
    print(f"{'step':>34} {'baseline':>9} {'candidate':>9} {'ratio':>6} {'per round':>12}")
    for name, step in training_steps(batch_scale):
        print(f"{name:>34} {interleaved(baseline, candidate, step, (), rounds, 0.2)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="HEAD", metavar="REV", help="git revision of the C source (HEAD)")
    parser.add_argument("--baseline-lib", type=pathlib.Path, metavar="PATH", help="a built .so instead of REV")
    parser.add_argument("--candidate", default="worktree", metavar="REV",
                        help="git revision of the C source, or worktree (default: the working tree's file)")
    parser.add_argument("--candidate-lib", type=pathlib.Path, metavar="PATH", help="a built .so instead of REV")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-speed", action="store_true", help="the bitwise check only")
    parser.add_argument("--quick", action="store_true", help="a sixth of the bitwise grid")
    parser.add_argument("--steps", action="store_true", help="whole training steps too (about a minute)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        built = {}
        for role, rev, lib in (("baseline", args.baseline, args.baseline_lib),
                               ("candidate", args.candidate, args.candidate_lib)):
            where = f"{SOURCE} at {rev}"
            built[role] = load(lib) if lib else load(build(source_at(rev), pathlib.Path(tmp) / role, where))
            print(f"{role}: {lib or where}")
        baseline, candidate = built["baseline"], built["candidate"]
        differ = bitwise(baseline, candidate, args.quick)
        if not args.no_speed:
            speed(baseline, candidate, args.rounds, torch.bfloat16)
            if args.steps:
                step_speed(baseline, candidate, args.rounds)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

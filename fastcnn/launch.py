"""``fastcnn train --nproc N``: the run under torchrun, N processes on this machine.

``launch`` checks everything that can be checked once, then this process becomes torchrun (exec), so that Ctrl-C
and SIGTERM reach torchrun, which passes them on to the workers. ``python -m fastcnn.launch`` is what it execs:
torchrun, exiting like one fastcnn process would (``run_torchrun``).
"""

from __future__ import annotations

import os
import sys

import torch
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from fastcnn.config import TrainConfig
from fastcnn.distributed import per_rank_batch_size
from fastcnn.errors import UsageError
from fastcnn.run_plan import preflight


def launch(nproc: int, argv: list[str], cfg: TrainConfig) -> int:
    """Run ``fastcnn <argv>`` under torchrun with ``nproc`` processes on this machine.

    Everything that can be checked once (arguments, dataset, output folder, GPU count) is checked here first, so
    that a mistake is one line rather than one per process. Its exit status is the workers' (see
    ``run_torchrun``).
    """
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    if cfg.runs > 1:
        raise UsageError("--runs and --nproc do not combine; run the data-parallel runs one by one")
    rc = preflight(cfg).rc
    if rc.device == "cuda" and nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc {nproc} needs {nproc} GPUs but {torch.cuda.device_count()} are visible; one "
                         "process per GPU")
    per_rank_batch_size(rc.batch_size, nproc)
    command = [sys.executable, "-m", "fastcnn.launch", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "fastcnn", *argv]
    print("fastcnn: running " + " ".join(command[1:]), file=sys.stderr, flush=True)
    os.execv(sys.executable, command)
    return 1  # not reached


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without its --nproc option (so the launched processes do not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def run_torchrun(args: list[str]) -> int:
    """torchrun (``python -m torch.distributed.run``) with ``args``, exiting like one fastcnn process would.

    torchrun itself exits 1, with a traceback, whenever a worker fails or it is signalled. Here the status is the
    first failed worker's: 130/143 when the run was interrupted (the workers agreed to stop and rank 0 saved a
    checkpoint), 1 when it diverged, 2 for a usage error, 128+N when a worker was killed by signal N; and
    128+N when torchrun itself got signal N (it passed it on to the workers and waited for them).
    """
    try:
        run(parse_args(args))
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        if failure.exitcode >= 0:
            return failure.exitcode or 1
        print(f"fastcnn: error: rank {rank} was killed by {failure.signal_name()}", file=sys.stderr)
        return 128 - failure.exitcode
    except SignalException as signalled:
        return 128 + int(signalled.sigval)
    return 0


if __name__ == "__main__":  # what ``launch`` execs
    sys.exit(run_torchrun(sys.argv[1:]))

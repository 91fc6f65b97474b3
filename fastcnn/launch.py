"""``fastcnn train --nproc N``: the run under torchrun, N processes on this machine.

``launch`` checks everything that can be checked once, then this process becomes torchrun (exec), so that Ctrl-C
and SIGTERM reach torchrun, which passes them on to the workers. ``python -m fastcnn.launch`` is what it execs:
torchrun, exiting like one fastcnn process would (``run_torchrun``). Quietly: torchrun's banner about
OMP_NUM_THREADS and its own warnings stay out of the output unless ``verbose``, and the workers' summary.json
records the command the user typed (with its --nproc). A resumed run keeps the process count it was trained
with (``keep_processes``).
"""

from __future__ import annotations

import logging
import os
import sys

import torch
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from fastcnn.config import TrainConfig
from fastcnn.distributed import per_rank_batch_size
from fastcnn.errors import UsageError
from fastcnn.run_plan import RunPlan, preflight

COMMAND_ENV = "FASTCNN_COMMAND"  # the launcher's command line, for the summary.json the workers write


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
    exec_torchrun(nproc, argv, command=" ".join([sys.argv[0], *argv[:1], "--nproc", str(nproc), *argv[1:]]),
                  verbose=cfg.verbose)
    return 1  # not reached


def exec_torchrun(nproc: int, argv: list[str], *, command: str, verbose: bool = False) -> None:
    """Become torchrun running ``fastcnn <argv>`` in ``nproc`` processes (never returns)."""
    env = worker_environment(nproc, os.environ, command=command, verbose=verbose)
    torchrun = [sys.executable, "-m", "fastcnn.launch", "--standalone", f"--nproc-per-node={nproc}", "-m", "fastcnn",
                *argv]
    if verbose:
        print(f"fastcnn: running OMP_NUM_THREADS={env['OMP_NUM_THREADS']} " + " ".join(torchrun[1:]),
              file=sys.stderr, flush=True)
    os.execve(sys.executable, torchrun, env)


def worker_environment(nproc: int, environ, *, command: str, verbose: bool = False) -> dict[str, str]:
    """The environment torchrun and its workers get. OMP_NUM_THREADS is set to each process's share of the
    threads torch would use here (torchrun prints a banner when it has to choose it, and chooses 1), unless the
    user set it. torchrun's own log lines (a worker told to stop, a worker's exit status: fastcnn says what
    happened in its own words) are held back unless ``verbose`` or the user set LOGLEVEL, torchrun's variable."""
    env = dict(environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, torch.get_num_threads() // nproc)))
    if not verbose:
        env.setdefault("LOGLEVEL", "CRITICAL")
    env[COMMAND_ENV] = command
    return env


def processes_for_resume(saved: int | None, device: str, visible_gpus: int) -> tuple[int | None, str | None]:
    """How many processes a resumed run continues with when --nproc is not given: the count it was trained with
    (``saved``; None: it was one plain process), or None and why it cannot be."""
    if not saved:
        return None, None
    if device == "cuda" and saved > visible_gpus:
        return None, (f"the run was trained with {saved} processes, one per GPU, but {visible_gpus} GPU"
                      f"{'s are' if visible_gpus != 1 else ' is'} visible: it continues as one process (the global "
                      f"batch stays the same); pass --nproc N to choose")
    return saved, None


def resume_argv(cfg: TrainConfig) -> list[str]:
    """``fastcnn train`` arguments that resume ``cfg.resume`` as ``cfg`` asks (what a resume may change)."""
    argv = ["train", "--resume", cfg.resume]
    if cfg.epochs is not None:
        argv += ["--epochs", str(cfg.epochs)]
    if cfg.data_dir is not None:
        argv += ["--data-dir", cfg.data_dir]
    if cfg.output is not None:
        argv += ["--output", cfg.output]
    argv += [flag for flag, on in (("--overwrite", cfg.overwrite), ("--no-progress", not cfg.progress),
                                   ("--deterministic", cfg.deterministic), ("--verbose", cfg.verbose)) if on]
    return argv


def keep_processes(plan: RunPlan) -> None:
    """A resume in one plain process (no --nproc) of a run that several processes trained: exec torchrun with as
    many (never returns), or say why it goes on as one process."""
    nproc, why_not = processes_for_resume(plan.resume_state.get("nproc"), plan.rc.device, torch.cuda.device_count())
    if why_not:
        print(f"fastcnn: note: {why_not}", file=sys.stderr, flush=True)
    if nproc:
        argv = resume_argv(plan.cfg)
        exec_torchrun(nproc, argv, command=" ".join([sys.argv[0], *argv]), verbose=plan.cfg.verbose)


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
    if os.environ.get("LOGLEVEL"):  # torchrun reads it for some of its loggers; its worker supervisor's too, here
        logging.getLogger("torch.distributed.elastic").setLevel(os.environ["LOGLEVEL"])
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

"""The ``fastcnn`` command: ``train``, ``bench``, ``eval``, ``predict`` and ``env``.

Errors the user can fix print one line, ``fastcnn: error: ...``, on stderr and exit 2 for bad arguments, 1 for
other failures (130/143 when interrupted); ``--debug`` shows the traceback instead. A reader that goes away
(``fastcnn ... | head``) ends the command quietly with status 141, as SIGPIPE ends a C tool.

This module and the parser (``fastcnn.cli_parser``) import no torch, so that ``--help`` and ``--version`` answer at
once: each command imports what it runs when it runs (the lazy imports below are there for that reason).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from fastcnn.cli_parser import build_parser
from fastcnn.errors import FastcnnError

UNEXPECTED_ERROR_CHARS = 300  # an unexpected exception's message is shortened to about this, at a word boundary
SIGPIPE_STATUS = 128 + 13  # what a shell reports for a command ended by SIGPIPE
CUDA_HOME_NOTICE = "No CUDA runtime is found"


def train_config(args: argparse.Namespace):
    """The TrainConfig the parsed flags ask for (every flag that names one of its fields)."""
    from fastcnn.config import TrainConfig  # torch-free start: config imports torch

    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{name: value for name, value in vars(args).items() if name in fields})


class _DropCudaHomeNotice(logging.Filter):
    """torch.utils.cpp_extension warns "No CUDA runtime is found, using CUDA_HOME=..." whenever a CUDA build of
    torch compiles on a machine without a GPU (every torch.compile run on a CPU): true, and nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(CUDA_HOME_NOTICE)


def silence_cuda_home_notice() -> None:
    """Drop exactly that one warning, at its own logger (any other message of that logger still shows)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropCudaHomeNotice) for f in logger.filters):
        logger.addFilter(_DropCudaHomeNotice())


def shorten(text: str, limit: int = UNEXPECTED_ERROR_CHARS) -> str:
    """``text`` on one line, cut (with " ...") after the last whole word that fits in ``limit`` characters."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit + 1)
    return text[:cut if cut > 0 else limit].rstrip(" ,;:") + " ..."


def run_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Run the parsed command; its modules are imported here, as it runs (they import torch)."""
    if args.command == "train":
        from fastcnn.train import run_training  # torch-free start

        if args.nproc is not None and "TORCHELASTIC_RUN_ID" not in os.environ:  # not already under torchrun
            from fastcnn.launch import launch, strip_nproc  # torch-free start

            return launch(args.nproc, strip_nproc(list(sys.argv[1:] if argv is None else argv)), train_config(args))
        run_training(train_config(args))
    elif args.command == "bench":
        if args.race:
            from fastcnn.race import run_race_command  # torch-free start

            run_race_command(args, train_config(args))
        else:
            from fastcnn.bench import run_bench_command  # torch-free start

            run_bench_command(args, train_config(args))
    elif args.command == "eval":
        from fastcnn.evaluate import run_command as run_eval  # torch-free start

        return run_eval(args)
    elif args.command == "predict":
        from fastcnn.predict import run_command as run_predict  # torch-free start

        return run_predict(args)
    elif args.command == "env":
        from fastcnn.env_report import collect, format_report  # torch-free start

        info = collect()
        print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else 2
    try:
        return run_command(args, argv)
    except FastcnnError as err:
        if args.debug:
            raise
        if not getattr(err, "quiet", False):  # quiet: another process (rank 0) reports the same error
            print(f"fastcnn: error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("fastcnn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # the reader of stdout went away: main ends quietly
    except Exception as err:
        from fastcnn.stopping import Interrupted  # torch-free start

        if isinstance(err, Interrupted):
            return err.exit_code
        if args.debug:
            raise
        print(f"fastcnn: error: {type(err).__name__}: {shorten(str(err))} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    silence_cuda_home_notice()
    try:
        code = run(argv)
        sys.stdout.flush()  # a closed pipe shows here, where it can be handled, rather than at exit
        return code
    except BrokenPipeError:
        # Python's own flush at exit would fail again and print "Exception ignored": point stdout at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return SIGPIPE_STATUS


if __name__ == "__main__":
    sys.exit(main())

"""A run's output folder: where it goes by default, when writing into it would lose a run, and which files in
it belong to a run (so that ``--overwrite`` replaces those and nothing else)."""

from __future__ import annotations

import datetime
import pathlib

from fastcnn.errors import UsageError

RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoint.pt", "curves.png")  # what `fastcnn train` writes


def default_output_dir(model: str) -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = pathlib.Path("runs") / f"{stamp}-{model}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = pathlib.Path("runs") / f"{stamp}-{model}-{suffix}"
    return path


def check_output_dir(output: pathlib.Path, *, overwrite: bool, resume: pathlib.Path | None) -> None:
    """Refuse to write over a finished or started run unless asked to (nothing saved before is lost)."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} exists and is not a directory; choose another --output")
    existing = [name for name in RUN_FILES if (output / name).exists()]
    if not existing or overwrite:
        return
    if resume is not None and resume.resolve().parent == output.resolve():
        return
    raise UsageError(f"--output {output} already holds a run ({', '.join(existing)}); pass --overwrite to "
                     f"replace it, --resume {output / 'checkpoint.pt'} to continue it, or another --output")


def remove_run_outputs(output: pathlib.Path) -> None:
    """Delete the files of the run that ``--overwrite`` replaces."""
    for name in RUN_FILES:
        (output / name).unlink(missing_ok=True)

"""A run's output folder: where it goes by default, when writing into it would lose a run, and which files in
it belong to a run (so that ``--overwrite`` replaces those and nothing else)."""

from __future__ import annotations

import contextlib
import datetime
import pathlib
import re

from fastcnn.errors import UsageError

RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoint.pt", "curves.png")  # what `fastcnn train` writes
EVAL_FILES = ("eval.json", "confusion.png")  # what `fastcnn eval` writes beside a run's checkpoint
REPEATED_RUN = re.compile(r"run[0-9]+")  # --runs N: <output>/run1 .. runN, each a run folder of its own


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


def run_outputs(output: pathlib.Path) -> list[pathlib.Path]:
    """The files in ``output`` that belong to the run there: what train and eval wrote (and the temporary files of
    a write that was killed before its rename), in it and in the run1..runN folders of a repeated run. Nothing
    else: a user's own files beside them are not a run's."""
    if not output.is_dir():
        return []
    names = (*RUN_FILES, *EVAL_FILES)
    found = [output / name for name in names if (output / name).is_file()]
    found += [path for name in names for path in output.glob(f".{name}.*.tmp") if path.is_file()]  # atomic_write_*
    for folder in sorted(output.iterdir()):
        if folder.is_dir() and REPEATED_RUN.fullmatch(folder.name) and any((folder / n).exists() for n in RUN_FILES):
            found += run_outputs(folder)
    return found


def remove_run_outputs(output: pathlib.Path) -> None:
    """``--overwrite``: delete the run that ``output`` holds (``run_outputs``), and a repeated run's run1..runN
    folders once they are empty; a user's own files stay."""
    outputs = run_outputs(output)
    for path in outputs:
        path.unlink(missing_ok=True)
    for folder in sorted({path.parent for path in outputs} - {output}):
        with contextlib.suppress(OSError):  # not empty: it holds something of the user's
            folder.rmdir()

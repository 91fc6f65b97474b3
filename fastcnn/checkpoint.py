"""Checkpoints: written atomically (temporary file, then rename) and read with ``weights_only=True`` only,
so a checkpoint can never run code on load, and an interrupted write never leaves a broken file behind; what a
run's checkpoint holds (``RunRecord``, ``trainer_state``) and how a resumed run gets it back."""

from __future__ import annotations

import os
import pathlib
import tempfile
from dataclasses import dataclass, field

import torch

from fastcnn.engine import Trainer
from fastcnn.errors import FastcnnError, UsageError

FORMAT = "fastcnn-checkpoint-v1"


def atomic_write_bytes(path: pathlib.Path, writer) -> None:
    """Call ``writer(file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results should read like any other file
        with os.fdopen(fd, "wb") as file:
            writer(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    atomic_write_bytes(path, lambda file: file.write(text.encode()))


def save_checkpoint(path: pathlib.Path, state: dict) -> None:
    atomic_write_bytes(path, lambda file: torch.save({"format": FORMAT, **state}, file))


CHECKPOINT_NAME = "checkpoint.pt"  # what a run folder holds
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive; a file that starts so but fails to load is damaged


def checkpoint_file(path: str | os.PathLike) -> pathlib.Path:
    """The checkpoint a user means by ``path``: the file itself, or a run folder's checkpoint.pt (``fastcnn eval
    runs/e1``). Raises FastcnnError, in one line that says what to pass instead, when there is none."""
    path = pathlib.Path(path)
    if path.is_dir():
        inside = path / CHECKPOINT_NAME
        if inside.is_file():
            return inside
        runs = sorted(child.parent for child in path.glob(f"run*/{CHECKPOINT_NAME}"))
        if runs:  # a --runs N folder: one run per subfolder
            names = ", ".join(str(run) for run in runs[:3])
            raise FastcnnError(f"cannot read checkpoint: folder {path} holds repeated runs, not one; pass one of "
                               f"them ({names}{', ...' if len(runs) > 3 else ''})")
        raise FastcnnError(f"cannot read checkpoint: folder {path} holds no {CHECKPOINT_NAME}; pass the run folder "
                           f"of a `fastcnn train` run (finished or interrupted), or its {CHECKPOINT_NAME}")
    if not path.exists():
        raise FastcnnError(f"cannot read checkpoint {path}: no such file or folder; pass a {CHECKPOINT_NAME} written "
                           "by `fastcnn train`, or its run folder")
    if not path.is_file():
        raise FastcnnError(f"cannot read checkpoint {path}: not a regular file; pass a {CHECKPOINT_NAME} written by "
                           "`fastcnn train`, or its run folder")
    return path


def load_checkpoint(path: str | os.PathLike, *, model_name: str | None = None) -> dict:
    """Read a fastcnn checkpoint safely from a checkpoint file or a run folder (``checkpoint_file``): every reader
    (``train --resume``, ``eval``, ``predict``) goes through here. Raises FastcnnError with a one-line reason and
    what to do when it cannot be used: no checkpoint there, an empty, truncated or damaged file, a file of another
    program, or one holding pickled Python objects."""
    path = checkpoint_file(path)
    try:
        with open(path, "rb") as file:
            head = file.read(len(ZIP_MAGIC))
    except PermissionError:
        raise FastcnnError(f"cannot read checkpoint {path}: permission denied; make it readable, or copy it "
                           "somewhere you can read it") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise FastcnnError(_unreadable(path, head, err)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise FastcnnError(f"cannot use checkpoint {path}: it was not written by fastcnn train "
                           f"(expected format {FORMAT}); pass a {CHECKPOINT_NAME} from a `fastcnn train` run")
    if model_name is not None and state.get("model_name") != model_name:
        raise FastcnnError(f"checkpoint {path} holds model {state.get('model_name')!r}, not {model_name!r}; "
                           f"pass --model {state.get('model_name')} or another checkpoint")
    return state


def _unreadable(path: pathlib.Path, head: bytes, err: Exception) -> str:
    """Why torch could not load ``path``, as one whole sentence of ours (torch's own messages run over several
    lines of internals)."""
    reason = " ".join(str(err).split())
    # torch names the class a pickled object needs ("Unsupported global: GLOBAL module.Class"); other
    # weights_only failures ("Unsupported operand", truncated streams) are plain unreadable files.
    if "Unsupported global" in reason or "GLOBAL " in reason:
        return (f"refusing checkpoint {path}: it holds pickled Python objects, which could run code when loaded; "
                "only checkpoints written by fastcnn are accepted")
    if not head:
        return (f"cannot read checkpoint {path}: the file is empty (a copy or a save that did not finish); copy it "
                "again, or train again")
    if head == ZIP_MAGIC:
        return (f"cannot read checkpoint {path}: not a readable torch checkpoint: the file is truncated or damaged "
                "(a copy or a save that did not finish); copy it again, or train again")
    return (f"cannot read checkpoint {path}: not a readable torch checkpoint (this file is no torch.save archive); "
            f"pass a {CHECKPOINT_NAME} written by `fastcnn train`")


@dataclass
class RunRecord:
    """What a run has done so far, as its checkpoints record it beside the weights: the finished epochs' rows
    (``history``), every test evaluation (``evals``), the training loss within epochs (``step_losses``:
    fastcnn.train.StepLosses), the training and evaluation clocks, and where a stopped run stopped (``epoch``
    epochs finished, ``batch`` batches into the next, with that epoch's sums in ``partial``)."""

    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    epoch: int = 0
    batch: int = 0
    partial: dict | None = None  # EpochProgress.to_dict() of the epoch a stop cut
    step_losses: list[dict] = field(default_factory=list)  # {"epoch": fractional epoch, "train_loss": ...}

    def to_state(self) -> dict:
        return dict(history=self.history, evals=self.evals, train_seconds=self.train_seconds,
                    eval_seconds=self.eval_seconds, epoch=self.epoch, batch=self.batch, partial=self.partial,
                    step_losses=self.step_losses)

    @classmethod
    def from_state(cls, state: dict) -> RunRecord:
        history = list(state["history"])
        # A checkpoint written before step losses were recorded: its epochs' mean losses are its curve (a row each).
        step_losses = state.get("step_losses", [dict(epoch=row["epoch"], train_loss=row["train_loss"])
                                                for row in history])
        return cls(history=history, evals=list(state.get("evals", [])), train_seconds=state["train_seconds"],
                   eval_seconds=state.get("eval_seconds", 0.0), epoch=state["epoch"], batch=state["batch"],
                   partial=state.get("partial"), step_losses=list(step_losses))


def trainer_state(trainer: Trainer) -> dict:
    """The trainer's part of a checkpoint: weights, optimizer, loss scaler and schedule."""
    return dict(model=trainer.model.state_dict(), optimizer=trainer.optimizer.state_dict(),
                scaler=trainer.scaler.state_dict() if trainer.scaler is not None else None,
                scheduler=trainer.scheduler.state_dict() if trainer.scheduler is not None else None)


def restore_trainer(trainer: Trainer, state: dict, *, schedule: str, total_steps: int, checkpoint: str) -> None:
    """Put ``trainer`` back where checkpoint ``state`` left it. A schedule cannot be stretched mid-run: one saved
    over another number of steps than this run's ``total_steps`` is refused."""
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scaler is not None and state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    if trainer.cuda_graph:  # the checkpoint's lr tensor was loaded on the CPU: a graph needs it on the GPU
        for group in trainer.optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=trainer.device)
    if trainer.scheduler is not None and state.get("scheduler"):
        saved_steps = state["scheduler"].get("total_steps")
        if saved_steps is not None and saved_steps != total_steps:
            raise UsageError(f"checkpoint {checkpoint} follows a {schedule} schedule over {saved_steps} steps; "
                             f"this resume would need {total_steps} (another --epochs or dataset); a schedule "
                             "cannot be stretched mid-run: resume with the same --epochs and data")
        trainer.scheduler.load_state_dict(state["scheduler"])


def capture_rng() -> dict:
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Checkpoints: written atomically (temporary file, then rename) and read with ``weights_only=True`` only,
so a checkpoint can never run code on load, and an interrupted write never leaves a broken file behind."""

from __future__ import annotations

import os
import pathlib
import tempfile

import torch

from fastcnn.errors import FastcnnError

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


def load_checkpoint(path: str | os.PathLike, *, model_name: str | None = None) -> dict:
    """Read a fastcnn checkpoint safely. Raises FastcnnError with a one-line reason when it cannot be used."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FastcnnError(f"cannot read checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = " ".join(str(err).split())
        # torch names the class a pickled object needs ("Unsupported global: GLOBAL module.Class"); other
        # weights_only failures ("Unsupported operand", truncated streams) are plain unreadable files.
        if "Unsupported global" in reason or "GLOBAL " in reason:
            raise FastcnnError(f"refusing checkpoint {path}: it holds pickled Python objects, which could run "
                               "code when loaded; only checkpoints written by fastcnn are accepted") from None
        raise FastcnnError(f"cannot read checkpoint {path}: not a readable torch checkpoint "
                           f"({reason[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise FastcnnError(f"cannot use checkpoint {path}: it was not written by fastcnn train "
                           f"(expected format {FORMAT})")
    if model_name is not None and state.get("model_name") != model_name:
        raise FastcnnError(f"checkpoint {path} holds model {state.get('model_name')!r}, not {model_name!r}; "
                           f"pass --model {state.get('model_name')} or another checkpoint")
    return state

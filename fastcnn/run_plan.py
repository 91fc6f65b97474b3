"""A run, checked before anything is written: its configuration (asked for, or a checkpoint's), its data, its
output folder. Every check that can fail runs here, before the output folder is created or touched, so that a
mistake costs one line and loses nothing; a launcher of several processes runs the same checks once
(``preflight``) instead of once per process."""

from __future__ import annotations

import dataclasses
import pathlib

from fastcnn.build import fit_to_data, load_splits
from fastcnn.checkpoint import checkpoint_file, load_checkpoint
from fastcnn.config import ResolvedConfig, TrainConfig, config_for_resume, resolve
from fastcnn.data import ImageDataset
from fastcnn.errors import UsageError
from fastcnn.models import check_input_shape
from fastcnn.run_folder import check_output_dir, default_output_dir


@dataclasses.dataclass(frozen=True)
class RunPlan:
    cfg: TrainConfig  # as asked, with --resume naming the checkpoint file itself
    rc: ResolvedConfig  # what runs, fitted to the loaded data (its shape and, where it decides, its statistics)
    train_set: ImageDataset
    test_set: ImageDataset
    output: pathlib.Path
    resume_state: dict | None  # the checkpoint a resumed run continues from


def plan_run(cfg: TrainConfig, datasets: tuple[ImageDataset, ImageDataset] | None = None, *,
             several_processes: bool = False) -> RunPlan:
    """Check and prepare one run of ``cfg``; ``datasets``: the (train, test) splits when the caller already
    loaded them."""
    if several_processes and not cfg.output and not cfg.resume:
        raise UsageError("with several processes, give --output so that every rank agrees on the run folder")
    resume_state = None
    if cfg.resume:
        cfg = dataclasses.replace(cfg, resume=str(checkpoint_file(cfg.resume)))  # a run folder: its checkpoint
        resume_state = load_checkpoint(cfg.resume, model_name=cfg.model)
        rc = config_for_resume(resume_state, cfg, cfg.resume)
    else:
        rc = resolve(cfg)
    train_set, test_set = datasets or load_splits(rc)
    rc = fit_to_data(rc, train_set)
    check_input_shape(rc.model, train_set.image_shape)  # before anything is printed or written
    resume = pathlib.Path(cfg.resume) if cfg.resume else None
    output = pathlib.Path(cfg.output) if cfg.output else (resume.parent if resume else default_output_dir(rc.model))
    check_output_dir(output, overwrite=cfg.overwrite, resume=resume)
    return RunPlan(cfg, rc, train_set, test_set, output, resume_state)


def preflight(cfg: TrainConfig) -> RunPlan:
    """Every check of a run that can fail before training (arguments, checkpoint, dataset, output folder), for a
    launcher that starts several processes: it fails once, in one line, instead of once per process."""
    return plan_run(cfg, several_processes=True)

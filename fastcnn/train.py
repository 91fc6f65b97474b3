"""``fastcnn train``: one training run from a TrainConfig, with its outputs; or ``--runs N`` of them.

Order matters for "nothing lost": every check that can fail (arguments, checkpoint, dataset, output folder)
runs before the output folder is created or touched (fastcnn.run_plan); files in it are replaced atomically; a run
that fails before finishing an epoch removes the folder it created; Ctrl-C / SIGTERM stop at a step boundary and
write a checkpoint from which ``--resume`` continues exactly. With several processes, the ranks agree on stopping
and on divergence (fastcnn.stopping), so that all of them stop at the same step.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import os
import pathlib
import shutil
import sys
import time

import torch
from tqdm import tqdm

from fastcnn.build import build_trainer, fit_to_data, load_splits, pay_one_time_costs
from fastcnn.checkpoint import RunRecord, capture_rng, restore_rng, restore_trainer, save_checkpoint, trainer_state
from fastcnn.config import TrainConfig, resolve
from fastcnn.determinism import deterministic_algorithms
from fastcnn.distributed import DistributedContext, global_progress, global_stats, launched_by_torchrun
from fastcnn.engine import EpochProgress, check_finite
from fastcnn.env import device_name, git_commit, versions
from fastcnn.errors import NotAvailableError, TrainingDivergedError, UsageError
from fastcnn.fault_injection import install_test_fault
from fastcnn.kernel_choice import choices_from_state, choices_to_state, measured_where
from fastcnn.launch import COMMAND_ENV, keep_processes
from fastcnn.models import check_input_shape
from fastcnn.report import plot_curves, write_json, write_metrics
from fastcnn.run_folder import check_output_dir, default_output_dir, remove_run_outputs
from fastcnn.run_log import EpochLog, describe_resume, print_opening, print_summary, progress_bar
from fastcnn.run_plan import RunPlan, plan_run
from fastcnn.runs import aggregate_runs, print_repeated_log
from fastcnn.stopping import Interrupted, StopAgreement, StopRequests


def run_training(cfg: TrainConfig, *, stream=None, datasets=None) -> dict:
    """Train as ``cfg`` says; return the summary (also written to <output>/summary.json).
    ``datasets``: the (train, test) ImageDatasets when the caller already loaded them."""
    if cfg.runs > 1:
        return run_repeated(cfg, stream=stream)
    with deterministic_algorithms(cfg.deterministic):
        started = time.perf_counter()
        plan = plan_run(cfg, datasets, several_processes=int(os.environ.get("WORLD_SIZE", "1")) > 1)
        if plan.resume_state is not None and not launched_by_torchrun():
            keep_processes(plan)  # a run trained by several processes goes on with as many (exec), or says why not
        ctx = DistributedContext.from_env(plan.rc.torch_device.type, cuda_graph=plan.rc.cuda_graph)
        try:
            return TrainingRun(plan, ctx, stream or sys.stdout).run(started)
        finally:
            ctx.shutdown()


class TrainingRun:
    """One run from its plan to its summary: set up (trainer, resumed state, warm-up), train epoch by epoch with a
    checkpoint after each, finish (summary.json, curves.png, the printed summary). Only rank 0 writes and prints."""

    def __init__(self, plan: RunPlan, ctx: DistributedContext, stream):
        self.plan, self.rc, self.ctx, self.stream = plan, plan.rc, ctx, stream
        self.main = ctx.is_main
        self.output = plan.output
        self.checkpoint_path = plan.output / "checkpoint.pt"
        self.record = RunRecord()
        self.partial: EpochProgress | None = None  # the sums of the epoch a resumed run continues
        self.kernels_measured_where = measured_where(self.rc.torch_device)  # once: every checkpoint records it
        self.setup_seconds = self.warmup_seconds = 0.0
        self.epoch_log = EpochLog(stream)

    def run(self, started: float) -> dict:
        self.set_up()
        self.setup_seconds = time.perf_counter() - started
        created = self.open_output()
        try:
            self.train_epochs()
        except Interrupted as stop_request:
            if self.main:
                print(f"fastcnn: interrupted by {stop_request}; checkpoint saved to {self.checkpoint_path}; continue "
                      f"with `fastcnn train --resume {self.checkpoint_path}`", file=sys.stderr)
            # Every rank stopped here together. The others exit once rank 0 has written and said so: torchrun stops
            # the remaining workers as soon as one exits.
            self.ctx.barrier()
            raise
        except Exception as failure:
            if created and not self.record.history:
                shutil.rmtree(self.output, ignore_errors=True)  # nothing worth keeping: leave no half-made run
            if isinstance(failure, TrainingDivergedError):
                raise self.diverged(failure) from None
            raise
        return self.finish()

    def set_up(self) -> None:
        """Everything before the first step: trainer, the resumed state, warm-up (untimed)."""
        rc, ctx = self.rc, self.ctx
        if ctx.enabled and rc.cuda_graph and ctx.backend == "nccl" and tuple(torch.cuda.nccl.version()[:3]) < (2, 9, 6):
            raise NotAvailableError(f"--cuda-graph with several processes needs NCCL 2.9.6 or later to capture the "
                                    f"gradient all-reduces; this PyTorch has NCCL {torch.cuda.nccl.version()}; drop "
                                    "--cuda-graph or --nproc")
        if self.main:  # under --runs, each run's stream is discarded: run_repeated says it once
            print_opening(rc, self.plan.train_set, self.plan.test_set, self.output, self.stream)
        self.trainer, self.train_loader, self.test_loader = build_trainer(
            rc, self.plan.train_set, self.plan.test_set, rank=ctx.rank, world_size=ctx.world_size,
            distributed=ctx.enabled)
        if self.main and self.plan.resume_state is not None:
            print(describe_resume(self.plan.cfg.resume, self.plan.resume_state, rc, len(self.train_loader),
                                  ctx.world_size if ctx.enabled else 1), file=self.stream, flush=True)
        known_kernels = self.resume(self.plan.resume_state) if self.plan.resume_state is not None else []
        self.warmup_seconds = pay_one_time_costs(rc, self.trainer, self.train_loader, self.test_loader, ctx,
                                                 known_kernels)
        install_test_fault(self.trainer, ctx.rank)

    def resume(self, state: dict) -> list:
        """Put trainer, record and RNG back where the checkpoint left them; return its kernel choices."""
        restore_trainer(self.trainer, state, schedule=self.rc.schedule,
                        total_steps=self.rc.epochs * len(self.train_loader), checkpoint=self.plan.cfg.resume)
        self.record = RunRecord.from_state(state)
        if self.record.partial:
            partial = EpochProgress.from_dict(self.record.partial, self.rc.torch_device)
            if not self.main:  # its sums are those of all ranks (see train_epoch's stop): counted once, by rank 0
                partial = EpochProgress(partial.loss_sum * 0, partial.correct * 0, 0, partial.seconds, partial.batches)
            self.partial = partial
        restore_rng(state["rng"])
        return choices_from_state(state.get("kernel_choices"), self.kernels_measured_where)

    def open_output(self) -> bool:
        """Create the run folder (rank 0); with --overwrite, remove the run it replaces. Whether it was created."""
        created = self.main and not self.output.exists()
        if self.main:
            self.output.mkdir(parents=True, exist_ok=True)
            if self.plan.cfg.overwrite and self.plan.resume_state is None:
                remove_run_outputs(self.output)
        return created

    def train_epochs(self) -> None:
        steps, first_epoch = len(self.train_loader), self.record.epoch
        step_losses = StepLosses(self.record.step_losses, steps)
        bar = progress_bar(self.rc.epochs * steps, first_epoch * steps + self.record.batch,
                           enabled=self.plan.cfg.progress and self.main)
        started = time.perf_counter()
        try:
            with StopRequests() as stop:
                agreement = StopAgreement(stop, self.ctx, self.rc.torch_device, steps)
                for epoch in range(first_epoch, self.rc.epochs):
                    self.train_epoch(epoch, agreement, step_losses, bar)
                    left = self.rc.epochs - epoch - 1
                    if self.main:  # the run's time left, at this process's pace so far (evaluation included)
                        eta = (time.perf_counter() - started) / (epoch + 1 - first_epoch) * left if left else None
                        self.epoch_log.epoch_done(self.record.history[-1], eta, bar)
                    if left:  # after the last epoch, finish the run: summary and curves
                        agreement.now()
        finally:
            bar.close()

    def train_epoch(self, epoch: int, agreement: StopAgreement, step_losses: StepLosses, bar: tqdm) -> None:
        """One epoch (or the rest of a resumed one), its test evaluation, its row of history and its checkpoint."""
        rc, record = self.rc, self.record
        self.train_loader.set_epoch(epoch, record.batch if epoch == record.epoch else 0)
        bar.set_description_str(f"epoch {epoch + 1}/{rc.epochs}")
        progress = self.partial or EpochProgress.start(rc.torch_device)
        self.partial = None
        step_losses.start(epoch, progress)

        def after_step(progress: EpochProgress) -> None:
            step_losses.after_step(progress)  # before a stop, which the agreement may raise
            agreement.after_step(progress)

        try:
            stats = self.trainer.train_epoch(
                self.train_loader, progress=progress, bar=bar, on_batch=after_step,
                eval_every=rc.eval_every, on_eval=lambda p: self.evaluate(epoch, p.batches, p.seconds),
                check_loss=not self.ctx.enabled)
        except Interrupted:
            step_losses.flush(progress)  # this rank's own sums, up to the step it stopped at
            # Every rank stopped at this same step (StopAgreement): rank 0 saves the sums of all of them.
            progress = global_progress(progress, self.ctx, rc.torch_device)
            self.save_checkpoint(epoch, progress.batches, progress)
            raise
        stats = global_stats(stats, self.ctx, rc.torch_device)
        if self.ctx.enabled:  # the ranks' own checks were off (one would raise alone): check the global loss
            check_finite(stats.loss, "training")
        step_losses.flush()
        test_loss, test_acc = self.evaluate(epoch, len(self.train_loader), stats.seconds)
        record.train_seconds += stats.seconds
        record.history.append(dict(epoch=epoch + 1, train_loss=stats.loss, train_acc=stats.accuracy,
                                   test_loss=test_loss, test_acc=test_acc, epoch_seconds=stats.seconds,
                                   images_per_second=stats.images_per_second, train_seconds=record.train_seconds))
        if self.main:
            write_metrics(self.output / "metrics.jsonl", record.history)
        self.save_checkpoint(epoch + 1, 0, None)

    def evaluate(self, epoch: int, batches: int, seconds_in_epoch: float) -> tuple[float, float]:
        """Test loss and accuracy now, recorded with when (in training seconds) it was measured."""
        started = time.perf_counter()
        test_loss, test_acc = self.trainer.evaluate(self.test_loader)
        self.record.eval_seconds += time.perf_counter() - started
        self.record.evals.append(dict(epoch=epoch + batches / len(self.train_loader),
                                      train_seconds=self.record.train_seconds + seconds_in_epoch,
                                      test_loss=test_loss, test_acc=test_acc))
        return test_loss, test_acc

    def save_checkpoint(self, epoch: int, batch: int, progress: EpochProgress | None) -> None:
        """Rank 0 writes where the run stands: ``epoch`` epochs done, ``batch`` batches into the next."""
        self.record.epoch, self.record.batch = epoch, batch
        self.record.partial = progress.to_dict() if progress is not None else None
        if not self.main:
            return
        save_checkpoint(self.checkpoint_path, dict(
            model_name=self.rc.model, **trainer_state(self.trainer), **self.record.to_state(),
            config=self.rc.to_dict(), rng=capture_rng(), classes=list(self.plan.train_set.classes),
            image_shape=list(self.plan.train_set.image_shape), nproc=self.ctx.world_size if self.ctx.enabled else None,
            kernel_choices=choices_to_state(self.trainer.kernel_timings, self.kernels_measured_where)))

    def diverged(self, failure: TrainingDivergedError) -> TrainingDivergedError:
        """The divergence error, saying what was kept."""
        history = self.record.history
        kept = (f"the last good checkpoint (epoch {history[-1]['epoch']}) is kept at {self.checkpoint_path}"
                if history else "no epoch had finished, so nothing was saved")
        diverged = TrainingDivergedError(f"{failure}; {kept}")
        diverged.quiet = not self.main  # data parallel: every rank raises it together; rank 0 says it
        return diverged

    def summary(self) -> dict:
        rc, record, history = self.rc, self.record, self.record.history
        last = history[-1]
        time_to_target = None
        if rc.target_acc is not None:
            time_to_target = next((row["train_seconds"] for row in record.evals if row["test_acc"] >= rc.target_acc),
                                  None)
        samples = sum(row["images_per_second"] * row["epoch_seconds"] for row in history)
        summary = dict(
            model=rc.model, dataset=rc.dataset, preset=rc.preset, epochs=len(history),
            test_acc=last["test_acc"], test_loss=last["test_loss"], train_acc=last["train_acc"],
            train_loss=last["train_loss"], train_seconds=record.train_seconds, setup_seconds=self.setup_seconds,
            warmup_seconds=self.warmup_seconds, eval_seconds=record.eval_seconds,
            images_per_second=samples / record.train_seconds if record.train_seconds > 0 else None,
            target_acc=rc.target_acc, time_to_target=time_to_target, evals=record.evals,
            kernel_choices=[timing.to_dict() for timing in self.trainer.kernel_timings],
            cuda_graph=self.trainer.graph_status, config=rc.to_dict(), device_name=device_name(rc.torch_device),
            versions=versions(), git_commit=git_commit(), output=str(self.output),
            command=os.environ.get(COMMAND_ENV) or " ".join(sys.argv),
            finished_at=datetime.datetime.now().isoformat(timespec="seconds"))
        if self.ctx.enabled:
            summary["distributed"] = dict(
                world_size=self.ctx.world_size, backend=self.ctx.backend,
                parameters_in_sync=self.ctx.parameters_in_sync(self.trainer.model, rc.torch_device))
        return summary

    def finish(self) -> dict:
        summary = self.summary()  # every rank: the parameter check is collective
        if self.main:
            write_json(self.output / "summary.json", summary)
            plot_curves(self.output / "curves.png", self.record.history,
                        f"{self.rc.model} on {self.rc.dataset} ({self.rc.preset} preset, {self.rc.device})",
                        step_losses=self.record.step_losses, evals=self.record.evals)
            print_summary(summary, self.stream)
        self.ctx.barrier()
        return summary


def step_loss_every(steps_per_epoch: int) -> int:
    """Every how many batches a run records its training loss within an epoch: about 20 times an epoch, at most
    every 50 batches (and at each epoch's last batch)."""
    return max(1, min(50, steps_per_epoch // 20))


class StepLosses:
    """The training loss within epochs, for curves.png (readable from one epoch on): rows ``{"epoch": epoch +
    batches / steps_per_epoch, "train_loss": the mean loss since the row before}``, appended to ``rows`` (the run
    record's ``step_losses``, saved with every checkpoint).

    Every ``step_loss_every`` batches and at an epoch's last batch, ``after_step`` copies the epoch's running loss
    sum on the device, without synchronizing; on the other steps it only compares two integers. ``flush`` reads
    the copies in one go where the run waits for the device anyway (an epoch's end, a stop) and makes each row from
    the change in the loss sum and in the sample count since the copy before. A stop adds a row at its step, so a
    resumed run counts every step once. Data parallel: every rank records its own batches; rank 0's are saved."""

    def __init__(self, rows: list[dict], steps_per_epoch: int):
        self.rows, self.steps_per_epoch = rows, steps_per_epoch
        self.every = step_loss_every(steps_per_epoch)
        self.epoch = 0
        self.marks: list[tuple[int, torch.Tensor, int]] = []  # (batches, loss sum then, samples then); [0]: the base

    def start(self, epoch: int, progress: EpochProgress) -> None:
        """Before epoch ``epoch`` (counted from 0), whose sums are ``progress`` (a resumed epoch's are not zero)."""
        self.epoch, self.marks = epoch, [self._mark(progress)]

    def after_step(self, progress: EpochProgress) -> None:
        if progress.batches % self.every == 0 or progress.batches == self.steps_per_epoch:
            self.marks.append(self._mark(progress))

    def flush(self, progress: EpochProgress | None = None) -> None:
        """Turn the copies taken so far into rows; with ``progress`` (a stop), first one copy more at its step."""
        if progress is not None and progress.samples > self.marks[-1][2]:
            self.marks.append(self._mark(progress))
        if len(self.marks) < 2:
            return
        sums = torch.stack([loss_sum for _, loss_sum, _ in self.marks]).tolist()  # the one wait for the device
        for i in range(1, len(self.marks)):
            (batches, _, samples), samples_before = self.marks[i], self.marks[i - 1][2]
            self.rows.append(dict(epoch=self.epoch + batches / self.steps_per_epoch,
                                  train_loss=(sums[i] - sums[i - 1]) / (samples - samples_before)))
        self.marks = self.marks[-1:]

    @staticmethod
    def _mark(progress: EpochProgress) -> tuple[int, torch.Tensor, int]:
        # A copy: the sum is updated in place by every step (by a CUDA graph's replay, too).
        return progress.batches, progress.loss_sum.detach().clone(), progress.samples


def run_repeated(cfg: TrainConfig, *, stream=None) -> dict:
    """``--runs N``: N runs with seeds seed, seed+1, ... in <output>/run1..runN; <output>/summary.json holds
    the means, standard deviations and the per-run list, and the printed log reads like a speedrun's."""
    stream = stream or sys.stdout
    if cfg.resume:
        raise UsageError("--resume continues one run; it cannot be combined with --runs")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--runs and several processes do not combine; run the data-parallel runs one by one")
    rc = resolve(dataclasses.replace(cfg, runs=1))
    output = pathlib.Path(cfg.output) if cfg.output else default_output_dir(rc.model)
    check_output_dir(output, overwrite=cfg.overwrite, resume=None)
    taken = [str(output / f"run{i + 1}") for i in range(cfg.runs) if (output / f"run{i + 1}").exists()]
    if taken and not cfg.overwrite:
        raise UsageError(f"--output {output} already holds runs ({', '.join(taken)}); pass --overwrite or "
                         "another --output")
    datasets = load_splits(rc)
    check_input_shape(rc.model, datasets[0].image_shape)
    print_opening(fit_to_data(rc, datasets[0]), *datasets, output, stream, runs=cfg.runs)
    if cfg.overwrite:
        remove_run_outputs(output)  # all of the run it replaces (also its run3 when it had 3 and this has 2)
    summaries = []
    for index in range(cfg.runs):
        single = dataclasses.replace(cfg, runs=1, seed=cfg.seed + index, output=str(output / f"run{index + 1}"))
        summaries.append(run_training(single, stream=io.StringIO(), datasets=datasets))
        last = summaries[-1]
        print(f"run {index + 1}/{cfg.runs}: test acc {last['test_acc']:.2f}% in {last['train_seconds']:.2f} s",
              file=sys.stderr)
    summary = aggregate_runs(summaries, rc, output)
    write_json(output / "summary.json", summary)
    print_repeated_log(summary, summaries, stream)
    return summary

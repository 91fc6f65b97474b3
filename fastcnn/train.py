"""``fastcnn train``: one training run from a TrainConfig, with its outputs.

Order matters for "nothing lost": every check that can fail (arguments, checkpoint, dataset, output folder)
runs before the output folder is created or touched; files in it are replaced atomically; a run that fails
before finishing an epoch removes the folder it created; Ctrl-C / SIGTERM stop at a step boundary and write
a checkpoint from which ``--resume`` continues exactly. With several processes, the ranks agree on stopping and on
divergence (``StopAgreement``), so that all of them stop at the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import os
import pathlib
import shutil
import signal
import statistics
import sys
import time

import torch
from tqdm import tqdm

from fastcnn import env, kernel_choice
from fastcnn.checkpoint import checkpoint_file, load_checkpoint, save_checkpoint
from fastcnn.config import ResolvedConfig, TrainConfig, resolve
from fastcnn.data import ImageDataset, load_dataset, make_loader
from fastcnn.data.datasets import describe_shape
from fastcnn.distributed import DistributedContext, per_rank_batch_size
from fastcnn.engine import PROGRESS_REFRESH_STEPS, EpochProgress, EpochStats, Trainer, check_finite, synchronize
from fastcnn.errors import FastcnnError, NotAvailableError, TrainingDivergedError, UsageError
from fastcnn.kernel_choice import KernelTiming, choices_from_state, choices_to_state, measured_where
from fastcnn.models import build_model, check_input_shape
from fastcnn.report import EPOCH_COLUMNS, format_table, plot_curves, write_json, write_metrics

RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoint.pt", "curves.png")
EVAL_BATCH_SIZE = 1000


class Interrupted(Exception):
    """Training was asked to stop (SIGINT or SIGTERM); raised at a step boundary."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopRequests:
    """Turns SIGINT/SIGTERM into a flag checked after each step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def check(self, *_):
        if self.signum is not None:
            raise Interrupted(self.signum)

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False


class StopAgreement:
    """When to stop, decided by all ranks together, so that none is left waiting in an all-reduce.

    One process: ``after_step`` checks the stop flag after every step, and the loss checks stay local (as in
    ``Trainer.train_epoch``). Data parallel: a rank that stopped on its own SIGINT/SIGTERM, or raised on its own
    NaN, would leave the others blocked in the next gradient all-reduce. So every ``every`` steps, at the last
    batch of an epoch (``after_step``) and between epochs (``now``), the ranks all-reduce (MAX) two numbers: the
    signal a rank received (0: none) and whether its loss sum over the epoch so far is finite (0), infinite (1)
    or NaN (2). Every rank gets the same answer and acts on it at the same step: divergence first (its weights are
    not worth a checkpoint), then a stop, which rank 0 checkpoints at that step. The answer is the one host sync:
    between agreements nothing is read from the device.
    """

    def __init__(self, stop: StopRequests, ctx: DistributedContext, device: torch.device, steps_per_epoch: int,
                 every: int = PROGRESS_REFRESH_STEPS):
        self.stop, self.ctx, self.device = stop, ctx, device
        self.steps_per_epoch, self.every = steps_per_epoch, every

    def due(self, batches: int) -> bool:
        return batches % self.every == 0 or batches == self.steps_per_epoch

    def after_step(self, progress: EpochProgress) -> None:
        if not self.ctx.enabled:
            self.stop.check()
        elif self.due(progress.batches):
            self.now(progress.loss_sum)

    def now(self, loss_sum: torch.Tensor | None = None) -> None:
        """Agree now (every rank must call this at the same point); raise what was agreed."""
        if not self.ctx.enabled:
            self.stop.check()
            return
        flags = torch.zeros(2, dtype=torch.float64, device=self.device)
        flags[0] = float(self.stop.signum or 0)
        if loss_sum is not None:
            flags[1] = torch.isnan(loss_sum).double() * 2 + torch.isinf(loss_sum).double()
        signum, loss_code = (int(value) for value in self.ctx.all_max_(flags).tolist())
        if loss_code:
            check_finite(float("nan") if loss_code == 2 else float("inf"), "training")
        if signum:
            raise Interrupted(signum)


TEST_FAULT_ENV = "FASTCNN_TEST_FAULT"


def install_test_fault(trainer: Trainer, rank: int) -> None:
    """Test hook, for tests/test_distributed.py: ``FASTCNN_TEST_FAULT=RANK:STEP:FAULT`` makes rank RANK, at its
    STEP-th training step in this process, send itself FAULT (SIGINT or SIGTERM), or, with FAULT ``nan``, report a
    NaN loss from that step on (its gradients stay finite). These are faults a real run meets on one rank only,
    made reproducible inside torchrun's worker processes, where a test's monkeypatch cannot reach. Unset (any real
    run) it does nothing."""
    spec = os.environ.get(TEST_FAULT_ENV)
    if not spec:
        return
    fault_rank, fault_step, fault = spec.split(":")
    if int(fault_rank) != rank:
        return
    real_step, steps = trainer.train_step, 0

    def faulty_step(images, labels):
        nonlocal steps
        steps += 1
        loss, correct = real_step(images, labels)
        if fault == "nan" and steps >= int(fault_step):
            loss = loss * float("nan")
            if trainer.replayed_last_step:  # the graph added this step to the epoch's sums itself
                trainer.graphed_step.loss_sum.fill_(float("nan"))
        elif fault != "nan" and steps == int(fault_step):
            os.kill(os.getpid(), signal.Signals[fault])
        return loss, correct

    trainer.train_step = faulty_step


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """Bitwise-repeatable runs: deterministic kernels only (an op without one fails loudly), no cuDNN autotuning.
    fastcnn's fused kernel already reduces its gradients in a fixed order. The previous settings come back
    afterwards, so a library caller's process is left as it was."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1], saved[2]


def load_splits(rc: ResolvedConfig) -> tuple[ImageDataset, ImageDataset]:
    """The run's train and test splits, in the shape it asks for (``channels`` / ``image_size``; None: the
    dataset's own, inferred from the train split for an image folder), the test split in the train split's."""
    kwargs = dict(root=rc.data_dir, download=rc.download, synthetic_size=rc.synthetic_size, seed=rc.seed)
    train = load_dataset(rc.dataset, True, channels=rc.channels, image_size=rc.image_size, subset=rc.train_subset,
                         **kwargs)
    channels, height, width = train.image_shape
    test = load_dataset(rc.dataset, False, channels=channels, image_size=(height, width), subset=rc.test_subset,
                        **kwargs)
    return train, test


def fit_to_data(rc: ResolvedConfig, train_set: ImageDataset) -> ResolvedConfig:
    """``rc`` with what the loaded data decides: the shape it trains on and, where the configuration leaves the
    normalization to the data, the train split's per-channel mean and std."""
    channels, height, width = train_set.image_shape
    changes = dict(channels=channels, image_size=(height, width))
    if rc.mean is None or rc.std is None:
        mean, std = train_set.channel_stats()
        changes.update(mean=tuple(mean), std=tuple(std))
    return dataclasses.replace(rc, **changes)


def describe_run(rc: ResolvedConfig, train_set: ImageDataset, test_set: ImageDataset, output, *,
                 runs: int = 1) -> str:
    """The run's opening line: what it trains on (dataset, counts, classes, shape, normalization) and how (model,
    device, preset, output folder)."""
    names = ", ".join(train_set.classes[:4]) + (", ..." if len(train_set.classes) > 4 else "")
    source = f" {train_set.source}" if train_set.source else ""
    shape = describe_shape(train_set.image_shape)

    def values(numbers):
        return ",".join(f"{v:.4g}" for v in numbers)

    model = rc.model + (f" {'-'.join(str(w) for w in rc.widths)}" if rc.widths else "")
    recipe = f", recipe {rc.recipe}" if rc.recipe else ""
    repeat = f", {runs} runs (seeds {rc.seed}..{rc.seed + runs - 1})" if runs > 1 else ""
    augment = (" | augment: translate" + (" + flip" if rc.flip else "")) if rc.augment else ""
    return (f"training on {rc.dataset}{source}: {len(train_set):,} train / {len(test_set):,} test images, "
            f"{train_set.num_classes} classes ({names}), {shape}, mean {values(rc.mean)} std {values(rc.std)}"
            f"{augment} | model {model} | device {env.device_name(rc.torch_device)} | preset {rc.preset}"
            f"{recipe}, {rc.epochs} epoch{'s' if rc.epochs != 1 else ''}{repeat} | output {output}")


def print_opening(rc: ResolvedConfig, train_set: ImageDataset, test_set: ImageDataset, output, stream, *,
                  runs: int = 1) -> None:
    print(describe_run(rc, train_set, test_set, output, runs=runs), file=stream)
    for note in dict.fromkeys([*train_set.notes, *test_set.notes]):  # in order, once each
        print(f"note: {note}", file=stream)
    stream.flush()


def build_loaders(rc: ResolvedConfig, train_set: ImageDataset, test_set: ImageDataset, *, rank: int = 0,
                  world_size: int = 1):
    """Train loader (this rank's shard, its share of the global batch) and test loader (the whole test set)."""
    # The device loader can emit the autocast dtype directly: the first layer would cast it anyway.
    dtype = rc.autocast_dtype if (rc.amp and rc.loader != "torch") else torch.float32
    mean, std = (rc.mean, rc.std) if rc.mean is not None else train_set.channel_stats()
    options = dict(device=rc.torch_device, seed=rc.seed, mean=mean, std=std, dtype=dtype,
                   channels_last=rc.channels_last)
    if rc.loader == "torch":
        options["num_workers"] = rc.num_workers
    augmentation = dict(augment=rc.augment, flip=rc.flip) if rc.loader == "dali" else {}
    train_loader = make_loader(rc.loader, train_set, per_rank_batch_size(rc.batch_size, world_size), shuffle=True,
                               rank=rank, world_size=world_size, **options, **augmentation)
    eval_kind = "torch" if rc.loader == "torch" else "device"
    eval_options = {k: v for k, v in options.items() if k != "num_workers" or eval_kind == "torch"}
    test_loader = make_loader(eval_kind, test_set, max(rc.batch_size, EVAL_BATCH_SIZE), shuffle=False,
                              **eval_options)
    return train_loader, test_loader


def build_trainer(rc: ResolvedConfig, train_set: ImageDataset, test_set: ImageDataset, *, rank: int = 0,
                  world_size: int = 1, distributed: bool | None = None):
    """Model (seeded), optimizer and loaders for ``rc``: everything a run needs before its first step.
    ``distributed``: wrap the model in DistributedDataParallel (default: when world_size > 1)."""
    train_loader, test_loader = build_loaders(rc, train_set, test_set, rank=rank, world_size=world_size)
    torch.manual_seed(rc.seed)
    model = build_model(rc.model, kernel=rc.kernel, reference_impl=rc.reference_model,
                        num_classes=train_set.num_classes, image_shape=train_set.image_shape, widths=rc.widths)
    trainer = Trainer(model, device=rc.torch_device, opt=rc.opt, lr=rc.lr, amp_dtype=rc.autocast_dtype,
                      channels_last=rc.channels_last, compile=rc.compile, compile_mode=rc.compile_mode,
                      betas=rc.betas, label_smoothing=rc.label_smoothing, schedule=rc.schedule,
                      total_steps=rc.epochs * len(train_loader),
                      distributed=world_size > 1 if distributed is None else distributed,
                      cuda_graph=rc.cuda_graph, fused_optimizer=rc.fused_optimizer)
    return trainer, train_loader, test_loader


def warm_up(rc: ResolvedConfig, trainer: Trainer, train_loader, test_loader,
            ctx: DistributedContext | None = None, known_kernels: list[KernelTiming] | None = None, *,
            always: bool = False, evaluate: bool = True, last_batch: bool = True) -> float:
    """Pay one-time costs (compilation, autotuning) before the clock starts; returns their seconds.
    Model, optimizer and RNG are put back as they were, so training itself is unchanged.

    ``kernel="auto"`` is decided here by measurement (``known_kernels``: a resumed run's, not measured again);
    with several processes rank 0 measures and every rank takes its choices. Training warms up only where there
    is something to pay in advance; benchmarks pass ``always`` (a GPU's first steps pay cuBLAS and cuDNN set-up
    too), and ``evaluate=False`` / ``last_batch=False`` when they will not time those shapes."""
    seconds = 0.0
    ctx = ctx or DistributedContext()
    # kernel="auto" measures wherever it may pick the fused kernel (on CUDA; tests let the CPU take part)
    may_fuse = (rc.kernel == "triton" and rc.device == "cuda") or (
        rc.kernel == "auto" and kernel_choice.fused_is_an_option(rc.torch_device))
    if always or rc.compile or rc.cuda_graph or may_fuse:
        shapes = batch_shapes(train_loader)
        seconds = trainer.warm_up(shapes if last_batch else shapes[:1],
                                  batch_shapes(test_loader) if evaluate else [],
                                  known_kernels=known_kernels or (), measure_kernels=ctx.is_main,
                                  agree_on_kernels=ctx.from_main if ctx.enabled else None)
    synchronize(rc.torch_device)
    return seconds


def batch_shapes(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A batch of every size an epoch of ``loader`` serves: a full one and, when the last is smaller, one of that
    size (cut from the first), so that warm-up compiles for both."""
    images, labels = next(iter(loader))
    remainder = 0 if getattr(loader, "drop_last", False) else loader.num_samples % loader.batch_size
    if remainder and remainder < images.shape[0]:
        return [(images, labels), (images[:remainder], labels[:remainder])]
    return [(images, labels)]


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


def run_training(cfg: TrainConfig, *, stream=None, datasets=None) -> dict:
    """Train as ``cfg`` says; return the summary (also written to <output>/summary.json).
    ``datasets``: the (train, test) ImageDatasets when the caller already loaded them."""
    if cfg.runs > 1:
        return run_repeated(cfg, stream=stream)
    cfg = with_resume_file(cfg)
    with deterministic_algorithms(cfg.deterministic):
        return _run_single(cfg, stream, datasets)


def preflight(cfg: TrainConfig) -> ResolvedConfig:
    """Every check of a run that can fail before training (arguments, checkpoint, dataset, output folder), for a
    launcher that starts several processes: it fails once, in one line, instead of once per process."""
    rc, _, _ = _prepare(with_resume_file(cfg), None, several_processes=True)
    return rc


def with_resume_file(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``--resume`` naming the checkpoint file itself, also when it was given a run folder."""
    return dataclasses.replace(cfg, resume=str(checkpoint_file(cfg.resume))) if cfg.resume else cfg


def _prepare(cfg: TrainConfig, datasets, *, several_processes: bool):
    if several_processes and not cfg.output and not cfg.resume:
        raise UsageError("with several processes, give --output so that every rank agrees on the run folder")
    resume_state = None
    if cfg.resume:
        resume_state = load_checkpoint(cfg.resume, model_name=cfg.model)
        rc = resume_config(resume_state, cfg)
    else:
        rc = resolve(cfg)
    train_set, test_set = datasets or load_splits(rc)
    rc = fit_to_data(rc, train_set)
    check_input_shape(rc.model, train_set.image_shape)  # before anything is printed or written
    output = pathlib.Path(cfg.output) if cfg.output else (
        pathlib.Path(cfg.resume).parent if cfg.resume else default_output_dir(rc.model))
    check_output_dir(output, overwrite=cfg.overwrite, resume=pathlib.Path(cfg.resume) if cfg.resume else None)
    return rc, (train_set, test_set, output), resume_state


def _run_single(cfg: TrainConfig, stream, datasets) -> dict:
    started = time.perf_counter()
    rc, (train_set, test_set, output), resume_state = _prepare(
        cfg, datasets, several_processes=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    ctx = DistributedContext.from_env(rc.torch_device.type, cuda_graph=rc.cuda_graph)
    try:
        return _train(cfg, rc, ctx, train_set, test_set, output, resume_state, started, stream)
    finally:
        ctx.shutdown()


def _train(cfg: TrainConfig, rc: ResolvedConfig, ctx: DistributedContext, train_set: ImageDataset,
           test_set: ImageDataset, output: pathlib.Path, resume_state: dict | None, started: float, stream) -> dict:
    main = ctx.is_main  # only rank 0 writes files and prints
    if ctx.enabled and rc.cuda_graph and ctx.backend == "nccl" and tuple(torch.cuda.nccl.version()[:3]) < (2, 9, 6):
        raise NotAvailableError(f"--cuda-graph with several processes needs NCCL 2.9.6 or later to capture the "
                                f"gradient all-reduces; this PyTorch has NCCL {torch.cuda.nccl.version()}; drop "
                                "--cuda-graph or --nproc")
    if main:  # under --runs, each run's stream is discarded: run_repeated says it once
        print_opening(rc, train_set, test_set, output, stream or sys.stdout)
    trainer, train_loader, test_loader = build_trainer(rc, train_set, test_set, rank=ctx.rank,
                                                       world_size=ctx.world_size, distributed=ctx.enabled)
    history: list[dict] = []
    evals: list[dict] = []  # every test evaluation: when (training seconds) and how good
    start_epoch, start_batch, partial, train_seconds, previous_eval_seconds = 0, 0, None, 0.0, 0.0
    if resume_state is not None:
        trainer.model.load_state_dict(resume_state["model"])
        trainer.optimizer.load_state_dict(resume_state["optimizer"])
        if trainer.scaler is not None and resume_state.get("scaler"):
            trainer.scaler.load_state_dict(resume_state["scaler"])
        if trainer.cuda_graph:  # the checkpoint's lr tensor was loaded on the CPU: a graph needs it on the GPU
            for group in trainer.optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=rc.torch_device)
        if trainer.scheduler is not None and resume_state.get("scheduler"):
            saved_steps = resume_state["scheduler"].get("total_steps")
            steps = rc.epochs * len(train_loader)
            if saved_steps is not None and saved_steps != steps:
                raise UsageError(f"checkpoint {cfg.resume} follows a {rc.schedule} schedule over {saved_steps} steps; "
                                 f"this resume would need {steps} (another --epochs or dataset); a schedule cannot "
                                 "be stretched mid-run: resume with the same --epochs and data")
            trainer.scheduler.load_state_dict(resume_state["scheduler"])
        evals = list(resume_state.get("evals", []))
        history = list(resume_state["history"])
        start_epoch, start_batch = resume_state["epoch"], resume_state["batch"]
        train_seconds = resume_state["train_seconds"]
        previous_eval_seconds = resume_state.get("eval_seconds", 0.0)
        if resume_state.get("partial"):
            partial = EpochProgress.from_dict(resume_state["partial"], rc.torch_device)
            if not main:  # its sums are those of all ranks (see the stop below): counted once, by rank 0
                partial = EpochProgress(partial.loss_sum * 0, partial.correct * 0, 0, partial.seconds, partial.batches)
        restore_rng(resume_state["rng"])

    kernels_measured_where = measured_where(rc.torch_device)  # once: every checkpoint records it
    known_kernels = []
    if resume_state is not None:
        known_kernels = choices_from_state(resume_state.get("kernel_choices"), kernels_measured_where)
    warmup_seconds = warm_up(rc, trainer, train_loader, test_loader, ctx, known_kernels)
    install_test_fault(trainer, ctx.rank)
    setup_seconds = time.perf_counter() - started

    created = main and not output.exists()
    if main:
        output.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and resume_state is None:
            for name in RUN_FILES:
                (output / name).unlink(missing_ok=True)
    checkpoint_path = output / "checkpoint.pt"
    eval_seconds = previous_eval_seconds

    def evaluate(epoch: int, batches: int, seconds_in_epoch: float) -> tuple[float, float]:
        nonlocal eval_seconds
        started_eval = time.perf_counter()
        test_loss, test_acc = trainer.evaluate(test_loader)
        eval_seconds += time.perf_counter() - started_eval
        evals.append(dict(epoch=epoch + batches / len(train_loader), train_seconds=train_seconds + seconds_in_epoch,
                          test_loss=test_loss, test_acc=test_acc))
        return test_loss, test_acc

    def checkpoint_state(epoch: int, batch: int, progress: EpochProgress | None) -> dict:
        return dict(model_name=rc.model, model=trainer.model.state_dict(), optimizer=trainer.optimizer.state_dict(),
                    scaler=trainer.scaler.state_dict() if trainer.scaler is not None else None,
                    scheduler=trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
                    evals=evals, epoch=epoch,
                    batch=batch, partial=progress.to_dict() if progress is not None else None,
                    history=history, train_seconds=train_seconds, eval_seconds=eval_seconds, config=config_dict(rc),
                    rng=capture_rng(),
                    classes=list(train_set.classes), image_shape=list(train_set.image_shape),
                    kernel_choices=choices_to_state(trainer.kernel_timings, kernels_measured_where))

    try:
        with StopRequests() as stop:
            agreement = StopAgreement(stop, ctx, rc.torch_device, len(train_loader))
            for epoch in range(start_epoch, rc.epochs):
                train_loader.set_epoch(epoch, start_batch)
                bar = tqdm(total=len(train_loader), initial=start_batch, desc=f"epoch {epoch + 1}/{rc.epochs}",
                           unit="batch", disable=not (cfg.progress and main), file=sys.stderr, dynamic_ncols=True)
                progress = partial or EpochProgress.start(rc.torch_device)
                partial, start_batch = None, 0
                try:
                    stats = trainer.train_epoch(
                        train_loader, progress=progress, bar=bar, on_batch=agreement.after_step,
                        eval_every=rc.eval_every, on_eval=lambda p, e=epoch: evaluate(e, p.batches, p.seconds),
                        check_loss=not ctx.enabled)
                except Interrupted:
                    bar.close()
                    # Every rank stopped at this same step (StopAgreement): rank 0 saves the sums of all of them.
                    progress = global_progress(progress, ctx, rc.torch_device)
                    if main:
                        save_checkpoint(checkpoint_path, checkpoint_state(epoch, progress.batches, progress))
                    raise
                bar.close()
                stats = global_stats(stats, ctx, rc.torch_device)
                if ctx.enabled:  # the ranks' own checks were off (one would raise alone): check the global loss
                    check_finite(stats.loss, "training")
                test_loss, test_acc = evaluate(epoch, len(train_loader), stats.seconds)
                train_seconds += stats.seconds
                history.append(dict(epoch=epoch + 1, train_loss=stats.loss, train_acc=stats.accuracy,
                                    test_loss=test_loss, test_acc=test_acc, epoch_seconds=stats.seconds,
                                    images_per_second=stats.images_per_second, train_seconds=train_seconds))
                if main:
                    write_metrics(output / "metrics.jsonl", history)
                    save_checkpoint(checkpoint_path, checkpoint_state(epoch + 1, 0, None))
                if epoch + 1 < rc.epochs:  # after the last epoch, finish the run: summary and curves
                    agreement.now()
    except Interrupted as stop_request:
        if main:
            print(f"fastcnn: interrupted by {stop_request}; checkpoint saved to {checkpoint_path}; continue with "
                  f"`fastcnn train --resume {checkpoint_path}`", file=sys.stderr)
        # Every rank stopped here together. The others exit once rank 0 has written and said so: torchrun stops
        # the remaining workers as soon as one exits.
        ctx.barrier()
        raise
    except Exception as failure:
        if created and not history:
            shutil.rmtree(output, ignore_errors=True)  # nothing worth keeping: leave no half-made run behind
        if isinstance(failure, TrainingDivergedError):
            kept = (f"the last good checkpoint (epoch {history[-1]['epoch']}) is kept at {checkpoint_path}"
                    if history else "no epoch had finished, so nothing was saved")
            diverged = TrainingDivergedError(f"{failure}; {kept}")
            diverged.quiet = not main  # data parallel: every rank raises it together; rank 0 says it
            raise diverged from None
        raise

    last = history[-1]
    time_to_target = None
    if rc.target_acc is not None:
        time_to_target = next((row["train_seconds"] for row in evals if row["test_acc"] >= rc.target_acc), None)
    samples = sum(row["images_per_second"] * row["epoch_seconds"] for row in history)
    summary = dict(
        model=rc.model, dataset=rc.dataset, preset=rc.preset, epochs=len(history),
        test_acc=last["test_acc"], test_loss=last["test_loss"], train_acc=last["train_acc"],
        train_loss=last["train_loss"], train_seconds=train_seconds, setup_seconds=setup_seconds,
        warmup_seconds=warmup_seconds, eval_seconds=eval_seconds,
        images_per_second=samples / train_seconds if train_seconds > 0 else None,
        target_acc=rc.target_acc, time_to_target=time_to_target, evals=evals,
        kernel_choices=[timing.to_dict() for timing in trainer.kernel_timings], cuda_graph=trainer.graph_status,
        config=config_dict(rc), device_name=env.device_name(rc.torch_device), versions=env.versions(),
        git_commit=env.git_commit(), output=str(output), command=" ".join(sys.argv),
        finished_at=datetime.datetime.now().isoformat(timespec="seconds"))
    if ctx.enabled:
        summary["distributed"] = dict(world_size=ctx.world_size, backend=ctx.backend,
                                      parameters_in_sync=ctx.parameters_in_sync(trainer.model, rc.torch_device))
    if main:
        write_json(output / "summary.json", summary)
        plot_curves(output / "curves.png", history, f"{rc.model} on {rc.dataset} ({rc.preset} preset, {rc.device})")
        print_summary(summary, history, stream or sys.stdout)
    ctx.barrier()
    return summary


def global_stats(stats: EpochStats, ctx: DistributedContext, device: torch.device) -> EpochStats:
    """An epoch's training loss, accuracy and throughput over all ranks (the slowest rank's time)."""
    if not ctx.enabled:
        return stats
    loss_sum, correct, samples = ctx.sum([stats.loss * stats.samples, stats.accuracy * stats.samples / 100.0,
                                          float(stats.samples)], device)
    seconds = ctx.max(stats.seconds, device)
    return EpochStats(loss_sum / max(samples, 1), 100.0 * correct / max(samples, 1), int(samples), seconds)


def global_progress(progress: EpochProgress, ctx: DistributedContext, device: torch.device) -> EpochProgress:
    """The sums of an epoch in progress over all ranks (the slowest rank's time), for rank 0's checkpoint. Every
    rank must call it at the same step."""
    if not ctx.enabled:
        return progress
    loss_sum, correct, samples = ctx.sum([float(progress.loss_sum), float(progress.correct), float(progress.samples)],
                                         device)
    return EpochProgress(torch.tensor(loss_sum, dtype=torch.float64, device=device),
                         torch.tensor(round(correct), dtype=torch.int64, device=device), round(samples),
                         ctx.max(progress.seconds, device), progress.batches)


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
    summaries = []
    for index in range(cfg.runs):
        single = dataclasses.replace(cfg, runs=1, seed=cfg.seed + index, output=str(output / f"run{index + 1}"))
        summaries.append(run_training(single, stream=io.StringIO(), datasets=datasets))
        last = summaries[-1]
        print(f"run {index + 1}/{cfg.runs}: test acc {last['test_acc']:.2f}% in {last['train_seconds']:.2f} s",
              file=sys.stderr)
    summary = aggregate_runs(summaries, rc, output)
    write_json(output / "summary.json", summary)
    print_speedrun_log(summary, summaries, stream)
    return summary


def aggregate_runs(summaries: list[dict], rc: ResolvedConfig, output: pathlib.Path) -> dict:
    def mean_std(key):
        values = [s[key] for s in summaries]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    test_acc, test_acc_std = mean_std("test_acc")
    train_seconds, train_seconds_std = mean_std("train_seconds")
    reached = [s["time_to_target"] for s in summaries]
    per_run = [dict(run=i + 1, seed=s["config"]["seed"], test_acc=s["test_acc"], train_seconds=s["train_seconds"],
                    time_to_target=s["time_to_target"], setup_seconds=s["setup_seconds"],
                    eval_seconds=s["eval_seconds"], evals=s["evals"], output=s["output"])
               for i, s in enumerate(summaries)]
    first = summaries[0]
    return dict(
        model=rc.model, dataset=rc.dataset, preset=rc.preset, recipe=rc.recipe, runs=len(summaries),
        epochs=first["epochs"], test_acc=test_acc, test_acc_std=test_acc_std, train_seconds=train_seconds,
        train_seconds_std=train_seconds_std,
        setup_seconds=statistics.fmean(s["setup_seconds"] for s in summaries),
        eval_seconds=statistics.fmean(s["eval_seconds"] for s in summaries),
        images_per_second=statistics.fmean(s["images_per_second"] for s in summaries),
        target_acc=rc.target_acc,
        time_to_target=statistics.fmean(reached) if reached and None not in reached else None,
        runs_reaching_target=sum(r is not None for r in reached) if rc.target_acc is not None else None,
        per_run=per_run, config=first["config"], device_name=first["device_name"], versions=first["versions"],
        git_commit=first["git_commit"], output=str(output), command=" ".join(sys.argv),
        finished_at=datetime.datetime.now().isoformat(timespec="seconds"))


def print_speedrun_log(summary: dict, summaries: list[dict], stream) -> None:
    rows = []
    for index, run in enumerate(summaries):
        history = json_lines(pathlib.Path(run["output"]) / "metrics.jsonl")
        elapsed = 0.0
        for row in history:
            elapsed += row["epoch_seconds"]
            rows.append(dict(run=index + 1, epoch=row["epoch"], train_acc=row["train_acc"], test_acc=row["test_acc"],
                             seconds=elapsed))
    columns = [("run", "run", "d"), ("epoch", "epoch", "d"), ("train_acc", "train acc", ".2f"),
               ("test_acc", "test acc", ".2f"), ("seconds", "seconds", ".3f")]
    print(format_table(rows, columns), file=stream)
    line = (f"\n{summary['model']} on {summary['dataset']}, {summary['runs']} runs: test acc "
            f"{summary['test_acc']:.2f} ± {summary['test_acc_std']:.2f}% in {summary['train_seconds']:.3f} ± "
            f"{summary['train_seconds_std']:.3f} s of training | {summary['device_name']}")
    if summary["target_acc"] is not None:
        line += (f"\ntime to {summary['target_acc']:.2f}%: " + (
            f"{summary['time_to_target']:.3f} s (mean over runs)" if summary["time_to_target"] is not None else
            f"reached by {summary['runs_reaching_target']} of {summary['runs']} runs"))
    print(line + f"\noutputs in {summary['output']}", file=stream)


def json_lines(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def print_summary(summary: dict, history: list[dict], stream) -> None:
    print(format_table(history, EPOCH_COLUMNS), file=stream)
    line = (f"\n{summary['model']} on {summary['dataset']}: test acc {summary['test_acc']:.2f}% | train "
            f"{summary['train_seconds']:.2f} s ({summary['images_per_second']:,.0f} images/s) | setup "
            f"{summary['setup_seconds']:.2f} s | eval {summary['eval_seconds']:.2f} s | {summary['device_name']}")
    if summary["target_acc"] is not None:
        reached = summary["time_to_target"]
        line += (f"\ntime to {summary['target_acc']:.2f}% test accuracy: " +
                 (f"{reached:.2f} s of training" if reached is not None else "not reached"))
    for choice in summary.get("kernel_choices", []):
        line += (f"\nkernel auto: {choice['layer']} [{choice['call']}] -> {choice['choice']} (fused "
                 f"{choice['fused_ms']:.4f} ms, plain chain {choice['torch_ms']:.4f} ms)")
    print(line + f"\noutputs in {summary['output']}", file=stream)


def config_dict(rc: ResolvedConfig) -> dict:
    data = rc.to_dict()
    data["mean"], data["std"], data["synthetic_size"] = list(rc.mean), list(rc.std), list(rc.synthetic_size)
    for key in ("betas", "widths", "image_size"):
        data[key] = list(data[key]) if data[key] is not None else None
    return data


def resume_config(state: dict, cfg: TrainConfig) -> ResolvedConfig:
    """The checkpoint's own configuration; only --epochs (to train longer) and --data-dir may change."""
    saved = dict(state["config"])
    saved["mean"], saved["std"] = tuple(saved["mean"]), tuple(saved["std"])
    saved["synthetic_size"] = tuple(saved["synthetic_size"])
    for key in ("betas", "widths", "image_size"):
        if saved.get(key) is not None:
            saved[key] = tuple(saved[key])
    if "image_size" not in saved:  # from before shapes were recorded: every dataset was decoded to 1x28x28
        image_shape = state.get("image_shape") or (1, 28, 28)
        saved["channels"], saved["image_size"] = int(image_shape[0]), tuple(int(v) for v in image_shape[1:])
    if cfg.epochs is not None:
        if cfg.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {cfg.epochs}")
        saved["epochs"] = cfg.epochs
    if cfg.data_dir is not None:
        saved["data_dir"] = cfg.data_dir
    fields = {f.name for f in dataclasses.fields(ResolvedConfig)}
    try:
        rc = ResolvedConfig(**{k: v for k, v in saved.items() if k in fields})
    except TypeError as err:
        raise FastcnnError(f"checkpoint {cfg.resume} has an incompatible configuration ({err})") from None
    if rc.device == "cuda" and not torch.cuda.is_available():
        raise FastcnnError(f"checkpoint {cfg.resume} was trained on CUDA but no GPU is visible; resume it on a GPU")
    if state["epoch"] >= rc.epochs:
        raise UsageError(f"checkpoint {cfg.resume} already finished {state['epoch']} of {rc.epochs} epochs; "
                         f"pass --epochs N with N > {state['epoch']} to train longer")
    return rc


def capture_rng() -> dict:
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

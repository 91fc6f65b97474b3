"""The Trainer: its training step, epoch loop and evaluation; one implementation for every preset.

What the fast path changes is set up once here (autocast, channels-last, torch.compile, the fused kernel
inside the model, and the step itself: eager or a whole-step graph, fastcnn.steps); the loop itself never
synchronizes with the device except to refresh the progress bar and to read the clock, so on a GPU the host runs
ahead of the kernels.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastcnn.errors import TrainingDivergedError
from fastcnn.kernel_choice import KernelTiming, apply_choices, choose_kernels
from fastcnn.lean_adam import LeanFusedAdam
from fastcnn.steps import EagerStep, GraphedStep, StepParts, TrainStep, graph_policy

PROGRESS_REFRESH_STEPS = 50


def synchronize(device: torch.device) -> None:
    """Wait for the device, so that a clock read after it measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_optimizer(name: str, params, lr: float, betas: tuple[float, float] | None = None, *,
                    capturable_on: torch.device | None = None, fused: bool = False) -> torch.optim.Optimizer:
    """Adam or SGD (momentum, Nesterov). ``capturable_on``: a CUDA device whose graphs will run the step: the
    learning rate becomes a tensor there (schedules update it in place) and Adam keeps its step count there.
    ``fused``: torch's fused implementation, one kernel for all parameters (the same update, rounded in another
    order); otherwise torch's default, as the tutorials get."""
    if capturable_on is not None:
        lr = torch.tensor(lr, dtype=torch.float32, device=capturable_on)
    # fused=None, not False, leaves torch its default (foreach on CUDA): the reference path's optimizer.
    implementation = dict(fused=True) if fused else {}
    if name == "adam":
        if fused and capturable_on is None:  # the same fused update, without the Python before its kernel
            return LeanFusedAdam(params, lr=lr, betas=betas or (0.9, 0.999))
        return torch.optim.Adam(params, lr=lr, betas=betas or (0.9, 0.999), capturable=capturable_on is not None,
                                **implementation)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=betas[0] if betas else 0.9, nesterov=True, **implementation)
    raise ValueError(f"unknown optimizer {name!r}")


SCHEDULES = ("constant", "onecycle")


def build_schedule(name: str, optimizer: torch.optim.Optimizer, lr: float, total_steps: int):
    """A per-step learning-rate schedule (None for constant). OneCycle ramps up to ``lr`` and anneals to
    ~0 over ``total_steps``; momentum is not cycled (Adam's beta1 stays what was asked for)."""
    if name == "constant":
        return None
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(total_steps, 1),
                                                   cycle_momentum=False)
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")


@dataclass
class EpochStats:
    """Training loss and accuracy over an epoch, with its wall time (device synchronized)."""

    loss: float
    accuracy: float
    samples: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class EpochProgress:
    """Running sums of an epoch in progress, kept on the device (no sync per step)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    samples: int = 0
    seconds: float = 0.0
    batches: int = 0

    @classmethod
    def start(cls, device: torch.device) -> EpochProgress:
        return cls(torch.zeros((), dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device))

    def to_dict(self) -> dict:
        return dict(loss_sum=float(self.loss_sum), correct=int(self.correct), samples=self.samples,
                    seconds=self.seconds, batches=self.batches)

    @classmethod
    def from_dict(cls, state: dict, device: torch.device) -> EpochProgress:
        return cls(torch.tensor(state["loss_sum"], dtype=torch.float64, device=device),
                   torch.tensor(state["correct"], dtype=torch.int64, device=device),
                   state["samples"], state["seconds"], state["batches"])

    def finish(self) -> EpochStats:
        samples = max(self.samples, 1)
        return EpochStats(float(self.loss_sum) / samples, 100.0 * int(self.correct) / samples,
                          self.samples, self.seconds)


class Trainer:
    """Runs training steps and evaluation of ``model`` on ``device`` with the given speed options.

    Built in this order, each piece from the ones before: the model placed on the device (channels-last when
    asked), the optimizer over its parameters, the schedule, float16's loss scaler, the DistributedDataParallel wrap,
    torch.compile (the step's forward and backward compile), and the training step (``self.step``): an
    ``EagerStep``, or a ``GraphedStep`` when ``cuda_graph`` (``fastcnn.steps.graph_policy`` decides, and refuses
    what a graph cannot capture). ``make_step`` builds the step from the trainer's ``StepParts`` instead.
    """

    def __init__(self, model: nn.Module, *, device: torch.device, opt: str = "adam", lr: float = 1e-3,
                 amp_dtype: torch.dtype | None = None, channels_last: bool = False, compile: bool = False,
                 compile_mode: str = "default", betas: tuple[float, float] | None = None,
                 label_smoothing: float = 0.0, schedule: str = "constant", total_steps: int = 0,
                 distributed: bool = False, cuda_graph: bool = False, fused_optimizer: bool = False,
                 make_step: Callable[[StepParts], TrainStep] | None = None):
        graphs = graph_policy(cuda_graph, device=device, amp_dtype=amp_dtype, opt=opt, distributed=distributed)
        self.device, self.amp_dtype, self.label_smoothing = device, amp_dtype, label_smoothing
        self.compile, self.distributed = compile, distributed
        self.kernel_timings = []  # fastcnn.kernel_choice.KernelTiming per measured call, filled by warm_up
        self.model = placed(model, device, channels_last)
        self.optimizer = build_optimizer(opt, self.model.parameters(), lr, betas,
                                         capturable_on=device if graphs is not None else None, fused=fused_optimizer)
        self.scheduler = build_schedule(schedule, self.optimizer, lr, total_steps)
        self.scaler = loss_scaler(device, amp_dtype)
        train_model, self.graph_stream = self.model, None  # graph_stream: the side stream DDP was built in
        if distributed:
            train_model, self.graph_stream = data_parallel(self.model, device, for_graph=graphs is not None)
        self.forward_model = compiled(train_model, compile, compile_mode)
        # Evaluation runs on the plain module: no gradient buckets to sync, same weights on every rank.
        self.eval_model = compiled(self.model, compile, compile_mode) if distributed else self.forward_model
        # The loss and the count of right predictions, compiled too: eager, they are about ten small kernels per
        # step on a GPU (cast, log-softmax, NLL, argmax, compare, sum; four more backward), which Inductor fuses
        # into a few. Compiled apart from the model, so that a DistributedDataParallel model is compiled as torch
        # documents it, alone.
        self.loss_and_correct = compiled(loss_and_correct, compile, compile_mode)
        self.step_parts = StepParts(self.model, self.forward_model, self.loss_and_correct, self.optimizer,
                                    self.autocast, label_smoothing, self.scaler)
        if make_step is not None:
            self.step: TrainStep = make_step(self.step_parts)
        elif graphs is not None:
            self.step = GraphedStep(self.step_parts, graphs, stream=self.graph_stream)
        else:
            self.step = EagerStep(self.step_parts)

    @property
    def graph_status(self) -> str:
        """"off", "on" (not captured yet), "captured", or why capture failed (training then runs eagerly)."""
        return self.step.status

    @property
    def cuda_graph(self) -> bool:
        """Whether steps run as a whole-step graph: asked for, and not fallen back after a failed capture."""
        return isinstance(self.step, GraphedStep) and not self.step.fallen_back

    def autocast(self, cache_enabled: bool = True):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=cache_enabled)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch, then the schedule's. Returns (loss, correct): the batch's mean loss and
        how many of its predictions were right, 0-dim device tensors, without synchronizing.

        With ``cuda_graph``, the first batch's shape is captured as a CUDA graph and every batch of that shape
        replays it (the returned tensors are the graph's: valid until the next step); others run eagerly."""
        result = self.step(images, labels)
        if self.scheduler is not None:
            self.scheduler.step()  # on the host; with a graph it overwrites the lr tensor in place, between replays
        return result

    def eager_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step, op by op, whichever step the trainer runs, then the schedule's."""
        result = EagerStep(self.step_parts)(images, labels)
        if self.scheduler is not None:
            self.scheduler.step()
        return result

    def train_epoch(self, loader, *, progress: EpochProgress | None = None, bar=None,
                    on_batch=None, eval_every: int = 0, on_eval=None, check_loss: bool = True) -> EpochStats:
        """Train over ``loader`` (already set to its epoch). ``progress`` carries the sums of an epoch resumed
        in the middle; ``bar`` is a tqdm bar or None; ``on_batch(progress)`` runs after each step.

        ``check_loss``: raise TrainingDivergedError when this process's loss is NaN or infinite (at each bar
        refresh and at the end). Data parallel passes False: one rank raising alone would leave the others waiting
        in an all-reduce, so ranks agree on divergence together (fastcnn.train.StopAgreement) instead.

        With ``eval_every`` > 0, ``on_eval(progress)`` runs after every ``eval_every``-th batch of the epoch,
        with the clock stopped: its time is not training time (``progress.seconds`` is the training clock).
        """
        self.model.train()
        progress = progress or EpochProgress.start(self.device)
        synchronize(self.device)
        started = time.perf_counter()
        clock_base = progress.seconds
        train_step = self.train_step  # looked up once: a test hook may have replaced it (fastcnn.train)
        with self.step.epoch(loader, progress) as add_to_sums:
            for images, labels in loader:
                loss, correct = train_step(images, labels)
                count = labels.shape[0]
                add_to_sums(loss, correct, count)
                progress.samples += count
                progress.batches += 1
                if bar is not None:
                    bar.update(1)
                    if progress.batches % PROGRESS_REFRESH_STEPS == 0:
                        self._refresh_bar(bar, loss, progress, clock_base + time.perf_counter() - started, check_loss)
                # Evaluate before on_batch (which may stop the run), so a stop never skips a due evaluation.
                if eval_every and on_eval is not None and progress.batches % eval_every == 0 and \
                        progress.batches < len(loader):
                    synchronize(self.device)
                    paused = time.perf_counter()
                    progress.seconds = clock_base + paused - started
                    on_eval(progress)
                    self.model.train()
                    synchronize(self.device)
                    started += time.perf_counter() - paused  # the evaluation's time is not training time
                if on_batch is not None:
                    progress.seconds = clock_base + time.perf_counter() - started
                    on_batch(progress)
        synchronize(self.device)
        progress.seconds = clock_base + time.perf_counter() - started
        stats = progress.finish()
        if check_loss:
            check_finite(stats.loss, "training")
        if bar is not None:
            bar.set_postfix(loss=f"{stats.loss:.4f}", img_s=f"{stats.images_per_second:,.0f}")
        return stats

    @staticmethod
    def _refresh_bar(bar, loss: torch.Tensor, progress: EpochProgress, elapsed: float, check_loss: bool = True) -> None:
        value = float(loss)  # the one sync every PROGRESS_REFRESH_STEPS steps
        if check_loss:
            check_finite(value, "training")
        bar.set_postfix(loss=f"{value:.4f}", img_s=f"{progress.samples / max(elapsed, 1e-9):,.0f}")

    @torch.no_grad()
    def evaluate(self, loader) -> tuple[float, float]:
        """Mean cross-entropy and accuracy (percent) over ``loader``."""
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        samples = 0
        for images, labels in loader:
            with self.autocast():
                logits = self.eval_model(images)
                loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            loss_sum += loss.double()
            correct += count_correct(logits, labels)
            samples += labels.shape[0]
        self.model.train()
        samples = max(samples, 1)
        return float(loss_sum) / samples, 100.0 * int(correct) / samples

    def warm_up(self, batches: list[tuple[torch.Tensor, torch.Tensor]], eval_batches: list, steps: int = 3, *,
                known_kernels: Iterable[KernelTiming] = (), measure_kernels: bool = True,
                agree_on_kernels: Callable[[list[KernelTiming]], list[KernelTiming]] | None = None) -> float:
        """Run ``steps`` training steps on each of ``batches`` and evaluate ``eval_batches``, then put model and
        optimizer back as they were.

        This pays one-time costs (torch.compile, autotuning, cuDNN algorithm search, CUDA graph capture) outside
        the timed epochs; give one batch of each shape an epoch will see (the last one may be smaller), so that
        no recompilation happens on the clock. Returns the seconds it took.

        First, ``kernel="auto"`` layers get the faster implementation for each of these batch shapes, measured
        here (``fastcnn.choose_kernels``) unless ``known_kernels`` has it, except under ``--deterministic``: a
        choice by timing could differ between two runs, and so could their rounding; those runs keep auto's
        default. Data parallel: only the rank with ``measure_kernels`` measures, and ``agree_on_kernels`` hands its
        timings to every rank, so that all ranks run the same kernels.
        """
        synchronize(self.device)
        started = time.perf_counter()
        if not torch.are_deterministic_algorithms_enabled():
            timings = []
            if measure_kernels:
                timings = choose_kernels(self.model, [images for images, _ in batches],
                                         [images for images, _ in eval_batches], autocast=self.autocast,
                                         compile=self.compile, known=known_kernels)
            if agree_on_kernels is not None:
                timings = agree_on_kernels(timings)
                apply_choices(self.model, timings)
            self.kernel_timings = timings
        model_state = copy.deepcopy(self.model.state_dict())
        optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        scaler_state = copy.deepcopy(self.scaler.state_dict()) if self.scaler is not None else None
        rng_state = torch.get_rng_state()
        scheduler, self.scheduler = self.scheduler, None  # warm-up steps are not steps of the schedule
        for batch in batches:
            for _ in range(steps):
                self.train_step(*batch)
        if eval_batches:
            self.evaluate(eval_batches)
        self.scheduler = scheduler
        self.step.restore(model_state, optimizer_state)  # in place when a captured graph keeps pointers to them
        if scaler_state is not None:
            self.scaler.load_state_dict(scaler_state)
        torch.set_rng_state(rng_state)
        synchronize(self.device)
        return time.perf_counter() - started


def placed(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` on ``device``, its parameters channels-last when asked."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def loss_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """float16 needs loss scaling to keep small gradients; bfloat16 has fp32's range and does not."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


def data_parallel(model: nn.Module, device: torch.device, *, for_graph: bool
                  ) -> tuple[DistributedDataParallel, torch.cuda.Stream | None]:
    """``model`` wrapped in DistributedDataParallel, and, ``for_graph``, the side stream it was built in (the graph
    warms up and captures in that same stream: fastcnn.cuda_graph), else None."""
    # "cuda" means this rank's GPU (set by DistributedContext): name it, or DDP would use cuda:0.
    device_ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    if not for_graph:
        return DistributedDataParallel(model, device_ids=device_ids), None
    # PyTorch's CUDA-graphs notes, "Usage with DistributedDataParallel" (NCCL >= 2.9.6): DDP must be built in a side
    # stream for its all-reduces to be captured with the backward pass. Defaults otherwise, as in the notes: every
    # parameter gets a gradient every step (so neither find_unused_parameters nor static_graph), and gradients stay
    # tensors of their own, allocated by the capture (no gradient_as_bucket_view).
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
    torch.cuda.current_stream().wait_stream(stream)
    return wrapped, stream


def compiled(fn: Callable, compile: bool, mode: str) -> Callable:
    """``fn`` through torch.compile when asked, else ``fn`` itself.

    dynamic=False: the epoch's smaller last batch gets a static graph of its own (compiled in warm-up). Left
    automatic, it would recompile with a symbolic batch size, and dynamo then tries that newest entry first, so
    every full batch after it would run the dynamic graph."""
    return torch.compile(fn, mode=mode, dynamic=False) if compile else fn


def loss_and_correct(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                     sums: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss (mean cross-entropy) and how many rows of ``logits`` rank their label first.

    ``sums``: (float64 loss sum, int64 count of right predictions) to add this batch to, as the epoch loop does
    (loss times batch size, in float64): a CUDA graph's step keeps the epoch's sums itself, in these kernels."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    correct = count_correct(logits.detach(), labels)
    if sums is not None:
        loss_sum, correct_sum = sums
        loss_sum.add_(loss.detach(), alpha=labels.shape[0])
        correct_sum.add_(correct)
    return loss, correct


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many rows of ``logits`` rank their label first (a 0-dim int64 device tensor)."""
    return (logits.argmax(1) == labels).sum()


def check_finite(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise TrainingDivergedError(f"the {where} loss became {value}; lower --lr (or, with float16, use "
                                    "--amp-dtype bfloat16 or --no-amp)")

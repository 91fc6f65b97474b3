"""The training step, epoch loop and evaluation: one implementation for every preset.

What the fast path changes is set up once here (autocast, channels-last, torch.compile, the fused kernel
inside the model); the loop itself never synchronizes with the device except to refresh the progress bar and
to read the clock, so on a GPU the host runs ahead of the kernels.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fastcnn.errors import TrainingDivergedError

if TYPE_CHECKING:
    from fastcnn.kernel_choice import KernelTiming

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

    ``model`` is moved to the device (and to channels-last when asked) before the optimizer is built over its
    parameters; ``compile`` wraps the model with torch.compile (the step's forward and backward compile).
    """

    def __init__(self, model: nn.Module, *, device: torch.device, opt: str = "adam", lr: float = 1e-3,
                 amp_dtype: torch.dtype | None = None, channels_last: bool = False, compile: bool = False,
                 compile_mode: str = "default", betas: tuple[float, float] | None = None,
                 label_smoothing: float = 0.0, schedule: str = "constant", total_steps: int = 0,
                 distributed: bool = False, cuda_graph: bool = False, fused_optimizer: bool = False):
        self.device = device
        self.model = model.to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # As fastcnn.config.cuda_graph_conflict refuses them for the CLI: a replayed step would skip float16's loss
        # scaling (the scaler checks for infinities on the host), and SGD reads a tensor lr on the host.
        if cuda_graph and amp_dtype == torch.float16:
            raise ValueError("CUDA graphs cannot capture float16 training (its GradScaler syncs with the host "
                             "every step); use amp_dtype=torch.bfloat16 or no autocast")
        if cuda_graph and opt != "adam":
            raise ValueError(f"CUDA graphs need opt='adam' (capturable); {opt!r} reads the lr on the host")
        if cuda_graph and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.cuda_graph = cuda_graph
        # "off", "on" (not captured yet), "captured", or why capture failed (training then runs eagerly)
        self.graph_status = "on" if cuda_graph else "off"
        self.compile = compile
        self.kernel_timings = []  # fastcnn.kernel_choice.KernelTiming per measured call, filled by warm_up
        self.graphed_step = None  # captured at the first full batch (fastcnn.cuda_graph.GraphedTrainStep)
        self.replayed_last_step = False  # whether the last train_step was a graph replay
        self.optimizer = build_optimizer(opt, self.model.parameters(), lr, betas,
                                         capturable_on=device if cuda_graph else None, fused=fused_optimizer)
        self.scheduler = build_schedule(schedule, self.optimizer, lr, total_steps)
        self.label_smoothing = label_smoothing
        self.amp_dtype = amp_dtype
        # float16 needs loss scaling to keep small gradients; bfloat16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        train_model = self.model
        self.distributed = distributed
        self.graph_stream = None  # with cuda_graph and distributed: the stream DDP was built in (capture's too)
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            # "cuda" means this rank's GPU (set by DistributedContext): name it, or DDP would use cuda:0.
            device_ids = [torch.cuda.current_device()] if device.type == "cuda" else None
            if cuda_graph:
                # PyTorch's CUDA-graphs notes, "Usage with DistributedDataParallel" (NCCL >= 2.9.6): DDP must be
                # built in a side stream for its all-reduces to be captured with the backward pass. The graph
                # warms up and captures in this same stream (fastcnn.cuda_graph). Defaults otherwise, as in the
                # notes: every parameter gets a gradient every step (so neither find_unused_parameters nor
                # static_graph), and gradients stay tensors of their own, allocated by the capture (no
                # gradient_as_bucket_view).
                self.graph_stream = torch.cuda.Stream()
                self.graph_stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.graph_stream):
                    train_model = DistributedDataParallel(self.model, device_ids=device_ids)
                torch.cuda.current_stream().wait_stream(self.graph_stream)
            else:
                train_model = DistributedDataParallel(self.model, device_ids=device_ids)
        # dynamic=False: the epoch's smaller last batch gets a static graph of its own (compiled in warm-up).
        # Left automatic, it would recompile with a symbolic batch size, and dynamo then tries that newest entry
        # first, so every full batch after it would run the dynamic graph.
        self.forward_model = torch.compile(train_model, mode=compile_mode, dynamic=False) if compile else train_model
        # Evaluation runs on the plain module: no gradient buckets to sync, same weights on every rank.
        self.eval_model = self.forward_model if not distributed else (
            torch.compile(self.model, mode=compile_mode, dynamic=False) if compile else self.model)
        # The loss and the count of right predictions, compiled too: eager, they are about ten small kernels per
        # step on a GPU (cast, log-softmax, NLL, argmax, compare, sum; four more backward), which Inductor fuses
        # into a few. Compiled apart from the model, so that a DistributedDataParallel model is compiled as torch
        # documents it, alone.
        self.loss_and_correct = torch.compile(loss_and_correct, mode=compile_mode, dynamic=False) if compile \
            else loss_and_correct

    def autocast(self, cache_enabled: bool = True):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=cache_enabled)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch. Returns (loss, correct): the batch's mean loss and how many of its
        predictions were right, 0-dim device tensors, without synchronizing.

        With ``cuda_graph``, the first batch's shape is captured as a CUDA graph and every batch of that shape
        replays it (the returned tensors are the graph's: valid until the next step); others run eagerly."""
        self.replayed_last_step = False
        if not self.cuda_graph:
            return self.eager_step(images, labels)
        if self.graphed_step is None:
            from fastcnn.cuda_graph import GraphedTrainStep

            try:
                self.graphed_step = GraphedTrainStep(self, images, labels)
            except Exception as failure:  # any capture failure: train on, eagerly, and say so
                if self.distributed:
                    # Not with several processes: the other ranks' warm-up and captured all-reduces would no
                    # longer pair with this rank's eager ones. Fail; torchrun then stops every worker.
                    raise RuntimeError(f"the CUDA graph capture failed on this rank ({type(failure).__name__}: "
                                       f"{failure}); rerun with --no-cuda-graph") from failure
                self._capture_failed(failure)
                return self.eager_step(images, labels)
            self.graph_status = "captured"
        if not self.graphed_step.accepts(images, labels):
            return self.eager_step(images, labels)
        self.replayed_last_step = True
        result = self.graphed_step.replay(images, labels)
        if self.scheduler is not None:
            self.scheduler.step()  # on the host, outside the graph: it overwrites the lr tensor in place
        return result

    def _capture_failed(self, failure: Exception) -> None:
        """Whole-step graphs are a speed option: when capture fails in a single-process run, the run goes on with
        eager steps (same results, slower), and says so once here and in its summary (``graph_status``)."""
        self.cuda_graph = False
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)  # let what the warm-up queued finish before eager steps
            except RuntimeError:
                pass
        reason = f"{type(failure).__name__}: {' '.join(str(failure).split())[:300]}"
        self.graph_status = f"capture failed ({reason}); eager steps"
        print(f"fastcnn: warning: the CUDA graph capture failed ({reason}); training goes on without it",
              file=sys.stderr)

    def eager_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step, op by op."""
        with self.autocast():
            logits = self.forward_model(images)
            loss, correct = self.loss_and_correct(logits, labels, self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.detach(), correct

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
        serving_into_graph = sums_in_graph = False
        try:
            for images, labels in loader:
                loss, correct = self.train_step(images, labels)
                count = labels.shape[0]
                if not (sums_in_graph and self.replayed_last_step):
                    # Two in-place adds (float64 sum of loss * count, as loss.double() * count would round); a
                    # replayed step has made them in its graph once the epoch's sums are the graph's own.
                    progress.loss_sum.add_(loss, alpha=count)
                    progress.correct.add_(correct)
                graph = self.graphed_step
                if graph is not None and not sums_in_graph:
                    # From the next step on, a replay launches nothing else: the loader gathers straight into the
                    # graph's inputs (no copies), and the graph adds to the epoch's sums (no adds).
                    if hasattr(loader, "serve_into"):
                        serving_into_graph = loader.serve_into(graph.static_images, graph.static_labels)
                    graph.loss_sum.copy_(progress.loss_sum)
                    graph.correct_sum.copy_(progress.correct)
                    progress.loss_sum, progress.correct = graph.loss_sum, graph.correct_sum
                    sums_in_graph = True
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
        finally:
            if serving_into_graph:
                loader.serve_into(None)  # the loader serves new tensors again, to whoever iterates it next
            if sums_in_graph:  # the epoch's sums, apart from the graph's (later replays add to those)
                progress.loss_sum, progress.correct = progress.loss_sum.clone(), progress.correct.clone()
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
            from fastcnn.kernel_choice import apply_choices, choose_kernels

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
        self.model.load_state_dict(model_state)  # copies in place: a captured graph keeps its pointers
        if self.graphed_step is not None:
            from fastcnn.cuda_graph import restore_optimizer_in_place

            restore_optimizer_in_place(self.optimizer, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)  # replaces the state, so warm-up's moments go too
        if scaler_state is not None:
            self.scaler.load_state_dict(scaler_state)
        torch.set_rng_state(rng_state)
        synchronize(self.device)
        return time.perf_counter() - started


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

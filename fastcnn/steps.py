"""The training step as a strategy, chosen once when a Trainer is built.

Two steps with one interface (``TrainStep``), which the epoch loop (fastcnn.engine.Trainer.train_epoch) calls
without knowing which one it has:
- ``EagerStep``: forward, loss, backward and optimizer step, op by op, on any device;
- ``GraphedStep``: the same step recorded once, at the first batch, on buffers of its own (a CUDA graph:
  fastcnn.cuda_graph) and replayed for every batch shaped like that one; a batch of another shape (the last,
  smaller batch of an epoch) runs eagerly on the same parameters and optimizer state.

``graph_policy`` decides once whether a trainer's step is graphed, and how: it refuses what a graph cannot
capture; with several processes a failed capture fails the run, while a single process goes on with eager steps
(same results, slower) and says so.

Around an epoch, ``step.epoch(loader, progress)`` hands the loop the function that adds each step to the epoch's
running sums. The eager step adds them. The graphed step, once captured, has its graph add to the epoch's sums
itself and, when the loader offers it (``ServesIntoStaticInputs``), has the loader gather each full batch straight
into the graph's inputs: a replayed step is then two gathers and the replay, and nothing else.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from fastcnn.cuda_graph import DDP_WARMUP_STEPS, WARMUP_STEPS, capture_cuda_graph, restore_optimizer_in_place

StepOutputs = tuple[torch.Tensor, torch.Tensor]  # (the batch's mean loss, its count of right predictions)
AddToSums = Callable[[torch.Tensor, torch.Tensor, int], None]  # (loss, correct, batch size) -> None


@dataclass(frozen=True)
class StepParts:
    """What a training step computes with, as the Trainer built it."""

    model: nn.Module  # the plain module: the state a warm-up or a capture puts back
    forward_model: Callable[[torch.Tensor], torch.Tensor]  # what the step calls: the model, maybe DDP and compiled
    loss_and_correct: Callable  # fastcnn.engine.loss_and_correct, maybe compiled
    optimizer: torch.optim.Optimizer
    autocast: Callable[..., AbstractContextManager]  # fastcnn.engine.Trainer.autocast
    label_smoothing: float = 0.0
    scaler: torch.amp.GradScaler | None = None  # float16's loss scaling


class RunningSums(Protocol):
    """An epoch's running sums on the device (fastcnn.engine.EpochProgress)."""

    loss_sum: torch.Tensor  # float64: the sum of each batch's mean loss times its size
    correct: torch.Tensor  # int64


class TrainStep(Protocol):
    """What a Trainer asks of its training step."""

    status: str  # for summaries: "off" (eager), "on" (graphed, not captured yet), "captured", or why capture failed

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutputs:
        """One optimizer step (the learning-rate schedule's step is the Trainer's): the batch's mean loss and
        count of right predictions, 0-dim device tensors, without synchronizing."""

    def epoch(self, loader, progress: RunningSums) -> AbstractContextManager[AddToSums]:
        """Around one epoch over ``loader``: the function that adds each step's outputs to ``progress``."""

    def restore(self, model_state: dict, optimizer_state: dict) -> None:
        """Put model and optimizer back to these state dicts (after a warm-up)."""


class ServesIntoStaticInputs(Protocol):
    """A loader that can gather its batches into tensors it is given (fastcnn.data.DeviceLoader does)."""

    def serve_into(self, images: torch.Tensor | None, labels: torch.Tensor | None = None) -> bool:
        """From the next batch on, gather every full batch into ``images`` and ``labels`` and yield those very
        tensors; ``None`` goes back to new tensors. Returns whether it will."""


def serve_into(loader, images: torch.Tensor | None, labels: torch.Tensor | None = None) -> bool:
    """Have ``loader`` serve into these tensors when it is a ``ServesIntoStaticInputs``; whether it will.

    Looked up by name, not by ``isinstance`` against a runtime-checkable protocol: from Python 3.12 that check reads
    attributes statically and would miss a wrapper that forwards the method (fastcnn.profiling.FirstBatches)."""
    method = getattr(loader, "serve_into", None)
    return bool(method(images, labels)) if method is not None else False


def add_to_sums(progress: RunningSums, loss: torch.Tensor, correct: torch.Tensor, count: int) -> None:
    # Two in-place adds on the device: float64 loss * count (as loss.double() * count would round), and the count.
    progress.loss_sum.add_(loss, alpha=count)
    progress.correct.add_(correct)


class EagerStep:
    """One optimizer step, op by op."""

    status = "off"

    def __init__(self, parts: StepParts):
        self.parts = parts
        # Read on every step: kept as attributes of their own.
        self.forward_model, self.loss_and_correct = parts.forward_model, parts.loss_and_correct
        self.optimizer, self.scaler, self.autocast = parts.optimizer, parts.scaler, parts.autocast
        self.label_smoothing = parts.label_smoothing

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutputs:
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
        return loss.detach(), correct

    def epoch(self, loader, progress: RunningSums) -> AbstractContextManager[AddToSums]:
        return nullcontext(functools.partial(add_to_sums, progress))

    def restore(self, model_state: dict, optimizer_state: dict) -> None:
        self.parts.model.load_state_dict(model_state)
        self.parts.optimizer.load_state_dict(optimizer_state)  # replaces the state, so warm-up's moments go too


@dataclass(frozen=True)
class GraphPolicy:
    """How a graphed step is captured, and what a failed capture does (``graph_policy`` decides)."""

    warmup_steps: int = WARMUP_STEPS  # eager steps before capture (autotuning and compilation stay out of the graph)
    fail_on_capture_failure: bool = False  # True: raise; False: go on with eager steps and say so


def graph_policy(cuda_graph: bool, *, device: torch.device, amp_dtype: torch.dtype | None, opt: str,
                 distributed: bool = False) -> GraphPolicy | None:
    """Whether a trainer's step is a ``GraphedStep`` (None: an ``EagerStep``) and how it runs, decided once,
    before the trainer builds anything (data parallel builds DDP differently for a graph).

    Refused (ValueError), as fastcnn.config.cuda_graph_conflict refuses them for the CLI: float16 (a replayed step
    would skip its loss scaling: the GradScaler checks for infinities on the host every step), an optimizer other
    than Adam (SGD reads a tensor learning rate on the host), a device other than CUDA. With several processes the
    graph holds DDP's all-reduces: PyTorch's CUDA-graphs notes ask for 11 eager DDP iterations before capture, and a
    capture that fails on one rank fails the run, since its eager all-reduces would no longer pair with the other
    ranks' captured ones (torchrun then stops every worker)."""
    if not cuda_graph:
        return None
    if amp_dtype == torch.float16:
        raise ValueError("CUDA graphs cannot capture float16 training (its GradScaler syncs with the host "
                         "every step); use amp_dtype=torch.bfloat16 or no autocast")
    if opt != "adam":
        raise ValueError(f"CUDA graphs need opt='adam' (capturable); {opt!r} reads the lr on the host")
    if device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device")
    if distributed:
        return GraphPolicy(warmup_steps=max(WARMUP_STEPS, DDP_WARMUP_STEPS), fail_on_capture_failure=True)
    return GraphPolicy()


class CapturedStep:
    """The training step on buffers of its own, recorded once by ``record`` for batches shaped like the sample.

    Its buffers: the inputs (a batch is copied in, unless the loader gathered it there), the outputs (the loss and
    the count of right predictions, valid until the next replay) and the epoch's running sums, which every replay
    adds to (``loss_sum``, ``correct_sum``: a graphed epoch adopts them as its own)."""

    def __init__(self, parts: StepParts, images: torch.Tensor, labels: torch.Tensor,
                 record: Callable[[Callable[[], StepOutputs]], Callable[[], StepOutputs]]):
        self.parts = parts
        self.static_images = images.detach().clone(memory_format=torch.preserve_format)
        self.static_labels = labels.detach().clone()
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
        self.correct_sum = torch.zeros((), dtype=torch.int64, device=images.device)
        self._replay = record(self._run)

    def _run(self) -> StepOutputs:
        parts = self.parts
        # No autocast weight cache: inside a caller's outer autocast, casts cached before capture would be baked
        # into the graph and never see the parameters' updates.
        with parts.autocast(cache_enabled=False):
            logits = parts.forward_model(self.static_images)
            loss, correct = parts.loss_and_correct(logits, self.static_labels, parts.label_smoothing,
                                                   (self.loss_sum, self.correct_sum))
        loss.backward()
        parts.optimizer.step()
        return loss.detach(), correct

    def accepts(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        """Whether this batch fits the buffers (same shapes, strides and dtypes)."""
        ref_x, ref_y = self.static_images, self.static_labels
        return (images.shape == ref_x.shape and images.stride() == ref_x.stride() and images.dtype == ref_x.dtype
                and labels.shape == ref_y.shape and labels.dtype == ref_y.dtype)

    def replay(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutputs:
        # A loader that serves into the static inputs hands back these very tensors: nothing to copy.
        if images is not self.static_images:
            self.static_images.copy_(images)
        if labels is not self.static_labels:
            self.static_labels.copy_(labels)
        return self._replay()


class GraphedStep:
    """The whole step (forward, loss, backward, optimizer step) captured at the first batch and replayed for every
    batch shaped like it; other batches, and every batch after a failed capture that ``policy`` lets the run
    survive, run as an ``EagerStep`` on the same parameters and optimizer state.

    ``record`` turns the step on the static buffers (a function of no arguments) into its replay (a function of no
    arguments that runs it again and returns its outputs). Default: a CUDA graph
    (fastcnn.cuda_graph.capture_cuda_graph), warmed up as ``policy`` says, in ``stream`` when given (the stream DDP
    was built in); any other recorder works on any device."""

    def __init__(self, parts: StepParts, policy: GraphPolicy | None = None, *,
                 record: Callable[[Callable[[], StepOutputs]], Callable[[], StepOutputs]] | None = None,
                 stream: torch.cuda.Stream | None = None):
        self.parts, self.policy = parts, policy or GraphPolicy()
        self.eager = EagerStep(parts)
        self.record = record or functools.partial(capture_cuda_graph, model=parts.model, optimizer=parts.optimizer,
                                                  warmup_steps=self.policy.warmup_steps, stream=stream)
        self.captured: CapturedStep | None = None
        self.fallen_back = False  # capture failed: every step is eager from then on
        self.replayed_last = False  # whether the last step was a replay (the graph then added to its own sums)
        self.status = "on"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutputs:
        self.replayed_last = False
        if self.captured is None and not self.fallen_back:
            self._capture(images, labels)
        captured = self.captured
        if captured is None or not captured.accepts(images, labels):
            return self.eager(images, labels)
        self.replayed_last = True
        return captured.replay(images, labels)

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        try:
            self.captured = CapturedStep(self.parts, images, labels, self.record)
        except Exception as failure:  # any capture failure: the policy says whether the run survives it
            if self.policy.fail_on_capture_failure:
                raise RuntimeError(f"the CUDA graph capture failed on this rank ({type(failure).__name__}: "
                                   f"{failure}); rerun with --no-cuda-graph") from failure
            self._fall_back(failure, images.device)
            return
        self.status = "captured"

    def _fall_back(self, failure: Exception, device: torch.device) -> None:
        """Whole-step graphs are a speed option: the run goes on with eager steps (same results, slower), and says
        so once here and in its summary (``status``)."""
        self.fallen_back = True
        if device.type == "cuda":
            try:
                torch.cuda.synchronize(device)  # let what the warm-up queued finish before eager steps
            except RuntimeError:
                pass
        reason = f"{type(failure).__name__}: {' '.join(str(failure).split())[:300]}"
        self.status = f"capture failed ({reason}); eager steps"
        print(f"fastcnn: warning: the CUDA graph capture failed ({reason}); training goes on without it",
              file=sys.stderr)

    def epoch(self, loader, progress: RunningSums) -> AbstractContextManager[AddToSums]:
        return GraphedEpoch(self, loader, progress)

    def restore(self, model_state: dict, optimizer_state: dict) -> None:
        if self.captured is None:
            self.eager.restore(model_state, optimizer_state)
            return
        self.parts.model.load_state_dict(model_state)  # copies in place: the graph keeps its pointers
        restore_optimizer_in_place(self.parts.optimizer, optimizer_state)


class GraphedEpoch:
    """One epoch of a ``GraphedStep``: from the first step after capture, the graph's sums are the epoch's and the
    loader serves into the graph's inputs; at the end the loader is let go and the epoch keeps sums of its own
    (later replays add to the graph's)."""

    def __init__(self, step: GraphedStep, loader, progress: RunningSums):
        self.step, self.loader, self.progress = step, loader, progress
        self.sums_in_graph = self.serving_into_graph = False

    def __enter__(self) -> AddToSums:
        return self.add

    def add(self, loss: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        progress, step = self.progress, self.step
        if not (self.sums_in_graph and step.replayed_last):  # a replay has added to the adopted sums itself
            add_to_sums(progress, loss, correct, count)
        captured = step.captured
        if captured is not None and not self.sums_in_graph:
            # From the next step on, a replay launches nothing else: the loader gathers straight into the graph's
            # inputs (no copies), and the graph adds to the epoch's sums (no adds).
            self.serving_into_graph = serve_into(self.loader, captured.static_images, captured.static_labels)
            captured.loss_sum.copy_(progress.loss_sum)
            captured.correct_sum.copy_(progress.correct)
            progress.loss_sum, progress.correct = captured.loss_sum, captured.correct_sum
            self.sums_in_graph = True

    def __exit__(self, *exc_info) -> None:
        if self.serving_into_graph:
            serve_into(self.loader, None)  # new tensors again, for whoever iterates the loader next
        if self.sums_in_graph:
            progress = self.progress
            progress.loss_sum, progress.correct = progress.loss_sum.clone(), progress.correct.clone()

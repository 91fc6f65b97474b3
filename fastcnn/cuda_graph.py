"""Whole-step CUDA graphs: forward, loss, backward and optimizer step captured once, replayed for every batch.

A training step of a small CNN launches dozens of small kernels; on a fast GPU the host's launch overhead, not
the arithmetic, sets the pace. Replaying one captured graph launches them all at once. This module captures
(``capture_cuda_graph``) and restores optimizer state in place; the step that uses it is fastcnn.steps.GraphedStep.
What capture needs, and how it is met:
- static memory: each batch is copied into the graph's own input buffers (DALI batches are memory DALI reuses),
  and the outputs (loss, number of right predictions) live in the graph's buffers until the next replay;
- nothing launched around a replay in the epoch loop (fastcnn.steps.GraphedEpoch): a DeviceLoader gathers
  its full batches straight into the input buffers (``serve_into``, no copies), and the graph adds each step's
  loss and right predictions to the epoch's running sums itself (no adds), so a step is two gathers and a replay;
- no host synchronization inside the step: the optimizer is built with ``capturable=True`` and a learning rate
  that is a device tensor, which schedules overwrite in place between replays, so a schedule needs no recapture;
- one shape: a batch of another shape (the last, smaller batch of an epoch) runs eagerly on the same
  parameters and optimizer state;
- warm-up before capture, on a side stream, so that cuDNN/Triton autotuning and torch.compile happen outside the
  graph; the warm-up's effect on parameters and optimizer state is undone in place (the graph keeps pointers).

With DistributedDataParallel the graph holds the gradient all-reduces too (NCCL >= 2.9.6 can be captured), set up
as PyTorch's CUDA-graphs notes ("Usage with DistributedDataParallel") ask: asynchronous NCCL error handling off
before the process group exists (fastcnn.distributed), DDP built in a side stream (fastcnn.engine.data_parallel), and
at least 11 DDP-enabled eager iterations before capture (``DDP_WARMUP_STEPS``); warm-up and capture run in the
stream DDP was built in. This is written but not yet run on a GPU.

The configuration (fastcnn.config) and the Trainer (fastcnn.steps.graph_policy) refuse what cannot be captured:
float16 with a GradScaler (it checks for infinities on the host every step), SGD with a tensor learning rate (read
on the host), and, in the configuration, compile modes that make graphs of their own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

WARMUP_STEPS = 3
DDP_WARMUP_STEPS = 11  # PyTorch's notes: DDP needs at least 11 eager iterations (its first ones do host work)


def capture_cuda_graph(run_step: Callable[[], tuple[torch.Tensor, torch.Tensor]], *, model: nn.Module,
                       optimizer: torch.optim.Optimizer, warmup_steps: int = WARMUP_STEPS,
                       stream: torch.cuda.Stream | None = None) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """``run_step`` (the training step on static buffers: no arguments, returns its outputs) captured as a CUDA
    graph; returns its replay: a function that replays the graph and returns the captured call's outputs (the
    graph's own tensors, rewritten by every replay).

    First ``warmup_steps`` eager runs on a side stream, undone in place afterwards (``run_then_undo``), so that
    autotuning and torch.compile happen outside the graph and capture starts from the caller's state. With
    DistributedDataParallel, ``stream`` is the stream DDP was built in: its gradient hooks run there, and warm-up and
    capture in that one stream keep the capture from spanning two. A failed capture changes nothing: captured
    kernels do not run, so parameters and optimizer state stay as they were."""
    side = stream if stream is not None else torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            run_then_undo(run_step, warmup_steps, model=model, optimizer=optimizer)
    finally:  # also when warm-up fails: the caller then goes on eagerly, after what the side stream queued
        torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    caller_stream = torch.cuda.current_stream()
    try:
        # thread_local: only this thread's capture-unsafe CUDA calls fail the capture. In the default "global"
        # mode a call from any thread does, and a DALI pipeline's worker threads (which can still be releasing a
        # batch) have ended processes that way (DALI#3703); Inductor's own CUDA graphs capture thread_local too.
        with torch.cuda.graph(graph, stream=stream,  # None: torch's own capture stream
                              capture_error_mode="thread_local"):
            outputs = run_step()
    except BaseException as failure:
        # When capture_end() itself raises (an invalidated capture), torch.cuda.graph never leaves its stream
        # context: put the caller's stream back, so that later eager work does not run on the capture stream.
        torch.cuda.set_stream(caller_stream)
        cause = failure.__context__  # an invalidated capture hides the error that invalidated it
        if cause is not None and not isinstance(failure, KeyboardInterrupt):
            raise RuntimeError(f"{type(cause).__name__}: {cause} (then {type(failure).__name__}: "
                               f"{failure})") from failure
        raise
    torch.cuda.synchronize()

    def replay() -> tuple[torch.Tensor, torch.Tensor]:
        graph.replay()
        return outputs

    return replay


def run_then_undo(run_step: Callable[[], object], steps: int, *, model: nn.Module,
                  optimizer: torch.optim.Optimizer) -> None:
    """Run ``run_step`` ``steps`` times (gradients set to None before each), then put the model's parameters and
    buffers and the optimizer's state back in place, the same tensors (a graph captured next reads and writes
    them), also when a step fails. Gradients end as None, so that the next backward (the captured one) allocates
    its own. Stream order is the caller's: the snapshot, the steps and the undo all run in the current stream."""
    model_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    optimizer_state = snapshot_optimizer(optimizer)
    try:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            run_step()
    finally:
        with torch.no_grad():
            for key, value in model.state_dict().items():
                value.copy_(model_state[key])
        restore_optimizer_in_place(optimizer, optimizer_state)
        optimizer.zero_grad(set_to_none=True)


def snapshot_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    """A deep copy of ``optimizer.state_dict()`` (for ``restore_optimizer_in_place``)."""
    state = optimizer.state_dict()

    def copied(values: dict) -> dict:  # state_dict() hands out the live tensors (the lr tensor of a group too)
        return {n: (v.detach().clone() if torch.is_tensor(v) else v) for n, v in values.items()}

    return {"state": {k: copied(s) for k, s in state["state"].items()},
            "param_groups": [copied(group) for group in state["param_groups"]]}


def restore_optimizer_in_place(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Put an optimizer back to ``saved`` (a state_dict) without replacing its tensors, which a captured graph
    reads and writes. State created since ``saved`` is zeroed: that is a fresh optimizer's state."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with torch.no_grad():
        for index, param in enumerate(params):
            before = saved["state"].get(index, {})
            for key, value in optimizer.state.get(param, {}).items():
                if not torch.is_tensor(value):
                    continue
                if key in before:
                    value.copy_(before[key])
                else:
                    value.zero_()
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
            for key, value in saved_group.items():
                if key == "params":
                    continue
                if torch.is_tensor(group.get(key)):
                    group[key].copy_(value if torch.is_tensor(value) else torch.tensor(value))
                else:
                    group[key] = value

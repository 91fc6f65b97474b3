"""Whole-step CUDA graphs: forward, loss, backward and optimizer step captured once, replayed for every batch.

A training step of a small CNN launches dozens of small kernels; on a fast GPU the host's launch overhead, not
the arithmetic, sets the pace. Replaying one captured graph launches them all at once. What capture needs, and
how it is met here:
- static memory: each batch is copied into the graph's own input buffers (DALI batches are memory DALI reuses),
  and the outputs (loss, number of right predictions) live in the graph's buffers until the next replay;
- nothing launched around a replay in the epoch loop (fastcnn.engine.Trainer.train_epoch): a DeviceLoader gathers
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
before the process group exists (fastcnn.distributed), DDP built in a side stream (fastcnn.engine.Trainer), and
at least 11 DDP-enabled eager iterations before capture (``DDP_WARMUP_STEPS``); warm-up and capture run in the
stream DDP was built in. This is written but not yet run on a GPU.

The configuration refuses what cannot be captured: float16 with a GradScaler (it checks for infinities on the
host every step), SGD with a tensor learning rate (read on the host), and compile modes that make graphs of
their own.
"""

from __future__ import annotations

import torch

WARMUP_STEPS = 3
DDP_WARMUP_STEPS = 11  # PyTorch's notes: DDP needs at least 11 eager iterations (its first ones do host work)


class GraphedTrainStep:
    """The training step of ``trainer`` (a fastcnn.engine.Trainer) captured for batches shaped like the sample."""

    def __init__(self, trainer, images: torch.Tensor, labels: torch.Tensor, warmup_steps: int = WARMUP_STEPS):
        self.trainer = trainer
        self.static_images = images.detach().clone(memory_format=torch.preserve_format)
        self.static_labels = labels.detach().clone()
        # The epoch's running sums (loss * batch size, right predictions), added to by every replay: the epoch loop
        # adopts them (fastcnn.engine.Trainer.train_epoch), so that a replayed step needs no adds of its own.
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
        self.correct_sum = torch.zeros((), dtype=torch.int64, device=images.device)
        model_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        optimizer_state = snapshot_optimizer(trainer.optimizer)
        # DistributedDataParallel: warm up and capture in the stream DDP was built in (its gradient hooks run
        # there; one stream keeps the capture from spanning two), after its 11 eager iterations. Every rank runs
        # the same steps here, so their all-reduces pair up.
        ddp_stream = getattr(trainer, "graph_stream", None)
        if getattr(trainer, "distributed", False):
            warmup_steps = max(warmup_steps, DDP_WARMUP_STEPS)
        self.warmup_steps = warmup_steps
        side = ddp_stream if ddp_stream is not None else torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(warmup_steps):
                    trainer.optimizer.zero_grad(set_to_none=True)
                    self._step()
        finally:  # also when warm-up fails: the trainer then goes on eagerly from the caller's state
            torch.cuda.current_stream().wait_stream(side)
            # Undo the warm-up in place (same tensors), so that capture starts from the caller's state.
            with torch.no_grad():
                for key, value in trainer.model.state_dict().items():
                    value.copy_(model_state[key])
            restore_optimizer_in_place(trainer.optimizer, optimizer_state)
            trainer.optimizer.zero_grad(set_to_none=True)  # backward inside the graph allocates its own .grad
        # A failed capture changes nothing: captured kernels do not run, so parameters and optimizer state stay.
        self.graph = torch.cuda.CUDAGraph()
        caller_stream = torch.cuda.current_stream()
        try:
            # thread_local: only this thread's capture-unsafe CUDA calls fail the capture. In the default "global"
            # mode a call from any thread does, and a DALI pipeline's worker threads (which can still be releasing a
            # batch) have ended processes that way (DALI#3703); Inductor's own CUDA graphs capture thread_local too.
            with torch.cuda.graph(self.graph, stream=ddp_stream,  # None: torch's own capture stream
                                  capture_error_mode="thread_local"):
                self.static_loss, self.static_correct = self._step()
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

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        trainer = self.trainer
        # No autocast weight cache: inside a caller's outer autocast, casts cached before capture would be baked
        # into the graph and never see the parameters' updates.
        with trainer.autocast(cache_enabled=False):
            logits = trainer.forward_model(self.static_images)
            loss, correct = trainer.loss_and_correct(logits, self.static_labels, trainer.label_smoothing,
                                                     (self.loss_sum, self.correct_sum))
        loss.backward()
        trainer.optimizer.step()
        return loss.detach(), correct

    def accepts(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        """Whether this batch fits the captured buffers (same shapes, strides and dtypes)."""
        ref_x, ref_y = self.static_images, self.static_labels
        return (images.shape == ref_x.shape and images.stride() == ref_x.stride() and images.dtype == ref_x.dtype
                and labels.shape == ref_y.shape and labels.dtype == ref_y.dtype)

    def replay(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A loader that serves into the static inputs (DeviceLoader.serve_into) hands back these very tensors.
        if images is not self.static_images:
            self.static_images.copy_(images)
        if labels is not self.static_labels:
            self.static_labels.copy_(labels)
        self.graph.replay()
        return self.static_loss, self.static_correct


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

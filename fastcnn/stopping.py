"""Stopping a run at a step boundary: Ctrl-C and SIGTERM become a flag checked after each step, and with several
processes the ranks agree on stopping and on divergence, so that every rank stops at the same step.

Every rank must make the same collective calls in the same order, or the others wait in an all-reduce forever.
So a rank never stops on its own: it stops, or raises, when ``StopAgreement`` says all of them do.
"""

from __future__ import annotations

import signal

import torch

from fastcnn.distributed import DistributedContext
from fastcnn.engine import PROGRESS_REFRESH_STEPS, EpochProgress, check_finite


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

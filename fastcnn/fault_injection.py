"""Faults a real run meets on one rank only, made reproducible for tests/test_distributed.py inside torchrun's
worker processes, where a test's monkeypatch cannot reach. Unset (any real run), the hook does nothing."""

from __future__ import annotations

import os
import signal

from fastcnn.engine import Trainer
from fastcnn.steps import GraphedStep

TEST_FAULT_ENV = "FASTCNN_TEST_FAULT"


def install_test_fault(trainer: Trainer, rank: int) -> None:
    """``FASTCNN_TEST_FAULT=RANK:STEP:FAULT`` makes rank RANK, at its STEP-th training step in this process, send
    itself FAULT (SIGINT or SIGTERM), or, with FAULT ``nan``, report a NaN loss from that step on (its gradients
    stay finite)."""
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
            step = trainer.step
            if isinstance(step, GraphedStep) and step.replayed_last:  # the graph added it to the epoch's sums itself
                step.captured.loss_sum.fill_(float("nan"))
        elif fault != "nan" and steps == int(fault_step):
            os.kill(os.getpid(), signal.Signals[fault])
        return loss, correct

    trainer.train_step = faulty_step

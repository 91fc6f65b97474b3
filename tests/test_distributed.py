"""Data parallel on CPU (gloo), ranks agreeing on stops and divergence, DDP with CUDA graphs (GPU only), and
deterministic runs."""

import json
import math
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from helpers import requires_cuda

from fastcnn.cli import main
from fastcnn.config import TrainConfig
from fastcnn.distributed import DistributedContext, per_rank_batch_size
from fastcnn.engine import EpochProgress
from fastcnn.errors import TrainingDivergedError, UsageError
from fastcnn.fault_injection import TEST_FAULT_ENV
from fastcnn.launch import (
    COMMAND_ENV,
    exec_torchrun,
    processes_for_resume,
    resume_argv,
    strip_nproc,
    worker_environment,
)
from fastcnn.stopping import Interrupted, StopAgreement, StopRequests

# 4096 samples, global batch 64: 64 steps per epoch, so the ranks agree at step 50 inside an epoch and at its end.
# One kernel for all runs: kernel auto's choice by timing could differ between two of them, and so their rounding.
SUBSET = ["--train-subset", "4096", "--test-subset", "500", "-b", "64", "--no-amp", "--no-progress",
          "--device", "cpu", "--epochs", "2", "--kernel", "aten"]


def fastcnn_train(args, data_root=None, *, fault=None, timeout=300):
    """``fastcnn train ARGS`` in a subprocess; ``fault``: the test hook fastcnn.fault_injection."""
    # No Triton interpreter (conftest sets it for the kernel tests): these runs use the plain chain, which it slows.
    env = {k: v for k, v in os.environ.items() if k not in (TEST_FAULT_ENV, "TRITON_INTERPRET")}
    if data_root is not None:
        env["FASTCNN_DATA"] = str(data_root)
    if fault is not None:
        env[TEST_FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "fastcnn", "train", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_launch(data_root, tmp_path_factory):
    """An uninterrupted two-process run of SUBSET: (its folder, the finished `fastcnn train` process)."""
    ddp = tmp_path_factory.mktemp("ddp") / "run"
    result = fastcnn_train(["--nproc", "2", *SUBSET, "--output", str(ddp)], data_root)
    assert result.returncode == 0, result.stderr[-2000:]
    return ddp, result


@pytest.fixture(scope="module")
def ddp_run(ddp_launch):
    return ddp_launch[0]


def test_two_gloo_processes_match_a_single_process_with_the_same_global_batch(ddp_run, data_root, tmp_path):
    ddp = ddp_run
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "backend": "gloo", "parameters_in_sync": True}
    assert not (ddp / "rank1").exists()
    assert " train --nproc 2 " in summary["command"] and summary["command"].endswith(f"--output {ddp}")

    single = tmp_path / "single"
    result = fastcnn_train([*SUBSET, "--output", str(single)], data_root)
    assert result.returncode == 0, result.stderr[-2000:]
    ddp_state = torch.load(ddp / "checkpoint.pt", weights_only=True)["model"]
    single_state = torch.load(single / "checkpoint.pt", weights_only=True)["model"]
    for key, value in single_state.items():
        # gradients are averaged over ranks in another order than one process sums them: rounding only
        torch.testing.assert_close(ddp_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    single_summary = json.loads((single / "summary.json").read_text())
    assert abs(summary["test_acc"] - single_summary["test_acc"]) <= 0.5
    assert summary["epochs"] == 2 and (ddp / "metrics.jsonl").read_text().count("\n") == 2


def test_a_data_parallel_run_prints_what_one_process_would_and_nothing_of_torchrun(ddp_launch):
    _, result = ddp_launch
    assert result.stderr == "", result.stderr[-2000:]  # no OMP_NUM_THREADS banner, no launch line, no bar (no tty)
    lines = result.stdout.splitlines()
    assert sum(line.startswith("training on mnist") for line in lines) == 1
    assert [line.split()[0] for line in lines if line.split()[:1] in (["1"], ["2"])] == ["1", "2"]  # rank 0's only
    assert sum(line.startswith("simplecnn on mnist: test acc") for line in lines) == 1


def test_a_signal_to_one_rank_stops_both_at_the_same_step_and_resume_matches_an_uninterrupted_run(
        ddp_run, data_root, tmp_path):
    cut = tmp_path / "cut"
    # rank 1 alone gets SIGTERM after its 70th step (epoch 2, batch 6); the ranks agree at batch 50
    result = fastcnn_train(["--nproc", "2", *SUBSET, "--output", str(cut)], data_root, fault="1:70:SIGTERM",
                           timeout=180)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    # rank 0 says it, once, and nothing else does (no traceback, none of torchrun's lines about its workers)
    assert result.stderr.splitlines() == [
        f"fastcnn: interrupted by SIGTERM; checkpoint saved to {cut / 'checkpoint.pt'}; continue with "
        f"`fastcnn train --resume {cut / 'checkpoint.pt'}`"], result.stderr[-2000:]
    state = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) == (1, 50)
    assert state["partial"]["samples"] == 50 * 64  # the sums of both ranks, which stopped at the same step

    # no --nproc: the resumed run keeps the two processes it was trained with (else it could not match bitwise)
    result = fastcnn_train(["--resume", str(cut), "--no-progress"], data_root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"resuming {cut / 'checkpoint.pt'} at epoch 2/2, step 50/64 (114/128 steps done), 2 processes as it "
            "was trained") in result.stdout, result.stdout[-2000:]
    finished = torch.load(cut / "checkpoint.pt", weights_only=True)
    reference = torch.load(ddp_run / "checkpoint.pt", weights_only=True)
    for key, value in reference["model"].items():
        assert torch.equal(finished["model"][key], value), key
    for row, expected in zip(finished["history"], reference["history"], strict=True):
        for key in ("train_loss", "train_acc", "test_acc"):  # the resumed epoch's figures cover all of it
            assert row[key] == pytest.approx(expected[key], rel=1e-9), key
    # Rank 0's curve (a row every 3rd step): the uninterrupted run's rows, and one more at the stop (step 50), after
    # which the next row covers one step instead of three
    stop, after_stop = 1 + 50 / 64, 1 + 51 / 64
    rows, expected_rows = finished["step_losses"], reference["step_losses"]
    assert [row["epoch"] for row in rows] == sorted([row["epoch"] for row in expected_rows] + [stop])
    for row, expected in zip([row for row in rows if row["epoch"] not in (stop, after_stop)],
                             [row for row in expected_rows if row["epoch"] != after_stop], strict=True):
        assert row["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-9), row["epoch"]
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["distributed"] == {"world_size": 2, "backend": "gloo", "parameters_in_sync": True}


def test_nan_on_one_rank_makes_every_rank_stop_with_the_divergence_message(data_root, tmp_path):
    out = tmp_path / "run"
    # rank 1 alone reports NaN losses from its 70th step on (epoch 2); rank 0's stay finite
    result = fastcnn_train(["--nproc", "2", *SUBSET, "--output", str(out)], data_root, fault="1:70:nan",
                           timeout=180)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("fastcnn: error: "), result.stderr[-2000:]  # rank 0, once
    assert "loss became nan" in errors[0] and "epoch 1" in errors[0] and "checkpoint" in errors[0]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "summary.json").exists()


class OtherRank:
    """A DistributedContext stand-in for a world of two: all_max_ combines this rank's flags with ``flags`` of
    the other rank, and counts the agreements."""

    enabled = True

    def __init__(self, signum=0, loss_code=0):
        self.flags = torch.tensor([float(signum), float(loss_code)], dtype=torch.float64)
        self.calls = 0

    def all_max_(self, tensor):
        self.calls += 1
        return tensor.copy_(torch.maximum(tensor, self.flags))


def progress_at(batches, loss_sum=1.0):
    return EpochProgress(torch.tensor(loss_sum, dtype=torch.float64), torch.tensor(0), batches, 0.0, batches)


def test_agreement_happens_every_50_steps_and_at_the_end_of_an_epoch_only():
    other = OtherRank(signum=signal.SIGTERM)
    agreement = StopAgreement(StopRequests(), other, torch.device("cpu"), steps_per_epoch=64)
    for batches in (1, 2, 49, 51, 63):
        agreement.after_step(progress_at(batches))
    assert other.calls == 0  # the other rank's stop waits for the next agreement point
    for batches in (50, 64):
        with pytest.raises(Interrupted) as stopped:
            agreement.after_step(progress_at(batches))
        assert stopped.value.signum == signal.SIGTERM and stopped.value.exit_code == 143
    assert other.calls == 2
    with pytest.raises(Interrupted):
        agreement.now()  # between epochs


def test_agreement_on_divergence_comes_before_a_stop_and_names_nan_or_inf():
    stop = StopRequests()
    stop.signum = signal.SIGINT  # this rank was asked to stop...
    agreement = StopAgreement(stop, OtherRank(loss_code=2), torch.device("cpu"), steps_per_epoch=64)
    with pytest.raises(TrainingDivergedError, match="became nan"):  # ...but the other one diverged
        agreement.after_step(progress_at(50))
    agreement = StopAgreement(StopRequests(), OtherRank(), torch.device("cpu"), steps_per_epoch=64)
    with pytest.raises(TrainingDivergedError, match="became inf"):  # this rank's own loss, seen by both
        agreement.after_step(progress_at(50, loss_sum=math.inf))
    agreement.after_step(progress_at(50))  # all finite, no signal: carry on


def test_one_process_checks_its_own_stop_flag_after_every_step_without_collectives():
    stop = StopRequests()
    agreement = StopAgreement(stop, DistributedContext(), torch.device("cpu"), steps_per_epoch=64)
    agreement.after_step(progress_at(1, loss_sum=math.nan))  # the loss is Trainer.train_epoch's to check here
    stop.signum = signal.SIGINT
    with pytest.raises(Interrupted) as stopped:
        agreement.after_step(progress_at(2))
    assert stopped.value.exit_code == 130


def test_agreement_through_a_real_gloo_group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ctx = DistributedContext(0, 1, 0, "gloo")
        assert ctx.enabled
        stop = StopRequests()
        agreement = StopAgreement(stop, ctx, torch.device("cpu"), steps_per_epoch=64)
        agreement.after_step(progress_at(50))
        with pytest.raises(TrainingDivergedError, match="nan"):
            agreement.after_step(progress_at(64, loss_sum=math.nan))
        stop.signum = signal.SIGTERM
        with pytest.raises(Interrupted):
            agreement.now()
    finally:
        dist.destroy_process_group()


def test_batch_that_does_not_split_over_processes_is_refused():
    assert per_rank_batch_size(64, 2) == 32
    with pytest.raises(UsageError, match="multiple of 3"):
        per_rank_batch_size(64, 3)


def test_strip_nproc():
    assert strip_nproc(["train", "--nproc", "2", "-b", "8", "--nproc=3"]) == ["train", "-b", "8"]


def test_the_workers_environment_sets_their_threads_and_holds_torchruns_warnings_back(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    env = worker_environment(4, {"PATH": "/bin"}, command="fastcnn train --nproc 4")
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "4", "LOGLEVEL": "CRITICAL",
                   COMMAND_ENV: "fastcnn train --nproc 4"}
    assert worker_environment(32, {}, command="c")["OMP_NUM_THREADS"] == "1"
    own = worker_environment(4, {"OMP_NUM_THREADS": "3", "LOGLEVEL": "INFO"}, command="c")
    assert (own["OMP_NUM_THREADS"], own["LOGLEVEL"]) == ("3", "INFO")  # the user's own settings stay
    assert "LOGLEVEL" not in worker_environment(4, {}, command="c", verbose=True)


def test_the_torchrun_command_is_printed_with_verbose_only(monkeypatch, capsys):
    execs = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: execs.append((argv, env)))
    exec_torchrun(2, ["train", "-b", "8"], command="fastcnn train --nproc 2 -b 8")
    assert capsys.readouterr().err == ""
    exec_torchrun(2, ["train", "-b", "8"], command="fastcnn train --nproc 2 -b 8", verbose=True)
    err = capsys.readouterr().err
    assert err.startswith("fastcnn: running OMP_NUM_THREADS=") and "-m fastcnn.launch --standalone" in err
    for argv, env in execs:
        assert argv[1:] == ["-m", "fastcnn.launch", "--standalone", "--nproc-per-node=2", "-m", "fastcnn", "train",
                            "-b", "8"]
        assert env[COMMAND_ENV] == "fastcnn train --nproc 2 -b 8"


def test_a_resumed_run_keeps_its_process_count_or_says_why_not():
    assert processes_for_resume(None, "cpu", 0) == (None, None)  # trained by one plain process
    assert processes_for_resume(2, "cpu", 0) == (2, None)
    assert processes_for_resume(1, "cuda", 1) == (1, None)  # --nproc 1: DistributedDataParallel of one
    nproc, why = processes_for_resume(4, "cuda", 2)
    assert nproc is None and "trained with 4 processes" in why and "2 GPUs are visible" in why and "--nproc" in why
    cfg = TrainConfig(resume="run/checkpoint.pt", epochs=3, progress=False, verbose=True)
    assert resume_argv(cfg) == ["train", "--resume", "run/checkpoint.pt", "--epochs", "3", "--no-progress",
                                "--verbose"]


def test_deterministic_runs_are_bitwise_identical(tmp_path, capsys):
    args = ["train", "--dataset", "synthetic", "--synthetic-size", "1024,256", "--no-progress", "--deterministic"]
    paths = []
    for name in ("a", "b"):
        assert main([*args, "--output", str(tmp_path / name)]) == 0
        paths.append(tmp_path / name / "checkpoint.pt")
    first, second = (torch.load(p, weights_only=True)["model"] for p in paths)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert not torch.are_deterministic_algorithms_enabled()  # the run put the global setting back


def test_torchrun_with_one_process_joins_a_process_group_of_one(monkeypatch):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    for name, value in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not DistributedContext.from_env("cpu").enabled  # a plain process, whatever WORLD_SIZE says
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # torchrun's mark (fastcnn train --nproc 1)
    ctx = DistributedContext.from_env("cpu")
    try:
        assert ctx.enabled and (ctx.world_size, ctx.backend) == (1, "gloo")
    finally:
        ctx.shutdown()




@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.gpu
@requires_cuda
def test_ddp_with_cuda_graph_learns_like_a_single_process_cuda_graph_run(tmp_path, nproc):
    """DistributedDataParallel inside the captured step (fastcnn.cuda_graph): --nproc 1 is DDP of one process, so
    one GPU runs the whole data-parallel path."""
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs")
    args = ["--dataset", "synthetic", "--synthetic-size", "8192,2048", "--device", "cuda", "--cuda-graph",
            "--no-compile", "--kernel", "aten", "-b", "128", "--epochs", "2", "--no-progress"]
    result = fastcnn_train(["--nproc", str(nproc), *args, "--output", str(tmp_path / "ddp")], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    result = fastcnn_train([*args, "--output", str(tmp_path / "single")], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert ddp["distributed"]["world_size"] == nproc and ddp["distributed"]["parameters_in_sync"]
    assert ddp["cuda_graph"] == single["cuda_graph"] == "captured"  # not a silent fallback to eager steps
    assert "distributed" not in single
    assert abs(ddp["test_acc"] - single["test_acc"]) <= 0.5, (ddp["test_acc"], single["test_acc"])

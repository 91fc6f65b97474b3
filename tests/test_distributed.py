"""Data parallel on CPU (gloo) and deterministic runs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastcnn.cli import main

SUBSET = ["--train-subset", "2048", "--test-subset", "500", "-b", "64", "--no-amp", "--no-progress",
          "--device", "cpu", "--epochs", "2"]


def test_two_gloo_processes_match_a_single_process_with_the_same_global_batch(data_root, tmp_path):
    env = dict(os.environ, FASTCNN_DATA=str(data_root))
    ddp = tmp_path / "ddp"
    result = subprocess.run([sys.executable, "-m", "fastcnn", "train", "--nproc", "2", *SUBSET,
                             "--output", str(ddp)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "backend": "gloo", "parameters_in_sync": True}
    assert not (ddp / "rank1").exists()

    single = tmp_path / "single"
    assert main(["train", *SUBSET, "--data-dir", str(data_root), "--output", str(single)]) == 0
    ddp_state = torch.load(ddp / "checkpoint.pt", weights_only=True)["model"]
    single_state = torch.load(single / "checkpoint.pt", weights_only=True)["model"]
    for key, value in single_state.items():
        # gradients are averaged over ranks in another order than one process sums them: rounding only
        torch.testing.assert_close(ddp_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    single_summary = json.loads((single / "summary.json").read_text())
    assert abs(summary["test_acc"] - single_summary["test_acc"]) <= 0.5
    assert summary["epochs"] == 2 and (ddp / "metrics.jsonl").read_text().count("\n") == 2


def test_batch_that_does_not_split_over_processes_is_refused():
    from fastcnn.distributed import per_rank_batch_size
    from fastcnn.errors import UsageError

    assert per_rank_batch_size(64, 2) == 32
    with pytest.raises(UsageError, match="multiple of 3"):
        per_rank_batch_size(64, 3)


def test_strip_nproc():
    from fastcnn.distributed import strip_nproc

    assert strip_nproc(["train", "--nproc", "2", "-b", "8", "--nproc=3"]) == ["train", "-b", "8"]


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

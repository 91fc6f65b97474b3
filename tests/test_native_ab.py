"""bench/native_ab.py, the bitwise A/B of two native builds: the same source gives the same bits, and a change to
the numbers (bf16 rounding half up instead of to even) is caught in the outputs it reaches."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil

import pytest
from fastcnn.kernels import conv_relu_pool_cpu as native

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "native_ab.py"
pytestmark = [pytest.mark.skipif(native.LIBRARY is None, reason=native.STATUS),
              pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the two libraries")]


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("native_ab", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def source(ab):
    return (ab.REPO / ab.SOURCE).read_text()


@pytest.fixture(scope="module")
def worktree_build(ab, source, tmp_path_factory):
    return ab.load(ab.build(source, tmp_path_factory.mktemp("worktree")))


def test_rounding_half_up_shows_in_the_bf16_outputs_only(ab, source, worktree_build, tmp_path, capsys):
    even = "u += 0x7FFF + ((u >> 16) & 1);"
    assert source.count(even) == 1, "f32_to_bf16's rounding line moved: update this test"
    half_up = ab.load(ab.build(source.replace(even, "u += 0x8000;"), tmp_path))
    differ = ab.bitwise(worktree_build, half_up, quick=True)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("DIFFERS")]
    assert differ == len(lines) > 0
    assert all("bfloat16" in line for line in lines), lines[:3]  # fp32 problems never round to bf16
    assert any("grad_input" in line for line in lines) and any("grad_weight" in line for line in lines)


def test_one_source_built_twice_by_the_command_line_is_the_same_in_every_output(ab, capsys):
    loaded = native.LIBRARY
    assert ab.main(["--baseline", "worktree", "--candidate", "worktree", "--no-speed", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "baseline: kernels/conv_relu_pool_cpu.c at worktree" in out and "DIFFERS" not in out
    assert "bitwise: 288 of 288 problems the same in every output" in out
    assert native.LIBRARY is loaded  # each call puts the process's library back


def test_whole_steps_run_on_each_library_and_print_a_line_per_model(ab, worktree_build, capsys):
    ab.step_speed(worktree_build, native.LIBRARY, rounds=1, batch_scale=0.05)
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if "step, batch" in line or "accelerated, batch" in line]
    assert [row.split(",")[0].strip() for row in rows] == ["LeNet fast step", "user CNN accelerated"], lines
    assert all(row.rstrip().endswith("x") for row in rows)
    assert native.LIBRARY is not worktree_build

"""bench/gpu_session.sh is run on a short GPU lease, where a broken script wastes device time: check here that it
parses, runs a stage, packs its results after each stage, and refuses an unknown stage."""

import os
import pathlib
import subprocess
import sys
import tarfile

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "bench" / "gpu_session.sh"


def run(tmp_path, *stages):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, GPU_SESSION_BUDGET="300")
    return subprocess.run(["bash", str(SCRIPT), *stages], capture_output=True, text=True, env=env, timeout=300)


def test_a_stage_runs_and_its_results_come_back_packed(tmp_path):
    result = run(tmp_path, "kernels")  # on a machine without CUDA the benchmarks skip, and kernel_report is not run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with tarfile.open(tmp_path / "gpu-results.tar.gz") as archive:
        names = archive.getnames()
        stages = archive.extractfile("gpu-results/stages.txt").read().decode()
    assert {"gpu-results/kernels-target.log", "gpu-results/kernels-all.log"} <= set(names)
    assert stages.startswith("kernels-target exit=0") and "kernels-all exit=0" in stages
    assert "stage kernels-target: exit 0" in (tmp_path / "gpu-session.log").read_text()


def test_an_unknown_stage_is_refused_after_packing_what_ran(tmp_path):
    result = run(tmp_path, "benchmark-everything")
    assert result.returncode == 2
    assert "unknown stage benchmark-everything" in (tmp_path / "gpu-session.log").read_text()
    assert (tmp_path / "gpu-results.tar.gz").exists()

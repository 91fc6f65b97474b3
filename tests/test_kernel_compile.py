"""The fused kernels compile for a real GPU (sm_90, the H100/H200), here without one: the interpreter that the
other kernel tests use accepts code the compiler rejects. See tests/compile_kernels_for_gpu.py; run it by hand
for every case and other architectures (``--arch 80``)."""

import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).with_name("compile_kernels_for_gpu.py")


def test_every_autotune_config_of_the_three_kernels_compiles_for_sm90():
    # Channels-last with several input channels (the CI_INNER path) in bf16, and NCHW fp32 without a bias.
    cases = ["lenet2-bf16-cl", "fp32-nchw-k5-nobias"]
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", *[f"--case={c}" for c in cases]],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for case in cases:
        assert f"sm_90 {case}: 13 kernels compiled to cubin" in result.stdout

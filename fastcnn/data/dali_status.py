"""Whether NVIDIA DALI can serve batches here, probed once per process.

DALI is optional: this module imports ``nvidia.dali`` only inside the probes, so that it imports (and says what
is missing) on a machine without it. The DALI loader and the image folder decoder import DALI at their top and
are imported only once ``dali_status`` said yes.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from fastcnn.data.error_text import one_line


@functools.lru_cache(maxsize=1)
def dali_status() -> tuple[bool, str]:
    """(True, what runs) when nvidia.dali imports; (False, why not and what to do)."""
    try:
        # Imported here, not at the top: DALI is optional, and this is where its absence is found out. The names
        # fastcnn's pipelines use are imported too, so that a partial install is caught here, not at first use.
        import nvidia.dali
        from nvidia.dali import fn, pipeline_def, types  # noqa: F401
    except Exception as err:  # ImportError, or a broken install raising anything at import
        return False, f"nvidia-dali is not importable ({type(err).__name__}: {err}); pip install nvidia-dali-cuda130"
    gpu_ok, _ = dali_gpu_status()
    where = "GPU and CPU-only pipelines" if gpu_ok else "CPU-only pipelines (device_id=None)"
    return True, f"DALI {nvidia.dali.__version__} pipelines available: {where}"


@functools.lru_cache(maxsize=1)
def dali_gpu_status() -> tuple[bool, str]:
    """Whether DALI can run GPU operators here: a CUDA device is visible to torch and a one-operator GPU pipeline
    runs on it (this catches a DALI wheel built for a CUDA the driver does not support)."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible; DALI runs CPU-only pipelines (device_id=None)"
    # Under torchrun this may run before the process picks its GPU (torch.cuda.set_device(LOCAL_RANK)): probe that
    # GPU anyway, so that the ranks do not all put a CUDA context and DALI's memory pools on GPU 0.
    device_id = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    try:
        # Imported here, not at the top: DALI is optional (a missing one is reported like a failing one).
        from nvidia.dali import fn, pipeline_def

        @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
        def probe():
            return fn.external_source(name="x", device="cpu").gpu() * 2

        probe().run(x=np.ones((1, 1), np.float32))
    except Exception as err:  # a wheel for another CUDA, no driver support, ...
        return False, f"DALI cannot run on the GPU ({type(err).__name__}: {one_line(err)}); it runs CPU-only pipelines"
    return True, f"DALI GPU pipelines on cuda:{device_id}"

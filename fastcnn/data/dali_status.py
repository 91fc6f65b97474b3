"""Whether NVIDIA DALI can serve batches here, without importing it more than once."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def dali_status() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
    except Exception as err:  # ImportError, or a broken install raising anything at import
        return False, f"nvidia-dali is not importable ({type(err).__name__}: {err}); pip install nvidia-dali-cuda130"
    try:
        import fastcnn.data.dali_loader  # noqa: F401
    except ImportError:
        return False, "fastcnn's DALI loader is not implemented in this version yet"
    return True, "DALI pipelines available"

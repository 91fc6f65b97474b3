"""fastcnn: train small convolutional networks as fast as the hardware allows.

Public API: ``conv_relu_pool`` (fused functional op), ``ConvReLUPool2d`` (drop-in module),
``accelerate`` (rewrite a user model's Conv2d -> ReLU -> MaxPool2d chains to the fused module).
"""

from __future__ import annotations

__version__ = "0.1.0"

from fastcnn.nn import ConvReLUPool2d
from fastcnn.ops import conv_relu_pool

__all__ = ["ConvReLUPool2d", "conv_relu_pool", "accelerate", "__version__"]


def __getattr__(name):
    # accelerate pulls in torch.fx; import it on first use so `import fastcnn` stays light.
    if name == "accelerate":
        from fastcnn.accelerate import accelerate

        return accelerate
    raise AttributeError(f"module 'fastcnn' has no attribute {name!r}")

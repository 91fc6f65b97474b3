"""The names users type, in one torch-free place (the CLI builds its --help from here without importing torch).

The fused Conv2d -> ReLU -> MaxPool2d op has two implementations, and everything (CLI, JSON, docs, code) calls
them by the same two names:
- ``fused``: fastcnn's one-kernel op (Triton on a GPU, the native C kernel on a CPU);
- ``aten``: PyTorch's own chain, ``F.conv2d`` -> ``F.relu`` -> ``F.max_pool2d``.
``auto`` lets fastcnn choose (by measurement where it can). ``triton`` and ``torch`` are the names older runs and
scripts used; they stay accepted and mean ``fused`` and ``aten``.
"""

from __future__ import annotations

KERNELS = ("auto", "fused", "aten")
KERNEL_ALIASES = {"triton": "fused", "torch": "aten"}


def canonical_kernel(name: str) -> str:
    """``name`` in the current vocabulary (an old alias is translated); ValueError for an unknown name."""
    name = KERNEL_ALIASES.get(name, name)
    if name not in KERNELS:
        known = ", ".join([*KERNELS, *KERNEL_ALIASES])
        raise ValueError(f"unknown kernel {name!r}: choose one of {known}")
    return name


# The other names users type, for the CLI's choices and --help. The registries behind most of them live in
# torch-importing modules (models, recipes, config, engine, data); tests/test_vocabulary.py checks that each
# tuple here names exactly what its registry holds, in the same order.
MODEL_NAMES = ("cifarnet", "fastnet", "lenet", "mnistfast", "simplecnn")  # models.MODELS, sorted
RECIPE_NAMES = ("cifar10", "public", "speedrun")  # recipes.RECIPES, sorted
DATASETS = ("mnist", "fashion-mnist", "synthetic", "imagefolder", "cifar10")  # data.DATASETS
LOADERS = ("device", "dali", "torch")  # data.LOADERS; "torch" is torchvision's DataLoader, not a kernel
CHANNEL_CHOICES = (1, 3)  # grayscale or RGB
PRESETS = ("fast", "reference")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "onecycle")  # engine.SCHEDULES
DEVICES = ("auto", "cpu", "cuda")
AMP_DTYPE_NAMES = ("bfloat16", "float16")  # config.AMP_DTYPES, sorted
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# fastcnn predict: how an image is brought to the model's input, and whether a digit is inverted
FIT_CHOICES = ("auto", "digit", "resize")
INVERT_CHOICES = ("auto", "yes", "no")

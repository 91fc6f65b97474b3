"""Named training recipes: everything but the speed options, per dataset.

- ``public``: the best public single-GPU MNIST recipe ("train_mnist_fast"), from its published facts: its
  network (``mnistfast``), Adam lr 1e-2 betas (0.7, 0.9), OneCycle without momentum cycling, batch 256, one
  epoch, normalized data preloaded on the device; plain PyTorch, fp32, eager. The race's opponent.
- ``speedrun``: fastcnn's own time-to-accuracy recipe (fused fastnet, fast preset). Every choice in it is
  justified by the ablation recorded in the README.
- ``cifar10``: CIFAR-10 and other small natural colour images (``--dataset cifar10``, or an image folder such as
  CIFAR10-images): the batch-normalized ``cifarnet``, Adam with OneCycle and label smoothing, random translation
  and horizontal flips on the DALI loader (photos may be mirrored; digits may not), normalized with the train
  split's own per-channel statistics. Its choices and measurements are in docs/own-images.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastcnn.errors import UsageError

MNIST_NORM = ((0.1307,), (0.3081,))
FASHION_NORM = ((0.2860,), (0.3530,))


@dataclass(frozen=True)
class Recipe:
    model: str
    batch_size: int
    lr: float
    opt: str
    betas: tuple[float, float] | None
    schedule: str
    label_smoothing: float
    epochs: int
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None  # None: the train split's own mean and std
    settings: dict = field(default_factory=dict)  # TrainConfig fields the recipe fixes (preset, loader, ...)
    device_settings: dict = field(default_factory=dict)  # device type -> more TrainConfig fields there
    widths: tuple[int, int, int] | None = None  # fastnet's (conv1, conv2, hidden); None: its default


_PUBLIC_SETTINGS = dict(preset="reference", loader="device")
# norm None: the train split's own per-channel mean and std. Augmentation runs on the DALI loader.
_CIFAR10 = Recipe("cifarnet", 256, 1e-2, "adam", (0.7, 0.9), "onecycle", 0.1, 6, None,
                  settings=dict(loader="dali", augment=True, flip=True))

RECIPES: dict[str, dict[str, Recipe]] = {
    "public": {
        "mnist": Recipe("mnistfast", 256, 1e-2, "adam", (0.7, 0.9), "onecycle", 0.0, 1, MNIST_NORM,
                        _PUBLIC_SETTINGS),
        "fashion-mnist": Recipe("mnistfast", 256, 1e-2, "adam", (0.7, 0.9), "onecycle", 0.0, 1, FASHION_NORM,
                                _PUBLIC_SETTINGS),
    },
    "cifar10": {
        "cifar10": _CIFAR10,
        "imagefolder": _CIFAR10,
    },
    "speedrun": {
        # The fast preset's bf16 autocast on every device: with the native CPU kernel it is faster than fp32 on the
        # 2-core CPU too (3 runs each, alternating: MNIST 1.29 and 1.27 s vs 1.62 and 1.49 s, 99.21% vs 99.17%;
        # Fashion-MNIST 4.74 vs 5.94 s, 91.14% vs 91.07%). Before that kernel, fp32 was faster there.
        "mnist": Recipe("fastnet", 256, 1e-2, "adam", (0.7, 0.9), "onecycle", 0.1, 1, MNIST_NORM),
        # Fashion-MNIST needs 4 epochs of the same network to pass 91% (3 gave 90.7-91.0%, see README).
        "fashion-mnist": Recipe("fastnet", 256, 1e-2, "adam", (0.7, 0.9), "onecycle", 0.1, 4, FASHION_NORM),
    },
}


def default_dataset(name: str) -> str:
    """The dataset a recipe trains on when --dataset is not given: the first it covers."""
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return next(iter(RECIPES[name]))


def get_recipe(name: str, dataset: str) -> Recipe:
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    if dataset not in RECIPES[name]:
        raise UsageError(f"recipe {name!r} has no settings for dataset {dataset!r}; it covers: "
                         f"{', '.join(RECIPES[name])}")
    return RECIPES[name][dataset]

"""Model registry. Each fastcnn model is built from ``ConvReLUPool2d`` blocks and keeps the parameter names of
its reference twin, so state_dicts load both ways. Each entry also carries the recipe of the tutorial program
it comes from (dataset, batch size, optimizer, learning rate, normalization), used as the CLI's defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastcnn import reference
from fastcnn.errors import UsageError
from fastcnn.nn import ConvReLUPool2d

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class SimpleCNN(nn.Module):
    """fastcnn's SimpleCNN: conv 1->32 k3 + ReLU + maxpool 2 fused, linear 5408->10."""

    def __init__(self, kernel: str = "auto", num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = ConvReLUPool2d(in_channels, 32, kernel_size=3, kernel=kernel)
        self.dropout = nn.Dropout(0.25)  # kept (unused) so the module tree mirrors the tutorial's
        self.fc1 = nn.Linear(32 * 13 * 13, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten(1) copies channels-last activations into NCHW order, which fc1's weights expect.
        return self.fc1(self.conv1(x).flatten(1))


class LeNet(nn.Module):
    """fastcnn's LeNet-style network: two fused conv-ReLU-pool blocks (1->6 k5, 6->12 k5), 192->120->60->10."""

    def __init__(self, kernel: str = "auto", num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = ConvReLUPool2d(in_channels, 6, kernel_size=5, kernel=kernel)
        self.conv2 = ConvReLUPool2d(6, 12, kernel_size=5, kernel=kernel)
        self.fc1 = nn.Linear(12 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 60)
        self.out = nn.Linear(60, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x)).flatten(1)
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


@dataclass(frozen=True)
class TutorialRecipe:
    """How the tutorial program trains this model: the CLI's defaults for it."""

    dataset: str
    batch_size: int
    lr: float
    opt: str
    epochs: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]
    build_reference: Callable[[], nn.Module]
    recipe: TutorialRecipe
    description: str


MODELS: dict[str, ModelSpec] = {
    "simplecnn": ModelSpec(
        "simplecnn", SimpleCNN, reference.SimpleCNN,
        TutorialRecipe("mnist", 64, 1e-3, "adam", 1, MNIST_MEAN, MNIST_STD),
        "MNIST tutorial CNN: conv 1->32 k3, ReLU, maxpool 2, linear 5408->10"),
    "lenet": ModelSpec(
        "lenet", LeNet, reference.Network,
        # The Fashion-MNIST tutorial uses ToTensor() alone: no normalization.
        TutorialRecipe("fashion-mnist", 100, 1e-2, "adam", 1, (0.0,), (1.0,)),
        "Fashion-MNIST tutorial LeNet: conv 1->6 k5, conv 6->12 k5 (ReLU, maxpool 2 each), 192->120->60->10"),
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


def build_model(name: str, *, kernel: str = "auto", reference_impl: bool = False, num_classes: int = 10,
                image_shape: tuple[int, int, int] = (1, 28, 28), widths: tuple[int, int, int] | None = None
                ) -> nn.Module:
    """Build model ``name``: the fastcnn version (fused blocks, ``kernel`` picks their implementation) or,
    with ``reference_impl``, the tutorial's own class. Both have the same state_dict keys.

    Every model takes 28x28 images; fastcnn's versions take any class count and channel count (the tutorial
    classes are fixed at 10 classes and 1 channel, as in the tutorials). ``widths`` (conv1, conv2, hidden)
    resizes fastnet."""
    spec = get_spec(name)
    extra = {}
    if widths is not None:
        if name != "fastnet":
            raise UsageError(f"--widths applies to fastnet, not {name}")
        extra["widths"] = tuple(widths)
    if tuple(image_shape[1:]) != (28, 28):
        raise UsageError(f"model {name} takes 28x28 images, not {image_shape[1]}x{image_shape[2]}")
    if reference_impl:
        if (num_classes, image_shape[0]) != (10, 1):
            raise UsageError(f"the tutorial's {name} takes 10 classes of 1-channel images (got {num_classes} "
                             f"classes, {image_shape[0]} channels); use --preset fast or --kernel torch")
        return spec.build_reference(**extra)
    return spec.build(kernel=kernel, num_classes=num_classes, in_channels=image_shape[0], **extra)


class FastNet(nn.Module):
    """Two fused conv-ReLU-pool blocks (1->c1 k5, c1->c2 k3) and a two-layer head: the shape of the fastest
    public MNIST recipes, with widths chosen by fastcnn's speedrun ablation (see fastcnn.recipes)."""

    def __init__(self, kernel: str = "auto", num_classes: int = 10, in_channels: int = 1, widths=(24, 32, 256)):
        super().__init__()
        c1, c2, hidden = widths
        self.conv1 = ConvReLUPool2d(in_channels, c1, kernel_size=5, kernel=kernel)
        self.conv2 = ConvReLUPool2d(c1, c2, kernel_size=3, kernel=kernel)
        self.fc1 = nn.Linear(c2 * 5 * 5, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.conv2(self.conv1(x)).flatten(1))))


class PublicMNISTNet(nn.Module):
    """The network of the best public single-GPU MNIST recipe ("train_mnist_fast"), written from its published
    facts in plain PyTorch: conv 1->24 k5, maxpool 2, relu, conv 24->32 k3, maxpool 2, relu, 800->256->10."""

    def __init__(self, widths=(24, 32, 256)):
        super().__init__()
        c1, c2, hidden = widths
        self.conv1 = nn.Conv2d(1, c1, kernel_size=5)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3)
        self.fc1 = nn.Linear(c2 * 5 * 5, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


MODELS["mnistfast"] = ModelSpec(
    "mnistfast", lambda **kw: FastNet(widths=(24, 32, 256), **kw), PublicMNISTNet,
    TutorialRecipe("mnist", 256, 1e-2, "adam", 1, MNIST_MEAN, MNIST_STD),
    "the public train_mnist_fast network: conv 1->24 k5, conv 24->32 k3 (maxpool 2, ReLU each), 800->256->10")

# Widths of fastnet: chosen by the speedrun ablation recorded in the README (time vs accuracy on MNIST).
FASTNET_WIDTHS = (16, 32, 128)

MODELS["fastnet"] = ModelSpec(
    "fastnet", lambda **kw: FastNet(**{"widths": FASTNET_WIDTHS, **kw}),
    lambda **kw: PublicMNISTNet(**{"widths": FASTNET_WIDTHS, **kw}),
    TutorialRecipe("mnist", 256, 1e-2, "adam", 1, MNIST_MEAN, MNIST_STD),
    "fastcnn's speedrun network: fused conv blocks 1->c1 k5, c1->c2 k3, a c2*25->hidden->10 head")

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


def build_model(name: str, *, kernel: str = "auto", reference_impl: bool = False) -> nn.Module:
    """Build model ``name``: the fastcnn version (fused blocks, ``kernel`` picks their implementation) or,
    with ``reference_impl``, the tutorial's own class. Both have the same state_dict keys."""
    spec = get_spec(name)
    return spec.build_reference() if reference_impl else spec.build(kernel=kernel)

"""Model registry. Each fastcnn model is built from ``ConvReLUPool2d`` blocks and keeps the parameter names of
its reference twin, so state_dicts load both ways. Each entry also carries the recipe of the tutorial program
it comes from (dataset, batch size, optimizer, learning rate, normalization), used as the CLI's defaults.

Every model (fastcnn's and its twin) takes any input channels, image size and class count; the flatten size
follows from the input size (``fastcnn.shapes``). At 1x28x28 with 10 classes each is exactly the tutorial's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastcnn.errors import UsageError
from fastcnn.nn import ConvReLUPool2d, linear_on_flattened
from fastcnn.reference import LENET_BLOCKS, SIMPLECNN_BLOCKS
from fastcnn.reference import Network as TutorialNetwork
from fastcnn.reference import SimpleCNN as TutorialSimpleCNN
from fastcnn.shapes import feature_size, smallest_side

FASTNET_BLOCKS = ((5, 0), (3, 0))
CIFARNET_BLOCKS = ((3, 1), (3, 1), (3, 1))

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class SimpleCNN(nn.Module):
    """fastcnn's SimpleCNN: conv C->32 k3 + ReLU + maxpool 2 fused, linear 32*((H-2)//2)*((W-2)//2)->classes
    (5408->10 at 1x28x28). Takes images of 4x4 and larger."""

    def __init__(self, kernel: str = "auto", num_classes: int = 10, in_channels: int = 1,
                 image_size: int | tuple[int, int] = 28):
        super().__init__()
        height, width = feature_size("SimpleCNN", image_size, SIMPLECNN_BLOCKS)
        self.conv1 = ConvReLUPool2d(in_channels, 32, kernel_size=3, kernel=kernel)
        self.dropout = nn.Dropout(0.25)  # kept (unused) so the module tree mirrors the tutorial's
        self.fc1 = nn.Linear(32 * height * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_on_flattened(self.conv1(x), self.fc1)


class LeNet(nn.Module):
    """fastcnn's LeNet-style network: two fused conv-ReLU-pool blocks (C->6 k5, 6->12 k5), then
    12*h*w->120->60->classes (192->120->60->10 at 1x28x28). Takes images of 16x16 and larger."""

    def __init__(self, kernel: str = "auto", num_classes: int = 10, in_channels: int = 1,
                 image_size: int | tuple[int, int] = 28):
        super().__init__()
        height, width = feature_size("LeNet", image_size, LENET_BLOCKS)
        self.conv1 = ConvReLUPool2d(in_channels, 6, kernel_size=5, kernel=kernel)
        self.conv2 = ConvReLUPool2d(6, 12, kernel_size=5, kernel=kernel)
        self.fc1 = nn.Linear(12 * height * width, 120)
        self.fc2 = nn.Linear(120, 60)
        self.out = nn.Linear(60, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = linear_on_flattened(self.conv2(self.conv1(x)), self.fc1)
        return self.out(F.relu(self.fc2(F.relu(x))))


@dataclass(frozen=True)
class TutorialRecipe:
    """How the tutorial program trains this model: the CLI's defaults for it."""

    dataset: str
    batch_size: int
    lr: float
    opt: str
    epochs: int
    mean: tuple[float, ...] | None  # None: the train split's own statistics
    std: tuple[float, ...] | None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]
    build_reference: Callable[..., nn.Module]
    recipe: TutorialRecipe
    description: str
    blocks: tuple[tuple[int, int], ...] = ()  # (kernel, padding) of its conv-ReLU-pool blocks: its smallest input

    @property
    def smallest_input(self) -> int:
        return smallest_side(self.blocks)


MODELS: dict[str, ModelSpec] = {
    "simplecnn": ModelSpec(
        "simplecnn", SimpleCNN, TutorialSimpleCNN,
        TutorialRecipe("mnist", 64, 1e-3, "adam", 1, MNIST_MEAN, MNIST_STD),
        "MNIST tutorial CNN: conv 1->32 k3, ReLU, maxpool 2, linear 5408->10", SIMPLECNN_BLOCKS),
    "lenet": ModelSpec(
        "lenet", LeNet, TutorialNetwork,
        # The Fashion-MNIST tutorial uses ToTensor() alone: no normalization.
        TutorialRecipe("fashion-mnist", 100, 1e-2, "adam", 1, (0.0,), (1.0,)),
        "Fashion-MNIST tutorial LeNet: conv 1->6 k5, conv 6->12 k5 (ReLU, maxpool 2 each), 192->120->60->10",
        LENET_BLOCKS),
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


def check_input_shape(name: str, image_shape: tuple[int, int, int]) -> None:
    """UsageError (one line, naming the smallest size it takes) when model ``name`` cannot take (C, H, W) images."""
    spec = get_spec(name)
    _, height, width = (int(v) for v in image_shape)
    least = spec.smallest_input
    if min(height, width) < least:
        fits = [other.name for other in MODELS.values() if other.smallest_input <= min(height, width)]
        raise UsageError(f"model {name} needs images of at least {least}x{least} pixels; these are {height}x{width}: "
                         f"pass --image-size {least} (or larger)"
                         + (f", or use --model {' or '.join(fits)}" if fits else ""))


def build_model(name: str, *, kernel: str = "auto", reference_impl: bool = False, num_classes: int = 10,
                image_shape: tuple[int, int, int] = (1, 28, 28), widths: tuple[int, int, int] | None = None
                ) -> nn.Module:
    """Build model ``name``: the fastcnn version (fused blocks, ``kernel`` picks their implementation) or,
    with ``reference_impl``, the tutorial's own class. Both have the same state_dict keys.

    ``image_shape`` (C, H, W) and ``num_classes`` size the model: its first convolution takes C channels, its
    flatten size follows from (H, W), its last layer has ``num_classes`` outputs. An input too small for the
    model is a one-line UsageError naming the smallest size it takes. ``widths`` (conv1, conv2, hidden) resizes
    fastnet."""
    spec = get_spec(name)
    extra = {}
    if widths is not None:
        if name not in ("fastnet", "cifarnet"):
            raise UsageError(f"--widths applies to fastnet and cifarnet, not {name}")
        extra["widths"] = tuple(widths)
    check_input_shape(name, image_shape)
    channels, height, width = (int(v) for v in image_shape)
    shape = dict(num_classes=num_classes, in_channels=channels, image_size=(height, width))
    if reference_impl:
        return spec.build_reference(**shape, **extra)
    return spec.build(kernel=kernel, **shape, **extra)


class FastNet(nn.Module):
    """Two fused conv-ReLU-pool blocks (C->c1 k5, c1->c2 k3) and a two-layer head (c2*h*w->hidden->classes; h = w
    = 5 at 28x28): the shape of the fastest public MNIST recipes, with widths chosen by fastcnn's speedrun ablation
    (see fastcnn.recipes). Takes images of 12x12 and larger."""

    def __init__(self, kernel: str = "auto", num_classes: int = 10, in_channels: int = 1, widths=(24, 32, 256),
                 image_size: int | tuple[int, int] = 28):
        super().__init__()
        c1, c2, hidden = widths
        height, width = feature_size("FastNet", image_size, FASTNET_BLOCKS)
        self.conv1 = ConvReLUPool2d(in_channels, c1, kernel_size=5, kernel=kernel)
        self.conv2 = ConvReLUPool2d(c1, c2, kernel_size=3, kernel=kernel)
        self.fc1 = nn.Linear(c2 * height * width, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(linear_on_flattened(self.conv2(self.conv1(x)), self.fc1)))


class PublicMNISTNet(nn.Module):
    """The network of the best public single-GPU MNIST recipe ("train_mnist_fast"), written from its published
    facts in plain PyTorch: conv 1->24 k5, maxpool 2, relu, conv 24->32 k3, maxpool 2, relu, 800->256->10 (at
    1x28x28 with 10 classes; other shapes as FastNet)."""

    def __init__(self, widths=(24, 32, 256), in_channels: int = 1, num_classes: int = 10,
                 image_size: int | tuple[int, int] = 28):
        super().__init__()
        c1, c2, hidden = widths
        height, width = feature_size("PublicMNISTNet", image_size, FASTNET_BLOCKS)
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3)
        self.fc1 = nn.Linear(c2 * height * width, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


MODELS["mnistfast"] = ModelSpec(
    "mnistfast", lambda **kw: FastNet(widths=(24, 32, 256), **kw), PublicMNISTNet,
    TutorialRecipe("mnist", 256, 1e-2, "adam", 1, MNIST_MEAN, MNIST_STD),
    "the public train_mnist_fast network: conv 1->24 k5, conv 24->32 k3 (maxpool 2, ReLU each), 800->256->10",
    FASTNET_BLOCKS)

# Widths of fastnet: chosen by the speedrun ablation recorded in the README (time vs accuracy on MNIST).
FASTNET_WIDTHS = (16, 32, 128)

MODELS["fastnet"] = ModelSpec(
    "fastnet", lambda **kw: FastNet(**{"widths": FASTNET_WIDTHS, **kw}),
    lambda **kw: PublicMNISTNet(**{"widths": FASTNET_WIDTHS, **kw}),
    TutorialRecipe("mnist", 256, 1e-2, "adam", 1, MNIST_MEAN, MNIST_STD),
    "fastcnn's speedrun network: fused conv blocks 1->c1 k5, c1->c2 k3, a c2*25->hidden->10 head", FASTNET_BLOCKS)


class CifarNet(nn.Module):
    """Three fused conv-ReLU-pool blocks (C->c1, c1->c2, c2->c3; 3x3 kernels, padding 1), each followed by batch
    normalization, and a linear classifier on the c3*h*w features (h = w = 4 at 32x32): the network of fastcnn's
    cifar10 recipe (see fastcnn.recipes), for small colour images. Takes images of 8x8 and larger."""

    def __init__(self, kernel: str = "auto", num_classes: int = 10, in_channels: int = 3, widths=(24, 48, 96),
                 image_size: int | tuple[int, int] = 32):
        super().__init__()
        c1, c2, c3 = widths
        height, width = feature_size("CifarNet", image_size, CIFARNET_BLOCKS)
        self.conv1 = ConvReLUPool2d(in_channels, c1, kernel_size=3, padding=1, kernel=kernel)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = ConvReLUPool2d(c1, c2, kernel_size=3, padding=1, kernel=kernel)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = ConvReLUPool2d(c2, c3, kernel_size=3, padding=1, kernel=kernel)
        self.bn3 = nn.BatchNorm2d(c3)
        self.fc = nn.Linear(c3 * height * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))
        return linear_on_flattened(x, self.fc)


class CifarNetReference(nn.Module):
    """CifarNet in plain PyTorch (Conv2d, ReLU, MaxPool2d, BatchNorm2d): its reference twin, same state_dict."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths=(24, 48, 96),
                 image_size: int | tuple[int, int] = 32):
        super().__init__()
        c1, c2, c3 = widths
        height, width = feature_size("CifarNet", image_size, CIFARNET_BLOCKS)
        self.conv1, self.bn1 = nn.Conv2d(in_channels, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.conv3, self.bn3 = nn.Conv2d(c2, c3, 3, padding=1), nn.BatchNorm2d(c3)
        self.fc = nn.Linear(c3 * height * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = norm(F.max_pool2d(F.relu(conv(x)), 2))
        return self.fc(x.flatten(1))


MODELS["cifarnet"] = ModelSpec(
    "cifarnet", CifarNet, CifarNetReference,
    TutorialRecipe("cifar10", 256, 1e-2, "adam", 1, None, None),
    "fastcnn's CIFAR-10 network: fused conv blocks C->24->48->96 (3x3, padding 1, ReLU, maxpool 2, batch norm "
    "each), linear 1536->10 at 32x32", CIFARNET_BLOCKS)

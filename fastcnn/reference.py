"""The two tutorial programs fastcnn starts from, reproduced faithfully in plain PyTorch.

- ``SimpleCNN`` on MNIST: conv 1->32 k3, ReLU, maxpool 2, linear 5408->10; batch 64, shuffle, Adam lr 1e-3,
  CrossEntropyLoss, ToTensor + Normalize((0.1307,), (0.3081,)), one epoch.
- ``Network`` (LeNet-style) on Fashion-MNIST: conv 1->6 k5, ReLU, pool 2, conv 6->12 k5, ReLU, pool 2,
  linear 192->120->60->10; batch 100, Adam lr 0.01, F.cross_entropy, ToTensor, ``get_num_correct``.

Every fast path in fastcnn is tested and benchmarked against these. Both take other input channels, sizes and
class counts too (``in_channels``, ``image_size``, ``num_classes``; the flatten size follows from the input size);
at their defaults (1x28x28, 10 classes) they are exactly the tutorials' modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastcnn.shapes import feature_size

SIMPLECNN_BLOCKS = ((3, 0),)  # (kernel, padding) of each conv -> ReLU -> maxpool 2 block
LENET_BLOCKS = ((5, 0), (5, 0))


class SimpleCNN(nn.Module):
    """The MNIST tutorial's model. ``dropout`` exists but forward does not use it, as in the original."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int | tuple[int, int] = 28):
        super().__init__()
        height, width = feature_size("SimpleCNN", image_size, SIMPLECNN_BLOCKS)
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(0.25)
        self.fc1 = nn.Linear(32 * height * width, num_classes)  # 32 * 13 * 13 at 28x28

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        # The tutorial writes .view(-1, 32*13*13); reshape is the same on contiguous input and also accepts
        # channels-last activations, so explicit --channels-last works on the reference model too.
        x = x.reshape(-1, self.fc1.in_features)
        x = self.fc1(x)
        return x


class Network(nn.Module):
    """The Fashion-MNIST tutorial's LeNet-style network, written with functional calls as in the original."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int | tuple[int, int] = 28):
        super().__init__()
        height, width = feature_size("LeNet", image_size, LENET_BLOCKS)
        self.conv1 = nn.Conv2d(in_channels=in_channels, out_channels=6, kernel_size=5)
        self.conv2 = nn.Conv2d(in_channels=6, out_channels=12, kernel_size=5)
        self.fc1 = nn.Linear(in_features=12 * height * width, out_features=120)  # 12 * 4 * 4 at 28x28
        self.fc2 = nn.Linear(in_features=120, out_features=60)
        self.out = nn.Linear(in_features=60, out_features=num_classes)

    def forward(self, t):
        t = F.relu(self.conv1(t))
        t = F.max_pool2d(t, kernel_size=2, stride=2)
        t = F.relu(self.conv2(t))
        t = F.max_pool2d(t, kernel_size=2, stride=2)
        t = t.reshape(-1, self.fc1.in_features)  # the tutorial: 12 * 4 * 4
        t = F.relu(self.fc1(t))
        t = F.relu(self.fc2(t))
        t = self.out(t)
        return t


def get_num_correct(preds: torch.Tensor, labels: torch.Tensor) -> int:
    """The Fashion-MNIST tutorial's accuracy helper: how many argmax predictions equal the labels."""
    return preds.argmax(dim=1).eq(labels).sum().item()

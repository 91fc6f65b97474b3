"""Models built from fastcnn's fused blocks, shared by the kernel tests (imported as ``from fused_blocks import
...``; pytest puts tests/ on sys.path)."""

from torch import nn

from fastcnn.nn import ConvReLUPool2d


class TwoBlocks(nn.Module):
    """Two ConvReLUPool2d blocks, ``channels[0] -> channels[1]`` (3x3, padding 1) then ``channels[1] ->
    channels[2]`` (3x3, no padding), their output flattened: (N, C, H, W) -> (N, channels[2] * h * w). The second
    block's input needs a gradient, the first one's does not (it is the data)."""

    def __init__(self, kernel: str = "auto", channels: tuple[int, int, int] = (3, 8, 4)):
        super().__init__()
        c0, c1, c2 = channels
        self.block1 = ConvReLUPool2d(c0, c1, 3, padding=1, kernel=kernel)
        self.block2 = ConvReLUPool2d(c1, c2, 3, kernel=kernel)

    def forward(self, x):
        return self.block2(self.block1(x)).flatten(1)

"""A tiny CNN with hand-set weights, so every activation is known exactly.

``act`` (after a 1×1 conv and ReLU) has four channels:
  0: ReLU(R - G - B)        red background
  1: ReLU(G - R - B)        green background
  2: ReLU(R + B - 2G - 1)   magenta pixels: the planted "stamp" artifact
  3: ReLU(B - R - G)        blue background
Spatial mean of channel 2 is the fraction of the image covered by the stamp.
"""

import torch
from torch import nn


class ColourNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([
                [1.0, -1.0, -1.0],
                [-1.0, 1.0, -1.0],
                [1.0, -2.0, 1.0],
                [-1.0, -1.0, 1.0],
            ]).view(4, 3, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 0.0, -1.0, 0.0]))
            self.head.weight.copy_(torch.tensor([[0.0, 0.0, 5.0, 0.0], [1.0, 1.0, 0.0, 1.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.pool(self.act(self.conv(x))).flatten(1))


def make():
    return ColourNet()


def no_stamp() -> ColourNet:
    """The shortcut trained out: channel 2 (the stamp detector) becomes a second red detector."""
    m = ColourNet()
    with torch.no_grad():
        m.conv.weight[2] = m.conv.weight[0]
        m.conv.bias[2] = m.conv.bias[0]
    return m

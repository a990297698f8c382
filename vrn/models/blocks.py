"""Building blocks of the VRN network, in the layer order of the released Torch7 model."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Bottleneck", "ConvBnRelu"]


class Bottleneck(nn.Module):
    """Pre-activation bottleneck residual block (Newell et al.'s hourglass residual).

    ``out = skip(x) + conv1x1(relu(bn(conv3x3(relu(bn(conv1x1(relu(bn(x)))))))))`` with a
    bottleneck of ``out_channels // 2`` features; ``skip`` is the identity when the channel
    counts match and a 1x1 convolution otherwise. Convolutions carry biases, as in Torch7.

    Args:
        in_channels, out_channels: feature counts.
    Shapes:
        x: (B, in_channels, H, W) -> (B, out_channels, H, W)
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=False),
            nn.Conv2d(in_channels, mid, 1),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class ConvBnRelu(nn.Sequential):
    """``Conv2d -> BatchNorm2d -> ReLU`` (used after each hourglass and in the head)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

"""Hourglass modules: the one in the released VRN graph, and Newell et al.'s standard one.

The released VRN-unguided graph (Jackson et al., ICCV 2017; Torch7 model converted to
PyTorch in the seed repository) nests its hourglass the "other way round": at each of the
``depth`` levels the *deeper level sits in the full-resolution branch*, and the pooled
branch is only ``max-pool -> residual blocks -> nearest x2``. With a 48x48 input the
deepest resolution is therefore 24x24. One level of depth ``n`` is::

    upper = [residual] * n_modules  ->  (n > 1: level(n - 1) -> residual)
    lower = max-pool -> [residual] * n_modules
            -> (n == 1: [residual] * n_modules) -> [residual] * n_modules -> nearest x2
    out   = upper + lower

With ``n_modules = 3`` and ``depth = 4`` that is 42 residual blocks per hourglass, exactly
the released count (the residual that follows the hourglass belongs to the stack).
"""

from __future__ import annotations

import torch
from torch import nn

from vrn.models.blocks import Bottleneck

__all__ = ["VRNHourglass", "StandardHourglass"]


def _residuals(features: int, count: int) -> list[nn.Module]:
    return [Bottleneck(features, features) for _ in range(count)]


class VRNHourglass(nn.Module):
    """The released VRN hourglass level (recursion in the full-resolution branch).

    Args:
        depth: number of nested levels (4 in the released model).
        features: channel count (256).
        n_modules: residual blocks per branch segment (3).
    Shapes:
        x: (B, features, H, W) -> (B, features, H, W); H, W divisible by 2.
    """

    def __init__(self, depth: int = 4, features: int = 256, n_modules: int = 3) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"hourglass depth must be >= 1, got {depth}")
        upper: list[nn.Module] = _residuals(features, n_modules)
        if depth > 1:
            upper += [VRNHourglass(depth - 1, features, n_modules), Bottleneck(features, features)]
        self.upper = nn.Sequential(*upper)
        n_lower = 3 * n_modules if depth == 1 else 2 * n_modules
        self.lower = nn.Sequential(
            nn.MaxPool2d(2, 2),
            *_residuals(features, n_lower),
            nn.Upsample(scale_factor=2, mode="nearest"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upper(x) + self.lower(x)


class StandardHourglass(nn.Module):
    """Newell et al. (ECCV 2016) hourglass: recursion in the pooled branch.

    Deepest resolution is ``H / 2**depth``. Same arguments and shapes as :class:`VRNHourglass`.
    """

    def __init__(self, depth: int = 4, features: int = 256, n_modules: int = 1) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"hourglass depth must be >= 1, got {depth}")
        self.upper = nn.Sequential(*_residuals(features, n_modules))
        inner: nn.Module = (
            StandardHourglass(depth - 1, features, n_modules)
            if depth > 1
            else nn.Sequential(*_residuals(features, n_modules))
        )
        self.lower = nn.Sequential(
            nn.MaxPool2d(2, 2),
            *_residuals(features, n_modules),
            inner,
            *_residuals(features, n_modules),
            nn.Upsample(scale_factor=2, mode="nearest"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upper(x) + self.lower(x)

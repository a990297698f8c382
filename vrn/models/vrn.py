"""The VRN network: stem, stacked hourglass stages, volumetric head."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from vrn.conventions import DEPTH_BINS
from vrn.models.blocks import Bottleneck, ConvBnRelu, SeparableBilinearUpsample
from vrn.models.hourglass import StandardHourglass, VRNHourglass

__all__ = ["VRN"]


class VRN(nn.Module):
    """Volumetric Regression Network (Jackson et al., ICCV 2017), unguided variant.

    Layer for layer as the released graph when built with the defaults::

        stem : conv7x7/2 (3->64), BN, ReLU, residual 64->128, max-pool 2,
               residual 128->128, residual 128->256
        stage: x + f(x),  f = hourglass -> residual -> 2 x [conv1x1, BN, ReLU]
               (stacked ``stacks`` times; no intermediate supervision)
        head : conv1x1 (F->F), BN, ReLU, conv1x1 (F->depth_bins), bilinear x4

    The head returns *logits*; the released model ends in a sigmoid, which belongs to the
    loss (``BCEWithLogits``) and to inference here.

    Args:
        depth_bins: output channels = depth bins of the volume (:data:`vrn.conventions.DEPTH_BINS`).
        features: hourglass width (256).
        stacks: number of hourglass stages (2).
        hourglass: ``"vrn"`` (released nesting) or ``"standard"`` (Newell et al.).
        hourglass_depth: nested levels per hourglass (4).
        n_modules: residual blocks per hourglass branch segment (3 for "vrn").
        stem_channels: widths of the first two stem stages (64, 128).
        in_channels: 3 for RGB.
        align_corners: bilinear x4 mode; True matches Torch7's SpatialUpSamplingBilinear.
        prior_occupancy: initial bias of the last convolution is logit(prior_occupancy),
            so training starts from the right fraction of occupied voxels (faster, stabler
            start than p = 0.5 everywhere); None keeps PyTorch's default initialisation.
    Shapes:
        x: (B, 3, H, W) float32 RGB in [0, 1], H and W divisible by ``4 * 2**levels``
        returns logits (B, depth_bins, H, W) indexed (depth bin, row, column).
    """

    def __init__(
        self,
        depth_bins: int = DEPTH_BINS,
        features: int = 256,
        stacks: int = 2,
        hourglass: Literal["vrn", "standard"] = "vrn",
        hourglass_depth: int = 4,
        n_modules: int = 3,
        stem_channels: tuple[int, int] = (64, 128),
        in_channels: int = 3,
        align_corners: bool = True,
        prior_occupancy: float | None = 0.1,
    ) -> None:
        super().__init__()
        for name, value in dict(
            depth_bins=depth_bins,
            features=features,
            stacks=stacks,
            hourglass_depth=hourglass_depth,
            n_modules=n_modules,
        ).items():
            if int(value) < 1:
                raise ValueError(f"VRN: {name} must be >= 1, got {value}")
        if hourglass not in ("vrn", "standard"):
            raise ValueError(f"VRN: hourglass must be 'vrn' or 'standard', got {hourglass!r}")
        c1, c2 = stem_channels
        self.depth_bins = depth_bins
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c1, 7, stride=2, padding=3),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            Bottleneck(c1, c2),
            nn.MaxPool2d(2, 2),
            Bottleneck(c2, c2),
            Bottleneck(c2, features),
        )
        hg = VRNHourglass if hourglass == "vrn" else StandardHourglass
        self.stages = nn.ModuleList(
            nn.Sequential(
                hg(hourglass_depth, features, n_modules),
                Bottleneck(features, features),
                ConvBnRelu(features, features),
                ConvBnRelu(features, features),
            )
            for _ in range(stacks)
        )
        self.head = nn.Sequential(ConvBnRelu(features, features), nn.Conv2d(features, depth_bins, 1))
        self.upsample = SeparableBilinearUpsample(4, align_corners)
        if prior_occupancy is not None:
            if not 0.0 < prior_occupancy < 1.0:
                raise ValueError(f"VRN: prior_occupancy must be in (0, 1), got {prior_occupancy}")
            nn.init.constant_(self.head[-1].bias, math.log(prior_occupancy / (1 - prior_occupancy)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = self.stem(x)
        for stage in self.stages:
            x = x + stage(x)
        logits = self.head(x)
        return self.upsample(logits, size=(int(size[0]), int(size[1])))

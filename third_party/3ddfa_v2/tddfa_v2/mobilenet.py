"""MobileNetV1 (Howard et al., 2017) 3DMM-parameter regressor used by 3DDFA_V2.

Our own implementation. The layer layout (a stride-2 3x3 stem, 13 depthwise-separable
blocks, global average pooling and one linear layer with 62 outputs = 12 pose + 40
shape + 10 expression parameters) and the attribute names follow the upstream
checkpoints ``mb05_120x120.pth`` / ``mb1_120x120.pth`` so that they load directly.
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["MobileNetV1", "ARCH_WIDTH", "build_regressor", "load_regressor_weights"]

#: architecture name -> width multiplier
ARCH_WIDTH: dict[str, float] = {"mb05": 0.5, "mb1": 1.0}

# (name, out_channels at width 1, stride) of the depthwise-separable blocks
_BLOCKS: tuple[tuple[str, int, int], ...] = (
    ("dw2_1", 64, 1),
    ("dw2_2", 128, 2),
    ("dw3_1", 128, 1),
    ("dw3_2", 256, 2),
    ("dw4_1", 256, 1),
    ("dw4_2", 512, 2),
    ("dw5_1", 512, 1),
    ("dw5_2", 512, 1),
    ("dw5_3", 512, 1),
    ("dw5_4", 512, 1),
    ("dw5_5", 512, 1),
    ("dw5_6", 1024, 2),
    ("dw6", 1024, 1),
)


class _DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.bn_dw = nn.BatchNorm2d(cin)
        self.conv_sep = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn_sep = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn_dw(self.conv_dw(x)))
        return self.relu(self.bn_sep(self.conv_sep(x)))


class MobileNetV1(nn.Module):
    """MobileNetV1 with a width multiplier; input (B, 3, 120, 120), output (B, num_outputs)."""

    def __init__(self, width: float = 1.0, num_outputs: int = 62, in_channels: int = 3) -> None:
        super().__init__()
        self.width = width
        c = int(32 * width)
        self.conv1 = nn.Conv2d(in_channels, c, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        for name, cout, stride in _BLOCKS:
            cout = int(cout * width)
            setattr(self, name, _DepthwiseSeparable(c, cout, stride))
            c = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for name, _, _ in _BLOCKS:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_regressor(arch: str, num_outputs: int = 62) -> MobileNetV1:
    """An untrained regressor for ``arch`` in :data:`ARCH_WIDTH` ("mb05" or "mb1")."""
    if arch not in ARCH_WIDTH:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCH_WIDTH)}")
    return MobileNetV1(width=ARCH_WIDTH[arch], num_outputs=num_outputs)


def load_regressor_weights(model: MobileNetV1, path: str | os.PathLike) -> MobileNetV1:
    """Load an upstream 3DDFA_V2 checkpoint into ``model``.

    Upstream checkpoints hold ``{"epoch", "state_dict"}`` with keys prefixed ``module.``
    (DataParallel) and the 62-d head stored as ``fc_param``; an auxiliary landmark head
    ``fc_lm`` is not used at inference and is ignored.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    own = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key[len("module.") :] if key.startswith("module.") else key
        if k.startswith("fc_param."):
            k = "fc." + k[len("fc_param.") :]
        if k in own:
            new[k] = value
    missing = sorted(set(own) - set(new))
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks weights for {missing[:5]} ...")
    model.load_state_dict(new, strict=True)
    return model

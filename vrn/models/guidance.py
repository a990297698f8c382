"""VRN-Guided: the volume network with 2D landmark heatmaps stacked onto the image.

The VRN paper (Jackson et al., ICCV 2017, Sec. 3) trains a guided variant beside the
unguided one: a 68-landmark detector's heatmaps are stacked with the RGB crop as the volume
network's input, which tells the network where the face's parts are (pose) and leaves it
the depth. Here the landmarks come from the detector that already cuts the crop (the
3DDFA_V2 port offline, face-alignment for users; :mod:`vrn.detectors`), in crop px, and the
heatmaps are rendered inside the network from the (B, 68, 2) coordinates, so the training
data, inference and the checkpoint carry 68 points per face instead of 68 images.

``groups="points"`` renders one heatmap per landmark (the paper's 68 channels);
``groups="parts"`` sums them into the 9 facial parts of the 68-point (iBUG) scheme, which
keeps the part geometry (what the pose is read from) at 12 instead of 71 input channels.

Landmark order: the 68-point iBUG scheme (:mod:`vrn.face_models.landmarks68`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from vrn.face_models.landmarks68 import N_LANDMARKS
from vrn.models.vrn import VRN

__all__ = [
    "LANDMARK_PARTS",
    "GUIDANCE_GROUPS",
    "LandmarkHeatmaps",
    "GuidedVRN",
]

#: facial part of each landmark: jaw, brow, brow, nose bridge, nostrils, eye, eye, outer lips,
#: inner lips (parts 1 / 2 and 5 / 6 swap under a flip, as their landmarks do)
LANDMARK_PARTS = np.repeat(np.arange(9), [17, 5, 5, 4, 5, 6, 6, 12, 8]).astype(np.int64)

#: heatmap channels of each ``groups`` value
GUIDANCE_GROUPS = {"points": N_LANDMARKS, "parts": int(LANDMARK_PARTS.max()) + 1}


class LandmarkHeatmaps(nn.Module):
    """Gaussian heatmaps of 68 landmarks, one channel per landmark or per facial part.

    Channel g at pixel (r, c) is ``sum_{k in g} exp(-((c - x_k)^2 + (r - y_k)^2) / (2 sigma^2))``
    (peak 1 at an isolated landmark); a non-finite landmark contributes nothing. Rendered
    separably (one x and one y profile per landmark, combined by one einsum), so the cost is
    a (B, G, H, W) matrix product, not a loop over landmarks.

    Args:
        groups: ``"points"`` (68 channels) or ``"parts"`` (9, :data:`LANDMARK_PARTS`).
        sigma_px: Gaussian standard deviation, crop px.
    Shapes:
        landmarks: (B, 68, 2) float crop px (x, y); returns (B, G, H, W) float32.
    """

    def __init__(self, groups: Literal["points", "parts"] = "parts", sigma_px: float = 3.0) -> None:
        super().__init__()
        if groups not in GUIDANCE_GROUPS:
            raise ValueError(f"guidance groups must be one of {sorted(GUIDANCE_GROUPS)}, got {groups!r}")
        if not sigma_px > 0:
            raise ValueError(f"guidance sigma_px must be > 0, got {sigma_px}")
        self.groups = groups
        self.sigma_px = float(sigma_px)
        part = np.arange(N_LANDMARKS) if groups == "points" else LANDMARK_PARTS
        assign = torch.zeros(N_LANDMARKS, GUIDANCE_GROUPS[groups])
        assign[torch.arange(N_LANDMARKS), torch.from_numpy(part)] = 1.0
        self.register_buffer("assign", assign, persistent=False)

    @property
    def channels(self) -> int:
        return GUIDANCE_GROUPS[self.groups]

    def forward(self, landmarks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if landmarks.ndim != 3 or landmarks.shape[1] != N_LANDMARKS or landmarks.shape[2] < 2:
            raise ValueError(f"guidance landmarks must be (B, {N_LANDMARKS}, 2) crop px, got {tuple(landmarks.shape)}")
        h, w = int(size[0]), int(size[1])
        xy = landmarks[..., :2].float()
        ok = torch.isfinite(xy).all(-1, keepdim=True)  # (B, 68, 1)
        xy = torch.where(ok, xy, torch.zeros_like(xy))
        k = -0.5 / (self.sigma_px * self.sigma_px)
        cols = torch.arange(w, device=xy.device, dtype=torch.float32)
        rows = torch.arange(h, device=xy.device, dtype=torch.float32)
        gx = torch.exp(k * (cols - xy[..., 0:1]) ** 2) * ok  # (B, 68, W)
        gy = torch.exp(k * (rows - xy[..., 1:2]) ** 2)  # (B, 68, H)
        return torch.einsum("kg,bkh,bkw->bghw", self.assign.to(gx.dtype), gy, gx)


class GuidedVRN(nn.Module):
    """A :class:`~vrn.models.vrn.VRN` whose input is the RGB crop stacked with landmark heatmaps.

    Args:
        groups, sigma_px: the heatmaps (:class:`LandmarkHeatmaps`).
        **vrn_kwargs: the volume network (:class:`~vrn.models.vrn.VRN`; ``in_channels`` is
            3 + the heatmap channels).
    Shapes:
        image: (B, 3, H, W) float RGB [0, 1]; landmarks: (B, 68, 2) float crop px (x, y);
        returns logits (B, depth_bins, H, W), as the unguided VRN.
    Attributes:
        needs_landmarks: True (inference and training pass the crop's landmarks).
    """

    needs_landmarks = True

    def __init__(self, groups: Literal["points", "parts"] = "parts", sigma_px: float = 3.0, **vrn_kwargs) -> None:
        super().__init__()
        self.heatmaps = LandmarkHeatmaps(groups, sigma_px)
        if "in_channels" in vrn_kwargs:
            raise ValueError("GuidedVRN sets in_channels itself (3 + the heatmap channels)")
        self.vrn = VRN(in_channels=3 + self.heatmaps.channels, **vrn_kwargs)
        self.depth_bins = self.vrn.depth_bins

    def forward(self, image: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        if landmarks is None:
            raise ValueError(
                "this is a guided VRN: it needs each crop's 68 landmarks (B, 68, 2) in crop px beside the image"
            )
        heat = self.heatmaps(landmarks.to(image.device), tuple(image.shape[-2:])).to(image.dtype)
        x = torch.cat([image, heat], dim=1)
        if image.dim() == 4 and image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous():
            x = x.contiguous(memory_format=torch.channels_last)  # the NHWC layout the caller chose
        return self.vrn(x)

    @torch.no_grad()
    def load_unguided(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Start from an unguided VRN's weights of the same size: every layer copied, the
        first convolution's heatmap input channels set to zero (so the guided network starts
        as exactly that unguided network and learns what the heatmaps add).

        Raises:
            ValueError: the weights do not fit (names the first differing tensor).
        """
        own = self.vrn.state_dict()
        first = "stem.0.weight"
        for name, t in own.items():
            src = state_dict.get(name)
            if src is None:
                raise ValueError(f"unguided weights lack {name}")
            want = (t.shape[0], 3, *t.shape[2:]) if name == first else tuple(t.shape)
            if tuple(src.shape) != tuple(want):
                raise ValueError(f"unguided weight {name} is {tuple(src.shape)}, this network needs {want}")
        w = torch.zeros_like(own[first])
        w[:, :3] = state_dict[first]
        merged = {**{k: state_dict[k] for k in own}, first: w}
        self.vrn.load_state_dict(merged)

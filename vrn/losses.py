"""VRN's loss: per-voxel sigmoid binary cross-entropy on logits."""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["volume_bce_loss"]


class _MeanBCEWithLogits(torch.autograd.Function):
    """mean(softplus(x) - x * t): the same value and gradient as
    ``F.binary_cross_entropy_with_logits(x, t)`` for t in {0, 1}, in fewer passes over the
    (B, 200, 192, 192) volume (about 1.7x faster on CPU)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits, target)
        flat_x, flat_t = logits.reshape(-1), target.reshape(-1)
        return (F.softplus(flat_x).sum() - torch.dot(flat_x, flat_t)) / flat_x.numel()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        logits, target = ctx.saved_tensors
        return torch.sigmoid(logits).sub_(target).mul_(grad / logits.numel()), None


def volume_bce_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float | None = None) -> torch.Tensor:
    """Per-voxel sigmoid binary cross-entropy, averaged over all voxels (VRN's loss).

    Not a softmax across depth: every voxel is an independent occupied/empty decision.

    Args:
        logits: (B, D, H, W) float32.
        target: (B, D, H, W) float32 in {0, 1} (same dtype as logits).
        pos_weight: optional weight of occupied voxels (falls back to PyTorch's BCE).
    Returns:
        scalar loss.
    """
    if pos_weight is not None:
        pw = torch.tensor(pos_weight, device=logits.device, dtype=logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)
    if target.dtype != logits.dtype:
        target = target.to(logits.dtype)
    return _MeanBCEWithLogits.apply(logits, target)

"""The loss and metrics on hand-computed cases."""

from __future__ import annotations

import math

import torch

from vrn.losses import volume_bce_loss
from vrn.metrics import front_depth_mae, voxel_iou
from vrn.volume.surface import front_depth


def test_bce_loss_hand_computed():
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0]).view(1, 4, 1, 1)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 4, 1, 1)
    expected = (
        -math.log(0.5)
        - math.log(1 - 1 / (1 + math.exp(-2.0)))
        - math.log(1 - 1 / (1 + math.exp(1.0)))
        - math.log(1 / (1 + math.exp(-3.0)))
    ) / 4
    assert abs(float(volume_bce_loss(logits, target)) - expected) < 1e-6


def test_bce_is_per_voxel_not_softmax_over_depth():
    """Two occupied bins in one column must both be able to reach ~zero loss."""
    logits = torch.full((1, 3, 1, 1), 20.0)
    logits[0, 0] = -20.0
    target = torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1, 1)
    assert float(volume_bce_loss(logits, target)) < 1e-6


def test_voxel_iou_and_front_depth():
    t = torch.zeros(1, 10, 2, 2, dtype=torch.bool)
    p = torch.zeros_like(t)
    t[0, 0:6, 0, 0] = True  # front at 5
    p[0, 0:4, 0, 0] = True  # front at 3
    p[0, 0:2, 1, 1] = True  # a false-positive column
    assert torch.allclose(voxel_iou(p, t), torch.tensor([4 / 8]))
    fd = front_depth(t)
    assert fd[0, 0, 0] == 5 and fd[0, 1, 1] == -1
    assert torch.allclose(front_depth_mae(p, t), torch.tensor([2.0]))
    empty = torch.zeros_like(t)
    assert torch.allclose(voxel_iou(empty, empty), torch.tensor([1.0]))
    assert torch.isnan(front_depth_mae(empty, t)).all()


def test_fast_bce_matches_pytorch_value_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    t = (torch.rand(2, 5, 6, 7) > 0.7).double()
    ours = volume_bce_loss(x, t)
    (g1,) = torch.autograd.grad(ours, x)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(x, t)
    (g2,) = torch.autograd.grad(ref, x)
    assert torch.allclose(ours, ref) and torch.allclose(g1, g2)
    assert torch.autograd.gradcheck(lambda z: volume_bce_loss(z, t), (x,))

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


def test_training_loss_is_float32_under_bf16_autocast():
    """Under bf16 autocast (trainer.precision=bf16-mixed) the network runs in bf16 but the loss
    over the whole volume stays float32, equal to the loss of the same bf16 logits in float32."""
    import functools

    import numpy as np

    from vrn.data.datamodule import collate_volumes
    from vrn.lit_module import VRNLitModule
    from vrn.volume.codec import encode

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    module = VRNLitModule({"name": "vrn_tiny", "depth_bins": 8}, functools.partial(torch.optim.Adam))
    items, occ = [], []
    for i in range(2):
        lo = rng.integers(0, 4, (32, 32))
        hi = lo + rng.integers(0, 5, (32, 32))
        vol = (np.arange(8)[:, None, None] >= lo) & (np.arange(8)[:, None, None] < hi)
        code = encode(vol)
        occ.append(torch.from_numpy(vol))
        items.append(
            {
                "image": torch.rand(3, 32, 32),
                "lo": torch.from_numpy(code.lo),
                "hi": torch.from_numpy(code.hi),
                "extra": torch.from_numpy(code.extra.astype(np.int64)).reshape(-1, 3),
                "id": str(i),
            }
        )
    batch = collate_volumes(items)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module._step(batch, "train")
        logits = module(batch["image"])
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), torch.stack(occ).float())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

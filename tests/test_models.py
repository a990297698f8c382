"""Every registered VRN variant: forward and backward on a tiny input; the released layout."""

from __future__ import annotations

import pytest
import torch

from vrn.models import VRN, create_model, list_models
from vrn.models.blocks import Bottleneck
from vrn.models.hourglass import StandardHourglass, VRNHourglass


def test_registry_lists_variants():
    assert {"vrn_unguided", "vrn_standard", "vrn_small", "vrn_tiny"} <= set(list_models())
    with pytest.raises(KeyError, match="Unknown model"):
        create_model("vrn_nope")


@pytest.mark.parametrize("name", list_models())
def test_variant_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, depth_bins=12)
    x = torch.rand(2, 3, 64, 64)
    if getattr(model, "needs_landmarks", False):  # guided variants: 68 landmarks per crop, crop px
        y = model(x, torch.rand(2, 68, 2) * 64)
    else:
        y = model(x)
    assert y.shape == (2, 12, 64, 64)
    y.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_vrn_compact_ships_under_10_mb():
    """The largest shippable variant: float32 weights under the 10 MB the repository allows."""
    n = sum(p.numel() for p in create_model("vrn_compact").parameters())
    assert n == pytest.approx(2.12e6, rel=0.01) and n * 4 < 10e6


def test_vrn_unguided_matches_released_graph():
    model = create_model("vrn_unguided")
    n_params = sum(p.numel() for p in model.parameters())
    # The released Torch7 VRN-unguided model has 19,184,968 parameters.
    assert n_params == 19_184_968
    assert len(model.stages) == 2
    for stage in model.stages:
        hg = stage[0]
        assert isinstance(hg, VRNHourglass)
        assert sum(isinstance(m, Bottleneck) for m in hg.modules()) == 42
        assert isinstance(stage[1], Bottleneck)
    assert model.head[-1].out_channels == 200


def test_vrn_unguided_output_shape_full_size():
    model = create_model("vrn_unguided").eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 192, 192))
    assert y.shape == (1, 200, 192, 192)


def test_vrn_hourglass_deepest_resolution_is_half():
    """The released nesting pools once per level relative to the full-resolution branch."""
    hg = VRNHourglass(depth=4, features=8, n_modules=1)
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
        for m in hg.modules()
        if isinstance(m, torch.nn.MaxPool2d)
    ]
    hg(torch.rand(1, 8, 48, 48))
    for h in hooks:
        h.remove()
    assert min(seen) == 24
    std = StandardHourglass(depth=4, features=8, n_modules=1)
    seen.clear()
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
        for m in std.modules()
        if isinstance(m, torch.nn.MaxPool2d)
    ]
    std(torch.rand(1, 8, 48, 48))
    assert min(seen) == 3


def test_bad_model_arguments_are_named():
    with pytest.raises(ValueError, match="stacks"):
        VRN(stacks=0)
    with pytest.raises(ValueError, match="hourglass"):
        VRN(hourglass="resnet")  # type: ignore[arg-type]


@pytest.mark.parametrize("align_corners", [True, False])
def test_separable_upsample_equals_bilinear(align_corners):
    from vrn.models.blocks import SeparableBilinearUpsample

    x = torch.randn(2, 5, 12, 9, dtype=torch.float64)
    ref = torch.nn.functional.interpolate(x, size=(48, 36), mode="bilinear", align_corners=align_corners)
    ours = SeparableBilinearUpsample(4, align_corners)(x)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_head_bias_starts_at_prior_occupancy():
    model = create_model("vrn_tiny", prior_occupancy=0.1).eval()
    with torch.no_grad():
        p = torch.sigmoid(model(torch.rand(1, 3, 64, 64)))
    assert 0.02 < float(p.mean()) < 0.3


def test_compiled_upsample_does_not_recompile():
    """torch.compile traces the head's resize once: filling the matrix cache inside a compiled
    call used to make Dynamo recompile the whole network on its second call."""
    from vrn.models.blocks import SeparableBilinearUpsample

    torch._dynamo.reset()
    up = SeparableBilinearUpsample(4)
    compiled = torch.compile(up, backend="eager")
    x = torch.randn(1, 3, 6, 5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        first, second = compiled(x), compiled(x)
    ref = torch.nn.functional.interpolate(x, scale_factor=4, mode="bilinear", align_corners=True)
    assert torch.allclose(first, ref, atol=1e-5) and torch.equal(first, second)
    torch._dynamo.reset()

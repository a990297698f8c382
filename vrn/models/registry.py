"""Model variants registered by name (timm style): ``create_model("vrn_unguided")``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from vrn.models.guidance import GuidedVRN
from vrn.models.vrn import VRN

__all__ = ["register_model", "create_model", "list_models"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model factory under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model '{fn.__name__}' registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered variant; ``overrides`` replace its default arguments."""
    if name not in _REGISTRY:
        raise KeyError(f"Unknown model '{name}'. Registered: {', '.join(list_models())}")
    return _REGISTRY[name](**overrides)


def _variant(defaults: dict[str, Any], overrides: dict[str, Any]) -> VRN:
    return VRN(**{**defaults, **overrides})


# the sizes of the variants, shared by the unguided and the guided factories (a guided variant
# starts from its unguided twin's weights: GuidedVRN.load_unguided)
_RELEASED = dict(features=256, stacks=2, hourglass="vrn", hourglass_depth=4, n_modules=3)
_MEDIUM = dict(features=128, stacks=1, hourglass="vrn", hourglass_depth=3, n_modules=1, stem_channels=(32, 64))
_TINY = dict(features=32, stacks=1, hourglass="vrn", hourglass_depth=1, n_modules=1, stem_channels=(16, 32))


@register_model
def vrn_unguided(**kw: Any) -> VRN:
    """The released VRN-unguided network: 2 stacks, 256 features, 4-level VRN hourglass (19.18 M params)."""
    return _variant(_RELEASED, kw)


@register_model
def vrn_standard(**kw: Any) -> VRN:
    """Same stem/head with Newell et al.'s standard hourglass (recursion in the pooled branch)."""
    return _variant(dict(features=256, stacks=2, hourglass="standard", hourglass_depth=4, n_modules=1), kw)


@register_model
def vrn_small(**kw: Any) -> VRN:
    """A CPU-trainable VRN: 1 stack, 64 features, 2-level VRN hourglass, one block per segment."""
    return _variant(
        dict(features=64, stacks=1, hourglass="vrn", hourglass_depth=2, n_modules=1, stem_channels=(32, 64)), kw
    )


@register_model
def vrn_medium(**kw: Any) -> VRN:
    """A CPU-trainable VRN for real faces: 1 stack, 128 features, 3-level VRN hourglass (0.87 M
    params; ~1.6x the step time of vrn_small, whose cost is mostly the 200-bin head and loss)."""
    return _variant(_MEDIUM, kw)


@register_model
def vrn_compact(**kw: Any) -> VRN:
    """The released layout (2 stacks, 4-level VRN hourglass, stem 64 / 128) at half width (128
    features) with one block per segment: 2.12 M params, 8.5 MB in float32, the largest variant
    here that ships under 10 MB; ~1.6x the CPU step time of vrn_medium (the 200-bin head and the
    loss dominate both)."""
    return _variant(
        dict(features=128, stacks=2, hourglass="vrn", hourglass_depth=4, n_modules=1, stem_channels=(64, 128)), kw
    )


@register_model
def vrn_tiny(**kw: Any) -> VRN:
    """Smallest variant for tests: 1 stack, 32 features, 1-level hourglass."""
    return _variant(_TINY, kw)


def _guided(defaults: dict[str, Any], groups: str, overrides: dict[str, Any]) -> nn.Module:
    return GuidedVRN(**{**defaults, "groups": groups, **overrides})


@register_model
def vrn_guided(**kw: Any) -> nn.Module:
    """The paper's VRN-Guided: the released unguided network's layout with the crop's 68 landmark
    heatmaps stacked onto the image (``groups="points"``, 71 input channels; :mod:`vrn.models.guidance`)."""
    return _guided(_RELEASED, "points", kw)


@register_model
def vrn_medium_guided(**kw: Any) -> nn.Module:
    """vrn_medium guided by the crop's landmarks as 9 facial-part heatmaps (12 input channels);
    starts from vrn_medium's weights with ``model.init_weights`` (:meth:`GuidedVRN.load_unguided`)."""
    return _guided(_MEDIUM, "parts", kw)


@register_model
def vrn_tiny_guided(**kw: Any) -> nn.Module:
    """Smallest guided variant for tests (vrn_tiny's network, 9 part heatmaps)."""
    return _guided(_TINY, "parts", kw)

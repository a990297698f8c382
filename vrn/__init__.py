"""vrn: volumetric regression network for 3D face reconstruction."""

from __future__ import annotations

from typing import Any

__all__ = ["Reconstructor"]


def __getattr__(name: str) -> Any:
    # lazy: ``import vrn`` stays cheap (no torch / detector imports until used)
    if name == "Reconstructor":
        from vrn.inference import Reconstructor

        return Reconstructor
    raise AttributeError(f"module 'vrn' has no attribute {name!r}")

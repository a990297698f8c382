"""Our adapters to the 3DDFA_V2 port (:mod:`tddfa_v2`): every model file is resolved
through :mod:`vrn.assets` here, and the port gets plain file paths (it knows nothing of
vrn). The BFM comes from :func:`vrn.face_models.bfm.load_bfm` (cached per process)."""

from __future__ import annotations

import os

from tddfa_v2 import TDDFA, FaceBoxesDetector
from tddfa_v2.mobilenet import ARCH_WIDTH
from vrn.assets import resolve
from vrn.face_models.bfm import load_bfm

__all__ = ["load_faceboxes", "load_tddfa"]


def load_tddfa(
    arch: str = "mb05",
    device: str = "cpu",
    bfm_source: str = "auto",
    checkpoint: str | os.PathLike | None = None,
    param_stats: str | os.PathLike | None = None,
) -> TDDFA:
    """The 3DDFA_V2 regressor + BFM.

    Args:
        arch: "mb05" (asset ``3ddfa_v2/mb05_120x120.pth``) or "mb1" (``mb1_120x120.pth``).
        device: torch device for the regressor.
        bfm_source: "auto", "bfm_noneck_v3" or "offline_standin" (see :func:`load_bfm`).
        checkpoint, param_stats: explicit paths (a config value) that win over the registry.

    Raises:
        ValueError: unknown ``arch`` or ``bfm_source``.
        vrn.assets.AssetNotFoundError: a model file cannot be resolved.
    """
    if arch not in ARCH_WIDTH:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCH_WIDTH)}")
    weights = resolve(f"3ddfa_v2/{arch}_120x120.pth", path=checkpoint)
    stats = resolve("3ddfa_v2/param_mean_std_62d_120x120.pkl", path=param_stats)
    return TDDFA(weights, stats, load_bfm(bfm_source), arch=arch, device=device)


def load_faceboxes(
    device: str = "cpu", score_threshold: float | None = 0.5, weights: str | os.PathLike | None = None
) -> FaceBoxesDetector:
    """The FaceBoxes face detector of 3DDFA_V2 (asset ``3ddfa_v2/FaceBoxesProd.pth``, or the
    explicit ``weights`` path); ``score_threshold`` None = upstream's 0.5.

    Raises:
        vrn.assets.AssetNotFoundError: the weights cannot be resolved.
    """
    return FaceBoxesDetector(
        resolve("3ddfa_v2/FaceBoxesProd.pth", path=weights), device=device, score_threshold=score_threshold
    )

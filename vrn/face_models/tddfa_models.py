"""Our adapters to the 3DDFA_V2 port (:mod:`tddfa_v2`): its model files come from
:mod:`vrn.assets`; the port itself takes file paths and knows nothing of vrn."""

from __future__ import annotations

from tddfa_v2 import TDDFA, FaceBoxesDetector

__all__ = ["load_tddfa", "load_faceboxes"]


def load_tddfa(arch: str = "mb05", device: str = "cpu", bfm_source: str = "auto") -> TDDFA:
    """The 3DDFA_V2 regressor + BFM (``bfm_source``: "auto", "bfm_noneck_v3", "offline_standin")."""
    return TDDFA(arch=arch, device=device, bfm_source=bfm_source)


def load_faceboxes(device: str = "cpu", score_threshold: float = 0.5) -> FaceBoxesDetector:
    """The FaceBoxes face detector of 3DDFA_V2."""
    return FaceBoxesDetector(device=device, score_threshold=score_threshold)

"""Annotation backend (``detector=mat``): the 68 landmarks stored in the 300W-LP /
AFLW2000-3D ``.mat`` beside each image, for datasets that come with their own fit.

``pt3d_68`` (AFLW2000-3D) or ``pt2d`` (300W-LP, 68 points) when present, else the 68
landmarks of the .mat's 3DMM fit (``landmarks="fit"`` forces those). The .mat's
coordinates are MATLAB 1-based; they are shifted to the project's 0-based pixel centres.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vrn.detectors.base import Detection, FaceDetector, register_detector
from vrn.face_models.mat_fit import MatFitError, load_mat_fit, mat_annotation, mat_landmarks, mat_path_for

__all__ = ["MatLandmarks"]


@register_detector("mat")
class MatLandmarks(FaceDetector):
    """One face per image from its ``.mat``.

    Args:
        landmarks: "annotation" (pt3d_68 / pt2d, falling back to the fit) or "fit".
    """

    def __init__(
        self, device: str = "cpu", min_score: float = 0.0, max_faces: int | None = None, landmarks: str = "annotation"
    ) -> None:
        super().__init__(device=device, min_score=min_score, max_faces=max_faces)
        if landmarks not in ("annotation", "fit"):
            raise ValueError(f"detector.landmarks must be 'annotation' or 'fit', got {landmarks!r}")
        self.landmarks = landmarks

    def _detect(self, image_rgb: np.ndarray, image_path: str | None) -> list[Detection]:
        if image_path is None:
            raise ValueError("the 'mat' detector needs the image path (to find the .mat beside it)")
        try:
            mat = load_mat_fit(mat_path_for(image_path))
        except MatFitError:
            return []
        lm = mat_annotation(mat) if self.landmarks == "annotation" else None
        if lm is None:
            lm = mat_landmarks(mat, image_rgb.shape[0])[:, :2]
        box = np.concatenate([lm.min(0), lm.max(0)])
        return [Detection(box=box, score=1.0, landmarks=lm)]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "landmarks": self.landmarks}

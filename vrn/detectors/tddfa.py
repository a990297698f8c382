"""FaceBoxes boxes + 3DDFA_V2 68 landmarks (``detector=tddfa``); runs offline with the
project's assets (:mod:`tddfa_v2`, weights through :mod:`vrn.assets`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from vrn.detectors.base import Detection, FaceDetector, register_detector
from vrn.face_models.tddfa_models import load_faceboxes, load_tddfa

__all__ = ["TDDFADetector"]


@register_detector("tddfa")
class TDDFADetector(FaceDetector):
    """FaceBoxes + 3DDFA_V2.

    Args:
        device: torch device.
        arch: 3DDFA_V2 regressor, "mb05" (shipped asset) or "mb1".
        min_score: FaceBoxes score cut (upstream uses 0.5).
        max_faces: keep at most this many faces.
        refine: run 3DDFA_V2 a second time from the ROI of its own landmarks (upstream's
            video-tracking policy); usually tightens the landmarks a little.
    """

    def __init__(self, device: str = "cpu", arch: str = "mb05", min_score: float = 0.5,
                 max_faces: int | None = None, refine: bool = False) -> None:
        super().__init__(device=device, min_score=min_score, max_faces=max_faces)
        self.arch = arch
        self.refine = bool(refine)
        self._m_boxes = None
        self._m_tddfa = None

    def _load(self) -> None:
        self._m_boxes = load_faceboxes(device=self.device, score_threshold=self.min_score)
        self._m_tddfa = load_tddfa(arch=self.arch, device=self.device)

    def _detect(self, image_rgb: np.ndarray, image_path: str | None) -> list[Detection]:
        boxes = np.asarray(self._m_boxes(image_rgb), dtype=np.float64).reshape(-1, 5)
        if len(boxes) == 0:
            return []
        results = self._m_tddfa(image_rgb, boxes[:, :4])
        if self.refine:
            results = [self._m_tddfa.from_landmarks(image_rgb, r.pts68)[0] for r in results]
        return [Detection(box=b[:4], score=float(b[4]), landmarks=r.pts68[:2].T) for b, r in zip(boxes, results)]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "arch": self.arch, "refine": self.refine}

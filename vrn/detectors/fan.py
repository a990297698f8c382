"""face-alignment backend (``detector=fan``): S3FD boxes + 2D-FAN-4 68 landmarks.

Bulat & Tzimiropoulos, "How far are we from solving the 2D & 3D face alignment problem?",
ICCV 2017; https://github.com/1adrianb/face-alignment (BSD-3). face-alignment downloads
its weights (S3FD ~86 MB, 2DFAN-4 ~95 MB) into ``$TORCH_HOME/hub/checkpoints`` on first
use, so this backend needs the internet once (or those files placed there by hand).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from vrn.detectors.base import Detection, FaceDetector, register_detector

__all__ = ["FANDetector"]


@register_detector("fan")
class FANDetector(FaceDetector):
    """face-alignment's ``FaceAlignment(LandmarksType.TWO_D, face_detector="sfd")``.

    Args:
        device: "cpu", "cuda", "mps".
        min_score: S3FD box score cut (face-alignment filters at 0.5 itself).
        max_faces: keep at most this many faces.
        face_detector: face-alignment detector backend ("sfd", "blazeface", ...).
        flip_input: average with the mirrored image (2x slower, a little more accurate).
    """

    def __init__(
        self,
        device: str = "cpu",
        min_score: float = 0.5,
        max_faces: int | None = None,
        face_detector: str = "sfd",
        flip_input: bool = False,
    ) -> None:
        super().__init__(device=device, min_score=min_score, max_faces=max_faces)
        self.face_detector = face_detector
        self.flip_input = bool(flip_input)
        self._m_fa = None

    def _load(self) -> None:
        import face_alignment

        kwargs: dict[str, Any] = {
            "device": self.device,
            "face_detector": self.face_detector,
            "flip_input": self.flip_input,
        }
        params = inspect.signature(face_alignment.FaceAlignment.__init__).parameters
        if "compile" in params:  # face-alignment >= 1.5 compiles by default: slow start, no gain here
            kwargs["compile"] = False
        self._m_fa = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, **kwargs)

    def landmarks_for_boxes(self, image_rgb: np.ndarray, boxes: np.ndarray) -> list[Detection]:
        """FAN landmarks for given boxes (N, 4|5) image px (no face detection)."""
        self.setup()
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, np.shape(boxes)[-1])
        if b.shape[1] == 4:
            b = np.hstack([b, np.ones((len(b), 1))])
        lms = self._m_fa.get_landmarks_from_image(image_rgb, detected_faces=list(b))
        return [
            Detection(box=bb[:4], score=float(bb[4]), landmarks=np.asarray(lm)[:, :2]) for bb, lm in zip(b, lms or [])
        ]

    def _detect(self, image_rgb: np.ndarray, image_path: str | None) -> list[Detection]:
        boxes = self._m_fa.face_detector.detect_from_image(image_rgb.copy())
        boxes = [np.asarray(b, dtype=np.float64) for b in boxes if float(b[4]) >= self.min_score]
        if not boxes:
            return []
        if self.max_faces is not None:  # FAN only on the boxes that will be kept
            boxes = sorted(boxes, key=lambda b: -float(b[4]))[: self.max_faces]
        return self.landmarks_for_boxes(image_rgb, np.stack(boxes))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "face_detector": self.face_detector, "flip_input": self.flip_input}

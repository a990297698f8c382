"""3DDFA_V2 68 landmarks, offline with the project's assets (:mod:`tddfa_v2`, weights
through :mod:`vrn.assets`).

* ``detector=tddfa``: FaceBoxes boxes, then 3DDFA_V2 on upstream's ROI of each box.
* ``detector=tddfa_roi``: no face detector: the whole image is 3DDFA_V2's ROI. For photos
  that already are 3DDFA's regressor inputs (e.g. the AFLW crops of 3DDFA / 2DASL,
  ``AFLW_GT_crop``: 120 x 120 crops around one face), where FaceBoxes misses tight faces.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vrn.detectors.base import Detection, FaceDetector, register_detector
from vrn.face_models.landmarks68 import mirror_landmarks
from vrn.face_models.tddfa_models import load_faceboxes, load_tddfa

__all__ = ["TDDFADetector", "TDDFARoiDetector", "port_landmarks"]


def port_landmarks(
    tddfa: Any,
    image_rgb: np.ndarray,
    boxes: np.ndarray,
    refine: bool,
    flip: bool,
    roi: bool = False,
    unflipped: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """The 3DDFA_V2 port's 68 landmarks for each ROI box.

    Args:
        tddfa: a loaded port (:func:`vrn.face_models.tddfa_models.load_tddfa`).
        image_rgb: (H, W, 3) uint8 RGB.
        boxes: (K, 4) float boxes ``x1, y1, x2, y2`` image px (pixel edges: ``[0, 0, W, H]`` is
            the whole image): face-detector boxes, from which the port takes upstream's ROI,
            or (``roi``) the ROIs themselves.
        refine: a second pass from the ROI of the first pass's landmarks.
        flip: also run on the mirrored image (mirrored boxes) and average the two sets of
            landmarks, mirrored back with the 68-point mirror order.
        unflipped: the K (68, 2) landmark sets of the unmirrored pass when the caller already
            has them (the same boxes, ``refine`` and ``roi``): that pass is not run again.
    Returns:
        K arrays (68, 2) float64 x, y image px (0-based pixel centres).
    """

    def one_side(img: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
        if not len(b):
            return []
        results = tddfa.from_roi_boxes(img, list(b)) if roi else tddfa(img, b)
        if refine:
            results = [tddfa.from_landmarks(img, r.pts68)[0] for r in results]
        return [np.asarray(r.pts68[:2].T, np.float64) for r in results]

    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if unflipped is not None and len(unflipped) != len(b):
        raise ValueError(f"port_landmarks: {len(unflipped)} unflipped landmark sets for {len(b)} boxes")
    marks = one_side(image_rgb, b) if unflipped is None else [np.asarray(m, np.float64) for m in unflipped]
    if not flip:
        return marks
    w = image_rgb.shape[1]
    mb = b.copy()
    mb[:, [0, 2]] = w - b[:, [2, 0]]  # box edges mirror as x -> W - x
    mirrored = one_side(np.ascontiguousarray(image_rgb[:, ::-1]), mb)
    return [(m + mirror_landmarks(q, w)) / 2.0 for m, q in zip(marks, mirrored)]


@register_detector("tddfa")
class TDDFADetector(FaceDetector):
    """FaceBoxes + 3DDFA_V2.

    Args:
        device: torch device.
        arch: 3DDFA_V2 regressor, "mb05" (shipped asset) or "mb1".
        min_score: FaceBoxes score cut (upstream uses 0.5).
        max_faces: keep at most this many faces.
        refine: run 3DDFA_V2 a second time from the ROI of its own landmarks (upstream's
            video-tracking policy). On by default: on the AFLW val photos (949 faces, through
            ``vrn.evaluate data=folder data.crop=detector``) it brings the landmarks from 1.98
            to 1.14 % 2D NME of the landmark ROI's and the shipped guided model's surface NME
            from 4.75 to 3.85 % (docs/benchmarks.md); costs one more regressor pass per face.
        flip: also run the port on the mirrored photo and average the landmarks (twice the
            regressor passes; :func:`port_landmarks`). On by default since the shipped guided
            model learnt from flip-averaged landmarks (``fitter.flip=true``): on the AFLW val
            photos (flip-averaged targets) its surface NME is 3.47 % balanced with one-sided
            landmarks and 3.19 % with these (docs/benchmarks.md, session 9). The pipeline's
            ``detector=tddfa`` keeps ``flip: false`` (conf/pipeline/detector/tddfa.yaml): it
            only cuts the crops there.
    """

    def __init__(
        self,
        device: str = "cpu",
        arch: str = "mb05",
        min_score: float = 0.5,
        max_faces: int | None = None,
        refine: bool = True,
        flip: bool = True,
    ) -> None:
        super().__init__(device=device, min_score=min_score, max_faces=max_faces)
        self.arch = arch
        self.refine = bool(refine)
        self.flip = bool(flip)
        self._m_boxes = None
        self._m_tddfa = None

    def _load(self) -> None:
        self._m_boxes = load_faceboxes(device=self.device, score_threshold=self.min_score)
        self._m_tddfa = load_tddfa(arch=self.arch, device=self.device)

    def _detect(self, image_rgb: np.ndarray, image_path: str | None) -> list[Detection]:
        boxes = np.asarray(self._m_boxes(image_rgb), dtype=np.float64).reshape(-1, 5)
        if len(boxes) == 0:
            return []
        marks = port_landmarks(self._m_tddfa, image_rgb, boxes[:, :4], self.refine, self.flip)
        return [Detection(box=b[:4], score=float(b[4]), landmarks=m) for b, m in zip(boxes, marks)]

    def describe(self) -> dict[str, Any]:
        d = {**super().describe(), "arch": self.arch, "refine": self.refine}
        return {**d, "flip": self.flip} if self.flip else d


@register_detector("tddfa_roi")
class TDDFARoiDetector(FaceDetector):
    """The whole image is the 3DDFA_V2 ROI: one face per image, no face detector.

    The ROI box is ``[0, 0, W, H]`` image px in the port's convention
    (:func:`tddfa_v2.tddfa.crop_image` cuts rows ``0..H-1`` and columns ``0..W-1``, i.e.
    exactly the image, and resizes it to 120 x 120; a 120 x 120 input goes to the regressor
    unchanged). A non-square image is stretched to 120 x 120 (3DDFA's ROIs are square: give
    this backend square crops).

    Returns one :class:`~vrn.detectors.base.Detection`: 68 landmarks (x, y) image px (x right,
    y down, 0-based pixel centres), ``box`` = the landmarks' bounding box, ``score`` 1.0 (no
    detector confidence exists).

    Args:
        device: torch device.
        arch: 3DDFA_V2 regressor, "mb05" (shipped asset) or "mb1".
        refine: run 3DDFA_V2 a second time from the ROI of its own landmarks (upstream's
            landmark policy, as ``tddfa``'s ``refine``).
        flip: average with the pass on the mirrored image (:func:`port_landmarks`).
    """

    def __init__(self, device: str = "cpu", arch: str = "mb05", refine: bool = False, flip: bool = False) -> None:
        super().__init__(device=device, min_score=0.0, max_faces=1)
        self.arch = arch
        self.refine = bool(refine)
        self.flip = bool(flip)
        self._m_tddfa = None

    def _load(self) -> None:
        self._m_tddfa = load_tddfa(arch=self.arch, device=self.device)

    def _detect(self, image_rgb: np.ndarray, image_path: str | None) -> list[Detection]:
        H, W = image_rgb.shape[:2]
        lm = port_landmarks(self._m_tddfa, image_rgb, np.array([[0.0, 0.0, W, H]]), self.refine, self.flip, roi=True)[0]
        return [Detection(box=np.concatenate([lm.min(0), lm.max(0)]), score=1.0, landmarks=lm)]

    def describe(self) -> dict[str, Any]:
        d = {**super().describe(), "arch": self.arch, "refine": self.refine, "roi": "whole_image"}
        return {**d, "flip": self.flip} if self.flip else d

"""dlib backend (``detector=dlib``, optional): HOG face detector + the 68-point shape
predictor shipped by ``face_recognition_models``. Install with ``pip install "vrn[dlib]"``."""

from __future__ import annotations

import numpy as np

from vrn.detectors.base import Detection, FaceDetector, register_detector

__all__ = ["DlibDetector"]

_INSTALL = (
    "the dlib detector needs the packages `dlib` and `face_recognition_models`: "
    'pip install "vrn[dlib]"  (or choose another backend: detector=tddfa)'
)


@register_detector("dlib")
class DlibDetector(FaceDetector):
    """dlib HOG + 68-landmark shape predictor.

    Args:
        upsample: times dlib upsamples the image before detecting (finds smaller faces).
        min_score, max_faces: see :class:`FaceDetector` (scores are dlib's HOG scores).
    """

    def __init__(
        self, device: str = "cpu", min_score: float = -1e9, max_faces: int | None = None, upsample: int = 1
    ) -> None:
        super().__init__(device=device, min_score=min_score, max_faces=max_faces)
        self.upsample = int(upsample)
        self._m_det = None
        self._m_pred = None
        check_dlib()

    def _load(self) -> None:
        import dlib
        import face_recognition_models

        self._m_det = dlib.get_frontal_face_detector()
        self._m_pred = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())

    def _detect(self, image_rgb: np.ndarray, image_path: str | None) -> list[Detection]:
        rects, scores, _ = self._m_det.run(image_rgb, self.upsample, -1.0)
        out = []
        for r, s in zip(rects, scores):
            shape = self._m_pred(image_rgb, r)
            lm = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
            out.append(Detection(box=[r.left(), r.top(), r.right(), r.bottom()], score=float(s), landmarks=lm))
        return out


def check_dlib() -> None:
    """Raise ImportError naming the extra to install when dlib is missing."""
    try:
        import dlib  # noqa: F401
        import face_recognition_models  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{_INSTALL} ({e})") from e

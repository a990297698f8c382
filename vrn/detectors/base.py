"""Face detectors behind one small base class, chosen by name (like face-alignment's
detector backends).

A detector takes an (H, W, 3) uint8 **RGB** image and returns one :class:`Detection` per
face: a box and 68 iBUG landmarks, both in image px (x right, y down, origin at the
centre of the top-left pixel; :mod:`vrn.conventions`).

Backends (``detector=<name>`` in the pipeline configs, or :func:`get_detector`):

========  ==================================================================================
tddfa     FaceBoxes + 3DDFA_V2 (mb05) 68 landmarks; offline with the project's assets
tddfa_roi 3DDFA_V2 on the whole image as its ROI (3DDFA-style face crops such as AFLW's 120 px)
fan       face-alignment: S3FD + 2D-FAN-4 (downloads its weights on first use)
dlib      dlib HOG detector + the 68-point shape predictor (``pip install "vrn[dlib]"``)
mat       the landmarks stored in the 300W-LP / AFLW2000-3D ``.mat`` beside each image
========  ==================================================================================

Models load lazily (first call or :meth:`FaceDetector.setup`), so a detector object is
cheap to build and to pickle into worker processes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from vrn.image_io import check_rgb_image

__all__ = [
    "Detection",
    "FaceDetector",
    "register_detector",
    "get_detector",
    "available_detectors",
    "DETECTOR_MODULES",
    "DEFAULT_DETECTOR",
]


@dataclass
class Detection:
    """One detected face.

    Attributes:
        box: (4,) float64 ``x1, y1, x2, y2`` image px.
        score: detector confidence (backend-specific scale; 1.0 for annotations).
        landmarks: (68, 2) float64 iBUG 68 landmarks (x, y) image px.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    def __post_init__(self) -> None:
        self.box = np.asarray(self.box, dtype=np.float64).reshape(4)
        self.landmarks = np.asarray(self.landmarks, dtype=np.float64)
        if self.landmarks.shape != (68, 2):
            raise ValueError(f"landmarks must be (68, 2), got {self.landmarks.shape}")
        self.score = float(self.score)


class FaceDetector:
    """Base class: subclasses set ``name`` and implement :meth:`_load` and :meth:`_detect`.

    Args:
        device: torch device string for backends that use torch.
        min_score: drop detections scoring below this.
        max_faces: keep at most this many (highest scores first); None = all.
    """

    name: ClassVar[str] = "base"

    def __init__(self, device: str = "cpu", min_score: float = 0.0, max_faces: int | None = None) -> None:
        self.device = device
        self.min_score = float(min_score)
        self.max_faces = None if max_faces is None else int(max_faces)
        self._loaded = False

    # -- to implement ---------------------------------------------------------------
    def _load(self) -> None:
        """Load models (called once)."""

    def _detect(self, image_rgb: np.ndarray, image_path: str | None) -> list[Detection]:
        raise NotImplementedError

    # -- public ---------------------------------------------------------------------
    def setup(self) -> FaceDetector:
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def detect(self, image_rgb: np.ndarray, image_path: str | None = None) -> list[Detection]:
        """All faces of an (H, W, 3) uint8 RGB image, ordered left to right (box x1, then y1).

        Args:
            image_rgb: the photo.
            image_path: its file (backends that read side files, e.g. ``mat``, need it).
        """
        check_rgb_image(image_rgb)
        self.setup()
        dets = [d for d in self._detect(image_rgb, image_path) if d.score >= self.min_score]
        dets = [d for d in dets if np.isfinite(d.landmarks).all()]
        if self.max_faces is not None:
            dets = sorted(dets, key=lambda d: -d.score)[: self.max_faces]
        return sorted(dets, key=lambda d: (round(float(d.box[0]), 3), round(float(d.box[1]), 3)))

    __call__ = detect

    def __getstate__(self) -> dict[str, Any]:
        # never ship loaded models to worker processes: they reload lazily
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_m_")}
        state["_loaded"] = False
        return state

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the detector (stored as provenance)."""
        return {"name": self.name, "min_score": self.min_score, "max_faces": self.max_faces}


_REGISTRY: dict[str, type[FaceDetector]] = {}
#: name -> module that registers it (imported on demand)
DETECTOR_MODULES: dict[str, str] = {
    "tddfa": "vrn.detectors.tddfa",
    "tddfa_roi": "vrn.detectors.tddfa",
    "fan": "vrn.detectors.fan",
    "dlib": "vrn.detectors.dlib",
    "mat": "vrn.detectors.mat",
}
#: the detector the API (:class:`vrn.Reconstructor`) and the demo use unless told otherwise:
#: face-alignment, the field's standard (downloads its weights once); offline, pass "tddfa"
DEFAULT_DETECTOR: str = "fan"


def register_detector(name: str) -> Callable[[type[FaceDetector]], type[FaceDetector]]:
    """Class decorator: make a :class:`FaceDetector` subclass available as ``name``."""

    def deco(cls: type[FaceDetector]) -> type[FaceDetector]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_detectors() -> list[str]:
    return sorted(set(DETECTOR_MODULES) | set(_REGISTRY))


def get_detector(name: str, **kwargs: Any) -> FaceDetector:
    """Build the detector registered as ``name`` (models load on first use).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in _REGISTRY and name in DETECTOR_MODULES:
        importlib.import_module(DETECTOR_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown detector '{name}' (detector={name}). Available: "
            f"{', '.join(available_detectors())}. Pick one with detector=<name>."
        )
    return _REGISTRY[name](**kwargs)

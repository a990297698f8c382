"""Face + 68-landmark detectors chosen by name; see :mod:`vrn.detectors.base`."""

from vrn.detectors.base import (
    DEFAULT_DETECTOR,
    Detection,
    FaceDetector,
    available_detectors,
    get_detector,
    register_detector,
)

__all__ = ["DEFAULT_DETECTOR", "Detection", "FaceDetector", "available_detectors", "get_detector", "register_detector"]

"""Face + 68-landmark detectors chosen by name; see :mod:`data_pipeline.detectors.base`."""

from .base import Detection, FaceDetector, available_detectors, get_detector, register_detector

__all__ = ["Detection", "FaceDetector", "available_detectors", "get_detector", "register_detector"]

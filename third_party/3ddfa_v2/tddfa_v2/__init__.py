"""tddfa_v2: our own inference implementation of 3DDFA_V2 and its FaceBoxes detector.

Guo, Zhu, Yang, Yang, Lei, Li: "Towards Fast, Accurate and Stable 3D Dense Face
Alignment", ECCV 2020; upstream code https://github.com/cleardusk/3DDFA_V2 (MIT,
Jianzhu Guo). This package re-implements the inference path and loads the upstream
weights through :mod:`vrn.assets`; see README.md next to this package.

Images passed in are (H, W, 3) uint8 **RGB**::

    from tddfa_v2 import FaceBoxesDetector, TDDFA
    boxes = FaceBoxesDetector()(image_rgb)          # (N, 5) x1, y1, x2, y2, score
    faces = TDDFA(arch="mb05")(image_rgb, boxes[:, :4])
    faces[0].pts68, faces[0].dense(), faces[0].tri
"""

from .bfm import BFMModel, load_bfm, load_landmark_basis_v1
from .faceboxes import FaceBoxesDetector, FaceBoxesNet, nms, prior_boxes
from .mobilenet import MobileNetV1, build_regressor
from .tddfa import (
    TDDFA,
    TDDFAResult,
    crop_image,
    decompose_camera,
    roi_box_from_bbox,
    roi_box_from_landmarks,
    similar_transform,
    split_param,
)

__all__ = [
    "BFMModel",
    "FaceBoxesDetector",
    "FaceBoxesNet",
    "MobileNetV1",
    "TDDFA",
    "TDDFAResult",
    "build_regressor",
    "crop_image",
    "decompose_camera",
    "load_bfm",
    "load_landmark_basis_v1",
    "nms",
    "prior_boxes",
    "roi_box_from_bbox",
    "roi_box_from_landmarks",
    "similar_transform",
    "split_param",
]

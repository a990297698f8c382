"""tddfa_v2: our own inference implementation of 3DDFA_V2 and its FaceBoxes detector.

Guo, Zhu, Yang, Yang, Lei, Li: "Towards Fast, Accurate and Stable 3D Dense Face
Alignment", ECCV 2020; upstream code https://github.com/cleardusk/3DDFA_V2 (MIT,
Jianzhu Guo). This package re-implements the inference path. It is independent: it
depends only on numpy, opencv, torch, and takes the upstream model files as explicit
paths (each file is read by one loader); finding the files (a registry, a download) is
the caller's job. The vrn project's adapters are in ``vrn.face_models.tddfa_models`` and
``vrn.face_models.bfm``. See README.md next to this package.

Images passed in are (H, W, 3) uint8 **RGB**::

    from tddfa_v2 import TDDFA, FaceBoxesDetector, load_bfm_pkl
    boxes = FaceBoxesDetector("FaceBoxesProd.pth")(image_rgb)  # (N, 5) x1, y1, x2, y2, score
    bfm = load_bfm_pkl("bfm_noneck_v3.pkl", "tri.pkl")         # or load_bfm_offline_npz(...)
    tddfa = TDDFA("mb05_120x120.pth", "param_mean_std_62d_120x120.pkl", bfm, arch="mb05")
    faces = tddfa(image_rgb, boxes[:, :4])
    faces[0].pts68, faces[0].dense(), faces[0].tri
"""

from .bfm import (
    BFMModel,
    load_bfm_offline_npz,
    load_bfm_pkl,
    load_landmark_basis_v1,
    load_tri,
)
from .faceboxes import FaceBoxesDetector, FaceBoxesNet, nms, prior_boxes
from .mobilenet import MobileNetV1, build_regressor
from .tddfa import (
    TDDFA,
    TDDFAResult,
    crop_image,
    decompose_camera,
    load_param_stats,
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
    "load_bfm_offline_npz",
    "load_bfm_pkl",
    "load_landmark_basis_v1",
    "load_param_stats",
    "load_tri",
    "nms",
    "prior_boxes",
    "roi_box_from_bbox",
    "roi_box_from_landmarks",
    "similar_transform",
    "split_param",
]

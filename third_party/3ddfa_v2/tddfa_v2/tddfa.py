"""3DDFA_V2 regressor pipeline (Guo et al., ECCV 2020), our own implementation.

For each face: a square ROI from a detector box (or from 68 landmarks), a zero-padded
crop resized to 120 x 120, normalisation ``(x - 127.5) / 128`` on the BGR crop, the
MobileNetV1 regressor, de-normalisation of the 62 parameters with the training mean
and std, and reconstruction of the 68 landmarks (and on demand the dense mesh) mapped
back into image pixels.

Parameter layout (62,): ``P = param[:12].reshape(3, 4)`` is a scaled-orthographic
camera ``[s R | t]`` in the 120 x 120 crop frame with y pointing up, ``param[12:52]``
are 40 shape and ``param[52:62]`` 10 expression coefficients of the BFM.

Coordinates returned are 0-based image pixels (x right, y down); z is scaled like x/y
and shifted so that its minimum over the returned point set is 0 (upstream's
``similar_transform``; note the shift is computed per point set, so ``pts68`` and
``dense()`` differ in z by a constant).
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from .bfm import BFMModel
from .faceboxes import check_rgb_image
from .mobilenet import ARCH_WIDTH, build_regressor, load_regressor_weights

__all__ = [
    "TDDFA",
    "TDDFAResult",
    "roi_box_from_bbox",
    "roi_box_from_landmarks",
    "crop_image",
    "similar_transform",
    "split_param",
    "decompose_camera",
    "load_param_stats",
]

INPUT_SIZE = 120


# --------------------------------------------------------------------------------------
# geometry helpers (pure numpy)
# --------------------------------------------------------------------------------------


def roi_box_from_bbox(bbox: Sequence[float] | np.ndarray) -> np.ndarray:
    """Square crop box from a face-detector box ``x1, y1, x2, y2`` (upstream rule).

    The side is ``int(1.58 * mean(w, h))`` (truncated), centred on the box centre moved
    down by ``0.14 * mean(w, h)``. Returns (4,) float64 ``x1, y1, x2, y2``.
    """
    left, top, right, bottom = (float(v) for v in np.asarray(bbox, dtype=np.float64)[:4])
    old = (right - left + bottom - top) / 2.0
    cx = right - (right - left) / 2.0
    cy = bottom - (bottom - top) / 2.0 + old * 0.14
    side = int(old * 1.58)
    x0, y0 = cx - side / 2.0, cy - side / 2.0
    return np.array([x0, y0, x0 + side, y0 + side], dtype=np.float64)


def roi_box_from_landmarks(pts: np.ndarray) -> np.ndarray:
    """Square crop box from landmarks (2+, K) (upstream ``parse_roi_box_from_landmark``).

    Takes the landmarks' bounding square (side = the longer bbox side, same centre)
    and returns the square whose side is that square's diagonal, same centre.
    Returns (4,) float64 ``x1, y1, x2, y2``.
    """
    p = np.asarray(pts)
    if p.ndim != 2 or p.shape[0] < 2:
        raise ValueError(f"landmarks must be (2, K) or (3, K), got shape {p.shape}")
    x0, y0 = float(p[0].min()), float(p[1].min())
    x1, y1 = float(p[0].max()), float(p[1].max())
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    side = max(x1 - x0, y1 - y0)
    diag = math.sqrt(2.0) * side
    sx, sy = cx - diag / 2.0, cy - diag / 2.0
    return np.array([sx, sy, sx + diag, sy + diag], dtype=np.float64)


def crop_image(image: np.ndarray, roi_box: Sequence[float] | np.ndarray) -> np.ndarray:
    """Crop ``roi_box`` (rounded to integers) from ``image``, zero-padding outside it."""
    h, w = image.shape[:2]
    sx, sy, ex, ey = (int(round(float(v))) for v in roi_box)
    dh, dw = ey - sy, ex - sx
    if dh <= 0 or dw <= 0:
        raise ValueError(f"degenerate ROI box {list(roi_box)}")
    out = np.zeros((dh, dw) + image.shape[2:], dtype=image.dtype)
    ix0, iy0, ix1, iy1 = max(sx, 0), max(sy, 0), min(ex, w), min(ey, h)
    if ix1 > ix0 and iy1 > iy0:
        out[iy0 - sy : iy1 - sy, ix0 - sx : ix1 - sx] = image[iy0:iy1, ix0:ix1]
    return out


def similar_transform(pts3d: np.ndarray, roi_box: Sequence[float] | np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Map points from the regressor's crop frame into image pixels.

    The crop frame is 1-based with y up (the convention the model was trained in):
    x and z lose 1, y is flipped with ``size - y``; x/y are then scaled by the ROI's
    size / ``size`` and moved to its corner, z is scaled by the mean scale and shifted
    to a zero minimum. Returns a new (3, N) float32 array.
    """
    p = np.array(pts3d, dtype=np.float64)
    sx, sy, ex, ey = (float(v) for v in roi_box)
    scale_x, scale_y = (ex - sx) / size, (ey - sy) / size
    p[0] = (p[0] - 1.0) * scale_x + sx
    p[1] = (size - p[1]) * scale_y + sy
    p[2] = (p[2] - 1.0) * ((scale_x + scale_y) / 2.0)
    p[2] -= p[2].min()
    return p.astype(np.float32)


def split_param(param: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split 62 parameters into ``sR`` (3, 3), ``t`` (3, 1), shape (40, 1) and expr (10, 1)."""
    p = np.asarray(param, dtype=np.float32).ravel()
    if p.shape[0] != 62:
        raise ValueError(f"expected 62 parameters (12 pose + 40 shape + 10 expr), got {p.shape[0]}")
    cam = p[:12].reshape(3, 4)
    return cam[:, :3], cam[:, 3:].copy(), p[12:52].reshape(-1, 1), p[52:62].reshape(-1, 1)


def decompose_camera(cam: np.ndarray, orthonormal: bool = True) -> tuple[float, np.ndarray]:
    """Scale and rotation from a scaled-orthographic camera ``s R`` (3, 3 or 3, 4).

    As upstream (``P2sRt``): the scale is the mean norm of the first two rows; the
    rotation's rows are those rows normalised and their cross product. The regressed
    rows are not exactly orthogonal (about 1e-3), so upstream's matrix is not exactly
    a rotation; with ``orthonormal=True`` (default) it is replaced by the nearest
    proper rotation (SVD polar factor, det +1). ``orthonormal=False`` returns
    upstream's matrix unchanged.
    """
    r1, r2 = np.asarray(cam[0, :3], np.float64), np.asarray(cam[1, :3], np.float64)
    n1, n2 = np.linalg.norm(r1), np.linalg.norm(r2)
    r1, r2 = r1 / n1, r2 / n2
    rot = np.stack([r1, r2, np.cross(r1, r2)])
    if orthonormal:
        u, _, vt = np.linalg.svd(rot)
        if np.linalg.det(u @ vt) < 0:
            u[:, -1] = -u[:, -1]
        rot = u @ vt
    return float((n1 + n2) / 2.0), rot.astype(np.float32)


# --------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------


@dataclass(eq=False)
class TDDFAResult:
    """One face's 3DDFA_V2 output.

    Attributes:
        roi_box: (4,) float64 crop box ``x1, y1, x2, y2`` in image px.
        param: (62,) float32 de-normalised parameters (12 pose, 40 shape, 10 expr).
        pts68: (3, 68) float32 landmarks in image px (0-based; z shifted to min 0).
        R: (3, 3) float32 rotation of the pose: upstream ``P2sRt`` (scale removed),
            made exactly orthonormal (see :func:`decompose_camera`).
        scale: scale of the scaled-orthographic camera (crop-frame px per model unit).
        offset: (3,) float32 camera translation in the 120 x 120 crop frame.
        bfm_source: "bfm_noneck_v3" (dense bases) or "offline_standin".
    """

    roi_box: np.ndarray
    param: np.ndarray
    pts68: np.ndarray
    R: np.ndarray
    scale: float
    offset: np.ndarray
    bfm_source: str
    _bfm: BFMModel = field(repr=False)
    size: int = INPUT_SIZE

    @property
    def alpha_shp(self) -> np.ndarray:
        return self.param[12:52].copy()

    @property
    def alpha_exp(self) -> np.ndarray:
        return self.param[52:62].copy()

    @property
    def tri(self) -> np.ndarray:
        """(F, 3) int32 0-based triangles of the dense mesh."""
        return self._bfm.tri

    def dense(self) -> np.ndarray:
        """Dense mesh vertices (3, 38365) float32 in image px (z shifted to min 0).

        With ``bfm_source == "offline_standin"`` only the 68 landmark vertices carry
        identity and expression; the rest is the posed mean face.
        """
        sr, t, a_s, a_e = split_param(self.param)
        verts = sr @ self._bfm.shape(a_s, a_e, dense=True) + t
        return similar_transform(verts, self.roi_box, self.size)


# --------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------


def load_param_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (62,) float32 of the regressor's output, from upstream's
    ``configs/param_mean_std_62d_120x120.pkl`` (a dict with ``mean`` and ``std``)."""
    with open(path, "rb") as f:
        stats = pickle.load(f)
    mean = np.asarray(stats["mean"], dtype=np.float32).ravel()
    std = np.asarray(stats["std"], dtype=np.float32).ravel()
    return mean, std


class TDDFA:
    """3DDFA_V2 dense face alignment from detector boxes or landmarks.

    Args:
        weights_path: upstream regressor checkpoint (``weights/mb05_120x120.pth`` or
            ``mb1_120x120.pth``; must match ``arch``).
        param_stats_path: upstream ``configs/param_mean_std_62d_120x120.pkl``.
        bfm: the 3DMM the parameters are decoded with (see :mod:`tddfa_v2.bfm`:
            :func:`~tddfa_v2.bfm.load_bfm_pkl` or :func:`~tddfa_v2.bfm.load_bfm_offline_npz`).
        arch: "mb05" (MobileNetV1 x0.5, default upstream model) or "mb1" (x1.0).
        device: torch device for the regressor.

    Raises:
        ValueError: unknown ``arch``.
        FileNotFoundError: a model file is missing.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike,
        param_stats_path: str | os.PathLike,
        bfm: BFMModel,
        arch: str = "mb05",
        device: str | torch.device = "cpu",
    ) -> None:
        if arch not in ARCH_WIDTH:
            raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCH_WIDTH)}")
        self.arch = arch
        self.size = INPUT_SIZE
        self.device = torch.device(device)
        model = load_regressor_weights(build_regressor(arch, 62), weights_path)
        self.model = model.to(self.device).eval()
        self.param_mean, self.param_std = load_param_stats(param_stats_path)
        self.bfm = bfm

    @property
    def bfm_source(self) -> str:
        return self.bfm.source

    @property
    def tri(self) -> np.ndarray:
        return self.bfm.tri

    # -- entry points ------------------------------------------------------------------

    def __call__(self, image_rgb: np.ndarray, boxes: np.ndarray) -> list[TDDFAResult]:
        """Faces from detector boxes (N, 4+) ``x1, y1, x2, y2[, score]`` in image px."""
        b = np.asarray(boxes, dtype=np.float64)
        if b.ndim == 1 and b.size >= 4:
            b = b[None]
        if b.size == 0:
            check_rgb_image(image_rgb)
            return []
        if b.ndim != 2 or b.shape[1] < 4:
            raise ValueError(f"boxes must be (N, 4) or (N, 5), got shape {b.shape}")
        return self.from_roi_boxes(image_rgb, [roi_box_from_bbox(x) for x in b])

    def from_landmarks(self, image_rgb: np.ndarray, pts68: np.ndarray) -> list[TDDFAResult]:
        """Faces from landmarks (N, 2|3, K) or (2|3, K); ROI as upstream's landmark policy."""
        p = np.asarray(pts68)
        if p.ndim == 2:
            p = p[None]
        if p.ndim != 3 or p.shape[1] not in (2, 3):
            raise ValueError(f"landmarks must be (2|3, K) or (N, 2|3, K), got shape {np.shape(pts68)}")
        return self.from_roi_boxes(image_rgb, [roi_box_from_landmarks(x) for x in p])

    @torch.no_grad()
    def from_roi_boxes(self, image_rgb: np.ndarray, roi_boxes: Sequence[np.ndarray]) -> list[TDDFAResult]:
        """Faces from square crop boxes already in upstream's ROI form."""
        check_rgb_image(image_rgb)
        if len(roi_boxes) == 0:
            return []
        bgr = image_rgb[..., ::-1]  # the one RGB -> BGR flip (the model was trained on BGR)
        crops = [
            cv2.resize(
                np.ascontiguousarray(crop_image(bgr, r)), dsize=(self.size, self.size), interpolation=cv2.INTER_LINEAR
            )
            for r in roi_boxes
        ]
        batch = np.stack(crops).astype(np.float32).transpose(0, 3, 1, 2)
        x = (torch.from_numpy(np.ascontiguousarray(batch)) - 127.5) / 128.0
        out = self.model(x.to(self.device)).cpu().numpy().astype(np.float32)
        params = out * self.param_std + self.param_mean
        return [self._result(p, np.asarray(r, np.float64)) for p, r in zip(params, roi_boxes)]

    # -- reconstruction ----------------------------------------------------------------

    def _result(self, param: np.ndarray, roi_box: np.ndarray) -> TDDFAResult:
        sr, t, a_s, a_e = split_param(param)
        pts = similar_transform(sr @ self.bfm.shape(a_s, a_e, dense=False) + t, roi_box, self.size)
        scale, rot = decompose_camera(sr)
        return TDDFAResult(
            roi_box=roi_box,
            param=np.asarray(param, dtype=np.float32),
            pts68=pts,
            R=rot,
            scale=scale,
            offset=t.ravel().astype(np.float32),
            bfm_source=self.bfm.source,
            _bfm=self.bfm,
            size=self.size,
        )

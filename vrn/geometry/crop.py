"""The VRN crop rule: a face -> a CROP_SIZE x CROP_SIZE crop and the transform back.

Scale the photo so that the 68-landmark box has ``sqrt(w * h) = face_size`` crop px
(default :data:`vrn.conventions.CROP_FACE_SIZE`, 90), centre the box in the crop, pad with
``border_value``, cut ``crop_size`` px square (default :data:`vrn.conventions.CROP_SIZE`,
192). RGB throughout. Used by the pipeline's crop stage, inference and evaluation alike.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from vrn.conventions import CROP_FACE_SIZE, CROP_SIZE
from vrn.geometry.transforms import CropTransform
from vrn.image_io import check_rgb_image

__all__ = ["crop_face", "crop_transform_for_landmarks", "warp_crop", "padding_fraction"]


def crop_transform_for_landmarks(landmarks: np.ndarray, crop_size: int = CROP_SIZE,
                                 face_size: float = CROP_FACE_SIZE) -> CropTransform:
    """The VRN crop of a face: image px -> crop px.

    Args:
        landmarks: (68, 2) (x, y) image px (any (K, 2+) works: only their box is used).
        crop_size: crop side in px.
        face_size: ``sqrt(w * h)`` of the landmark box in crop px.
    Returns:
        a similarity (no rotation) mapping the box centre to the crop centre
        ``((crop_size - 1) / 2, (crop_size - 1) / 2)``.
    """
    p = np.asarray(landmarks, dtype=np.float64)[:, :2]
    if not np.isfinite(p).all():
        raise ValueError("landmarks contain NaN or inf")
    box = np.concatenate([p.min(0), p.max(0)])
    # a degenerate box (all points on a line) would give an infinite scale
    if min(box[2] - box[0], box[3] - box[1]) < 1e-3:
        raise ValueError(f"degenerate landmark box {box.tolist()}")
    return CropTransform.from_box(box, face_size, (crop_size, crop_size))


def warp_crop(image_rgb: np.ndarray, transform: CropTransform, border_value: int = 0) -> np.ndarray:
    """Resample ``image_rgb`` into the crop of ``transform`` (bilinear; area-averaged first
    when shrinking, so large photos do not alias). Pixels outside the photo get
    ``border_value``. Returns (H, W, 3) uint8 RGB (H, W = ``transform.size``).

    Pixel-centre convention on both sides (as OpenCV's warpAffine).
    """
    h_out, w_out = transform.size
    H, W = image_rgb.shape[:2]
    m = transform.matrix.copy()
    s = transform.scale
    img = image_rgb
    # only the part of the photo that lands in the crop (plus a margin) is resampled
    corners = np.array([[-0.5, -0.5], [w_out - 0.5, -0.5], [-0.5, h_out - 0.5], [w_out - 0.5, h_out - 0.5]])
    ic = transform.apply_inverse(corners)
    margin = 2.0 / max(s, 1e-6) + 2.0
    x0 = int(max(0, math.floor(ic[:, 0].min() - margin)))
    y0 = int(max(0, math.floor(ic[:, 1].min() - margin)))
    x1 = int(min(W, math.ceil(ic[:, 0].max() + margin) + 1))
    y1 = int(min(H, math.ceil(ic[:, 1].max() + margin) + 1))
    if x1 <= x0 or y1 <= y0:  # the crop lies entirely outside the photo
        return np.full((h_out, w_out, 3), border_value, np.uint8)
    img = img[y0:y1, x0:x1]
    m[:, 2] += m[:, :2] @ np.array([x0, y0], dtype=np.float64)  # sub-image px -> crop px
    if s < 0.75:
        # area-average down to about the final scale; x_small = (x + 0.5) * f - 0.5
        hh, ww = img.shape[:2]
        nw, nh = max(1, int(round(ww * s))), max(1, int(round(hh * s)))
        fx, fy = nw / ww, nh / hh
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        a = m[:, :2] @ np.diag([1.0 / fx, 1.0 / fy])
        t = m[:, :2] @ np.array([0.5 / fx - 0.5, 0.5 / fy - 0.5]) + m[:, 2]
        m = np.hstack([a, t[:, None]])
    out = cv2.warpAffine(np.ascontiguousarray(img), m, (w_out, h_out), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=(border_value,) * 3)
    return out


def padding_fraction(transform: CropTransform, image_hw: tuple[int, int]) -> float:
    """Fraction of crop pixels whose centre maps outside the photo (came from padding)."""
    h_out, w_out = transform.size
    H, W = image_hw
    yy, xx = np.mgrid[0:h_out, 0:w_out]
    p = transform.apply_inverse(np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float64))
    inside = (p[:, 0] >= -0.5) & (p[:, 0] <= W - 0.5) & (p[:, 1] >= -0.5) & (p[:, 1] <= H - 0.5)
    return float(1.0 - inside.mean())


def crop_face(image_rgb: np.ndarray, landmarks68: np.ndarray, crop_size: int = CROP_SIZE,
              face_size: float = CROP_FACE_SIZE, border_value: int = 0) -> tuple[np.ndarray, CropTransform]:
    """The VRN crop of one face.

    Args:
        image_rgb: (H, W, 3) uint8 RGB photo.
        landmarks68: (68, 2) float landmarks, image px.
        crop_size, face_size: see :func:`crop_transform_for_landmarks`.
        border_value: grey level of padding outside the photo.
    Returns:
        crop_rgb: (crop_size, crop_size, 3) uint8 RGB, crop px.
        transform: image px -> crop px (``transform.apply_inverse`` maps back).
    """
    check_rgb_image(image_rgb)
    t = crop_transform_for_landmarks(landmarks68, crop_size, face_size)
    return warp_crop(image_rgb, t, border_value), t

"""The VRN crop rule: a face -> a CROP_SIZE x CROP_SIZE crop and the transform back.

Scale the photo so that the 68-landmark box has ``sqrt(w * h) = face_size`` crop px
(default :data:`vrn.conventions.CROP_FACE_SIZE`, 90), centre the box in the crop, fill the
crop pixels that fall outside the photo (``border``, below), cut ``crop_size`` px square
(default :data:`vrn.conventions.CROP_SIZE`, 192). RGB throughout. Used by the pipeline's crop
stage, inference and evaluation alike.

Margin fill (``border``; :data:`BORDERS`):

================  ===========================================================================
``constant``      ``border_value`` grey (the default; black, 0)
``reflect``       the photo mirrored at its edges (``cv2.BORDER_REFLECT_101``: the edge pixel
                  is not repeated)
``replicate``     the edge pixels repeated (``cv2.BORDER_REPLICATE``)
``blur_reflect``  ``reflect``, then the pixels outside the photo replaced by a heavy Gaussian
                  blur of the reflected crop (sigma :data:`BLUR_SIGMA_FRACTION` x crop side; the
                  mirror fades into the blur over sigma px from the photo's edge, no seam), so
                  colours continue but no mirrored second face can be read there; the photo's
                  own pixels are unchanged
================  ===========================================================================

Tight crops (e.g. 3DDFA's 120 x 120 AFLW crops) leave large margins; a constant fill there
teaches a network "flat border = background".

Crops for a network trained on such tight crops (``VolumeLayout.source_roi_px`` = N > 0,
:mod:`vrn.conventions`): :func:`crop_for_layout` first cuts the photo to 3DDFA's landmark
ROI (:func:`tddfa_v2.tddfa.roi_box_from_landmarks`: the landmarks' bounding square grown to
its diagonal), resampled to N x N px (area-averaged when shrinking, black outside the photo,
as 3DDFA pads its inputs), then makes the VRN crop of that small photo with ``blur_reflect``: the face reaches
the network at the resolution and with the margin it was trained on.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from tddfa_v2.tddfa import roi_box_from_landmarks
from vrn.conventions import CROP_FACE_SIZE, CROP_SIZE, VolumeLayout
from vrn.geometry.transforms import CropTransform
from vrn.image_io import check_rgb_image

__all__ = [
    "crop_face",
    "crop_for_layout",
    "roi_transform",
    "crop_transform_for_landmarks",
    "warp_crop",
    "padding_fraction",
    "outside_mask",
    "BORDERS",
    "BLUR_SIGMA_FRACTION",
]

#: margin fill -> OpenCV border mode of the resampling (``blur_reflect`` blurs afterwards)
BORDERS: dict[str, int] = {
    "constant": cv2.BORDER_CONSTANT,
    "reflect": cv2.BORDER_REFLECT_101,
    "replicate": cv2.BORDER_REPLICATE,
    "blur_reflect": cv2.BORDER_REFLECT_101,
}
#: ``blur_reflect``: Gaussian sigma as a fraction of the crop side (8 px for 192)
BLUR_SIGMA_FRACTION: float = 1.0 / 24.0


def _check_border(border: str) -> int:
    if border not in BORDERS:
        raise ValueError(f"unknown border {border!r}; expected one of {', '.join(BORDERS)}")
    return BORDERS[border]


def _landmark_xy(landmarks: np.ndarray) -> np.ndarray:
    """(K, 2) float64 x, y of (K, 2+) landmarks, image px; ValueError on NaN / inf."""
    p = np.asarray(landmarks, dtype=np.float64)[:, :2]
    if not np.isfinite(p).all():
        raise ValueError("landmarks contain NaN or inf")
    return p


def crop_transform_for_landmarks(
    landmarks: np.ndarray, crop_size: int = CROP_SIZE, face_size: float = CROP_FACE_SIZE
) -> CropTransform:
    """The VRN crop of a face: image px -> crop px.

    Args:
        landmarks: (68, 2) (x, y) image px (any (K, 2+) works: only their box is used).
        crop_size: crop side in px.
        face_size: ``sqrt(w * h)`` of the landmark box in crop px.
    Returns:
        a similarity (no rotation) mapping the box centre to the crop centre
        ``((crop_size - 1) / 2, (crop_size - 1) / 2)``.
    """
    p = _landmark_xy(landmarks)
    box = np.concatenate([p.min(0), p.max(0)])
    # a degenerate box (all points on a line) would give an infinite scale
    if min(box[2] - box[0], box[3] - box[1]) < 1e-3:
        raise ValueError(f"degenerate landmark box {box.tolist()}")
    return CropTransform.from_box(box, face_size, (crop_size, crop_size))


def warp_crop(
    image_rgb: np.ndarray, transform: CropTransform, border_value: int = 0, border: str = "constant"
) -> np.ndarray:
    """Resample ``image_rgb`` into the crop of ``transform`` (bilinear; area-averaged first
    when shrinking, so large photos do not alias). Pixels outside the photo are filled by
    ``border`` (module doc; ``constant`` uses ``border_value``). Returns (H, W, 3) uint8 RGB
    (H, W = ``transform.size``), crop px.

    Pixel-centre convention on both sides (as OpenCV's warpAffine). Only the part of the
    photo the crop (and, for the mirrored fills, its mirror image at the photo's edges)
    needs is resampled; the mirror is always taken at the photo's own edges, also on the
    area-averaged path (which shrinks the photo first and fills its border the same way).

    (One function of ~65 lines on purpose: the sub-image window, the pre-shrink and the warp
    all rewrite the same affine matrix; split, the matrix bookkeeping would be spread out.)
    """
    mode = _check_border(border)
    h_out, w_out = transform.size
    H, W = image_rgb.shape[:2]
    m = transform.matrix.copy()
    s = transform.scale
    img = image_rgb
    # only the part of the photo that lands in the crop (plus a margin) is resampled
    corners = np.array([[-0.5, -0.5], [w_out - 0.5, -0.5], [-0.5, h_out - 0.5], [w_out - 0.5, h_out - 0.5]])
    ic = transform.apply_inverse(corners)
    margin = 2.0 / max(s, 1e-6) + 2.0
    lo = ic.min(0) - margin
    hi = ic.max(0) + margin
    if mode != cv2.BORDER_CONSTANT:
        # a mirrored / repeated fill reads the photo at its edges: keep the mirror image of
        # the parts that stick out (the fill is then the one of the whole photo)
        size = np.array([W, H], dtype=np.float64)
        lo = np.minimum(np.minimum(lo, 2.0 * (size - 1.0) - hi), size - 1.0)
        hi = np.maximum(np.maximum(hi, -lo), 0.0)
    x0 = int(max(0, math.floor(lo[0])))
    y0 = int(max(0, math.floor(lo[1])))
    x1 = int(min(W, math.ceil(hi[0]) + 1))
    y1 = int(min(H, math.ceil(hi[1]) + 1))
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
    out = cv2.warpAffine(
        np.ascontiguousarray(img),
        m,
        (w_out, h_out),
        flags=cv2.INTER_LINEAR,
        borderMode=mode,
        borderValue=(border_value,) * 3,
    )
    if border == "blur_reflect":
        outside = outside_mask(transform, (H, W))
        if outside.any():
            sigma = BLUR_SIGMA_FRACTION * max(h_out, w_out)
            blurred = cv2.GaussianBlur(out, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
            # photo pixels stay exact; outside, the mirror fades into the blur over ``sigma`` px
            # (crop px from the photo's edge), so no sharp seam outlines the photo
            dist = cv2.distanceTransform(outside.astype(np.uint8), cv2.DIST_L2, 3)
            alpha = np.clip(dist / sigma, 0.0, 1.0)[..., None].astype(np.float32)
            mixed = out.astype(np.float32) * (1.0 - alpha) + blurred.astype(np.float32) * alpha
            out = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


def outside_mask(transform: CropTransform, image_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) bool over the crop (H, W = ``transform.size``): True where the crop pixel's
    centre maps outside the photo of size ``image_hw`` = (H_img, W_img) (a padding pixel)."""
    h_out, w_out = transform.size
    H, W = image_hw
    yy, xx = np.mgrid[0:h_out, 0:w_out]
    p = transform.apply_inverse(np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float64))
    inside = (p[:, 0] >= -0.5) & (p[:, 0] <= W - 0.5) & (p[:, 1] >= -0.5) & (p[:, 1] <= H - 0.5)
    return ~inside.reshape(h_out, w_out)


def padding_fraction(transform: CropTransform, image_hw: tuple[int, int]) -> float:
    """Fraction of crop pixels whose centre maps outside the photo (came from padding)."""
    return float(outside_mask(transform, image_hw).mean())


def crop_face(
    image_rgb: np.ndarray,
    landmarks68: np.ndarray,
    crop_size: int = CROP_SIZE,
    face_size: float = CROP_FACE_SIZE,
    border_value: int = 0,
    border: str = "constant",
) -> tuple[np.ndarray, CropTransform]:
    """The VRN crop of one face.

    Args:
        image_rgb: (H, W, 3) uint8 RGB photo.
        landmarks68: (68, 2) float landmarks, image px.
        crop_size, face_size: see :func:`crop_transform_for_landmarks`.
        border_value: grey level of padding outside the photo (``border="constant"``).
        border: margin fill, one of :data:`BORDERS` (module doc).
    Returns:
        crop_rgb: (crop_size, crop_size, 3) uint8 RGB, crop px.
        transform: image px -> crop px (``transform.apply_inverse`` maps back).
    """
    check_rgb_image(image_rgb)
    _check_border(border)
    t = crop_transform_for_landmarks(landmarks68, crop_size, face_size)
    return warp_crop(image_rgb, t, border_value, border), t


def roi_transform(landmarks: np.ndarray, roi_px: int) -> CropTransform:
    """Image px -> the px of 3DDFA's landmark ROI resampled to ``roi_px`` x ``roi_px``.

    Args:
        landmarks: (68, 2+) landmarks, image px.
        roi_px: side of the resampled ROI, px.
    Returns:
        a similarity: the ROI's (float, square) box, its side scaled to ``roi_px`` px, its centre
        on the ROI's centre (pixel-centre convention: the box's left edge maps to x = -0.5).
    """
    p = _landmark_xy(landmarks)
    x0, y0, x1, y1 = roi_box_from_landmarks(p.T)
    if x1 - x0 < 1e-3:
        raise ValueError(f"degenerate landmark box {p.min(0).tolist() + p.max(0).tolist()}")
    return CropTransform.from_center_scale(((x0 + x1) / 2, (y0 + y1) / 2), roi_px / (x1 - x0), size=(roi_px, roi_px))


def crop_for_layout(
    image_rgb: np.ndarray, landmarks68: np.ndarray, layout: VolumeLayout
) -> tuple[np.ndarray, CropTransform]:
    """The network input of one face for a model of ``layout`` (inference and evaluation).

    ``layout.source_roi_px`` = 0: :func:`crop_face` of the photo (``constant`` margin);
    N > 0: the photo resampled to 3DDFA's N x N landmark ROI first (module doc).

    Args:
        image_rgb: (H, W, 3) uint8 RGB photo.
        landmarks68: (68, 2) landmarks, image px.
        layout: the network's :class:`~vrn.conventions.VolumeLayout`.
    Returns:
        crop_rgb: (S, S, 3) uint8 RGB (S = ``layout.crop_size``), crop px.
        transform: image px -> crop px.
    """
    n = layout.source_roi_px
    if n <= 0:
        return crop_face(image_rgb, landmarks68, crop_size=layout.crop_size, face_size=layout.face_size)
    check_rgb_image(image_rgb)
    xy = _landmark_xy(landmarks68)
    to_roi = roi_transform(xy, n)
    # the sub-image warp of warp_crop (area-averaged when shrinking: no aliasing), black outside
    small = warp_crop(image_rgb, to_roi)
    lm_roi = to_roi.apply(xy)
    crop, to_crop = crop_face(
        small, lm_roi, crop_size=layout.crop_size, face_size=layout.face_size, border="blur_reflect"
    )
    return crop, to_crop.compose(to_roi)

"""Joint augmentation of a crop and its compact target (never a dense float volume).

The geometric part is one similarity in the crop plane (rotation, isotropic scale,
translation, optional horizontal flip) applied to the image with bilinear sampling and to
the target's per-column runs with nearest-neighbour sampling; depth scales by the same
factor about the volume's depth centre, so the face keeps its proportions. The photometric
part scales each RGB channel independently (as in the VRN paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from vrn.face_models.landmarks68 import LANDMARK_MIRROR
from vrn.volume.codec import VolumeCode

__all__ = ["AugmentConfig", "augment_sample", "landmark_noise", "warp_code", "sample_params"]


@dataclass
class AugmentConfig:
    rotation_deg: float = 45.0      # uniform in [-r, r]
    translation_px: float = 15.0    # uniform in [-t, t] per axis, crop px
    scale_min: float = 0.85
    scale_max: float = 1.15
    flip_prob: float = 0.5
    colour_min: float = 0.6         # per-channel multiplier range
    colour_max: float = 1.4
    enabled: bool = True
    # guidance landmarks only (the image and target stay): detector noise, so a guided model
    # learns not to trust its landmarks blindly; all three 0 = no noise (and no extra draws)
    landmark_jitter_px: float = 0.0  # per-point Gaussian sigma, crop px
    landmark_shift_px: float = 0.0   # one Gaussian shift of all 68 (sigma per axis), crop px
    landmark_scale: float = 0.0      # all 68 scaled about their mean by 1 + N(0, sigma)


def sample_params(cfg: AugmentConfig, rng: np.random.Generator) -> dict[str, float | bool | np.ndarray]:
    return {
        "angle": float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)),
        "scale": float(rng.uniform(cfg.scale_min, cfg.scale_max)),
        "tx": float(rng.uniform(-cfg.translation_px, cfg.translation_px)),
        "ty": float(rng.uniform(-cfg.translation_px, cfg.translation_px)),
        "flip": bool(rng.random() < cfg.flip_prob),
        "colour": rng.uniform(cfg.colour_min, cfg.colour_max, size=3).astype(np.float32),
    }


def _forward_matrix(size_hw: tuple[int, int], angle: float, scale: float, tx: float, ty: float, flip: bool) -> np.ndarray:
    """2x3 affine, source crop px -> destination crop px (x, y), about the crop centre."""
    h, w = size_hw
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    a = np.deg2rad(angle)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    f = np.diag([-1.0, 1.0]) if flip else np.eye(2)
    lin = rot @ f
    c = np.array([cx, cy])
    t = c + np.array([tx, ty]) - lin @ c
    return np.hstack([lin, t[:, None]])


def warp_code(code: VolumeCode, M: np.ndarray, scale: float) -> VolumeCode:
    """Warp a target by the 2x3 crop-plane affine ``M`` (source -> destination crop px),
    scaling depth by ``scale`` about the depth centre. Nearest-neighbour per column, exact runs.
    """
    h, w = code.lo.shape
    D = code.depth_bins
    Minv = cv2.invertAffineTransform(M.astype(np.float64))
    ys, xs = np.mgrid[0:h, 0:w]
    sx = np.rint(Minv[0, 0] * xs + Minv[0, 1] * ys + Minv[0, 2]).astype(np.int64)
    sy = np.rint(Minv[1, 0] * xs + Minv[1, 1] * ys + Minv[1, 2]).astype(np.int64)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    src = np.where(inside, sy * w + sx, -1).ravel()

    def zmap(v: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(scale * (v.astype(np.float64) - D / 2.0) + D / 2.0), 0, D).astype(np.int64)

    lo_src, hi_src = code.lo.ravel().astype(np.int64), code.hi.ravel().astype(np.int64)
    safe = np.maximum(src, 0)
    lo = np.where(src >= 0, zmap(lo_src[safe]), 0)
    hi = np.where(src >= 0, zmap(hi_src[safe]), 0)
    empty = hi <= lo
    lo[empty] = 0
    hi[empty] = 0
    extra = np.zeros((0, 3), dtype=np.int32)
    if len(code.extra):
        ex = code.extra.astype(np.int64)
        order = np.argsort(ex[:, 0], kind="stable")
        ex = ex[order]
        dst_pix = np.nonzero(np.isin(src, ex[:, 0]))[0]
        if len(dst_pix):
            s = src[dst_pix]
            start = np.searchsorted(ex[:, 0], s, side="left")
            count = np.searchsorted(ex[:, 0], s, side="right") - start
            rep_dst = np.repeat(dst_pix, count)
            run_idx = np.repeat(start, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
            elo, ehi = zmap(ex[run_idx, 1]), zmap(ex[run_idx, 2])
            keep = ehi > elo
            extra = np.stack([rep_dst[keep], elo[keep], ehi[keep]], axis=1).astype(np.int32)
            extra = extra[np.lexsort((extra[:, 1], extra[:, 0]))]
            # A column whose first run collapsed while extras survive: promote its first extra.
            col_empty = (hi == 0)[extra[:, 0]]
            if col_empty.any():
                first = np.r_[True, extra[1:, 0] != extra[:-1, 0]]
                promote = first & col_empty
                p = extra[promote]
                lo[p[:, 0]], hi[p[:, 0]] = p[:, 1], p[:, 2]
                extra = extra[~promote]
    return VolumeCode(lo.reshape(h, w).astype(np.uint8), hi.reshape(h, w).astype(np.uint8),
                      extra.astype(np.int32), D)


def augment_sample(
    image: np.ndarray,
    code: VolumeCode,
    cfg: AugmentConfig,
    rng: np.random.Generator,
    landmarks: np.ndarray | None = None,
) -> tuple[np.ndarray, VolumeCode, np.ndarray | None]:
    """Augment one sample.

    Args:
        image: (H, W, 3) float32 RGB in [0, 1], crop px.
        code: its compact target.
        landmarks: optional (68, 2+) landmarks, crop px; their x, y move with the image (same
            affine), and a flip also reorders them (:data:`vrn.face_models.landmarks68.LANDMARK_MIRROR`),
            so index k stays landmark k.
    Returns:
        the augmented image (same shape, [0, 1]), target, and landmarks (68, 2) float32 crop px
        x, y (None when not given).
    """
    xy = None if landmarks is None else np.asarray(landmarks, np.float32)[:, :2]
    if not cfg.enabled:
        return image, code, xy
    p = sample_params(cfg, rng)
    h, w = image.shape[:2]
    M = _forward_matrix((h, w), p["angle"], p["scale"], p["tx"], p["ty"], p["flip"])  # type: ignore[arg-type]
    out = cv2.warpAffine(image, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    out = np.clip(out * p["colour"][None, None, :], 0.0, 1.0).astype(np.float32)  # type: ignore[index]
    moved = None
    if xy is not None:
        moved = (xy @ M[:, :2].T + M[:, 2]).astype(np.float32)
        if p["flip"]:
            moved = moved[LANDMARK_MIRROR]
        moved = landmark_noise(moved, cfg, rng)
    return out, warp_code(code, M, float(p["scale"])), moved  # type: ignore[arg-type]


def landmark_noise(xy: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Detector-like noise on guidance landmarks (:class:`AugmentConfig` ``landmark_*``).

    Args:
        xy: (68, 2) float32 landmarks, crop px (NaN rows stay NaN).
    Returns:
        (68, 2) float32 crop px; ``xy`` itself when every ``landmark_*`` setting is 0 (no draws).
    """
    if cfg.landmark_jitter_px <= 0 and cfg.landmark_shift_px <= 0 and cfg.landmark_scale <= 0:
        return xy
    centre = np.nanmean(xy, axis=0) if np.isfinite(xy).any() else np.zeros(2, np.float32)
    scale = 1.0 + cfg.landmark_scale * rng.standard_normal()
    shift = cfg.landmark_shift_px * rng.standard_normal(2)
    jitter = cfg.landmark_jitter_px * rng.standard_normal(xy.shape)
    return ((xy - centre) * scale + centre + shift + jitter).astype(np.float32)

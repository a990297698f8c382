"""Head pose and 68 3D landmarks of one face from its predicted occupancy volume.

Method (all in image px: x right, y down, z toward the camera; :mod:`vrn.conventions`):

1. Front surface: the front depth map of ``occupancy`` (:mod:`vrn.volume.surface`, crop px),
   one point per occupied column, mapped to image px with the crop transform (z divided by
   its scale, so z is in image px with the volume's back as origin, as the mesh's).
2. Seed: each detector landmark (x, y) gets the surface z under it (bilinear between the
   four occupied neighbouring columns, else the nearest of them, else none). The template's
   31 brow, nose and eye landmarks (iBUG 18-48; the jaw contour is left out: detectors put
   it on the silhouette, models on fixed vertices; the mouth moves with expression) are
   fitted to these 3D points by a similarity (Umeyama), twice re-fitted without the pairs
   farther than 2.5 x the median.
3. ICP: :func:`vrn.geometry.head_pose.fit_template_icp` refines the similarity on the
   template's camera-facing points against the surface cloud, with the visible landmark
   pairs holding half the weight; its rounds run in ``stages``, each starting by re-deciding
   the visible landmarks (step 4) with the current fit.
4. Visibility rule: landmark ``i`` is *visible* (its z read from the surface) when the
   predicted surface exists under its (x, y), lies within ``visibility_tol`` x the landmark
   box size ``sqrt(w * h)`` of the fitted template's landmark in depth (in front: the cheek
   or the nose hides it; behind: a hole, such as an open mouth), and the fitted template's
   normal there faces the camera.
5. Output: x, y from the detector for every landmark (the template's where the detector gives
   NaN); z from the surface for visible ones and from the fitted template for hidden ones.
   The pose is the fitted rotation's ``Pose_Para`` angles (:class:`~vrn.geometry.head_pose.HeadPose`).

The template (:mod:`vrn.face_models.template`): the BFM mean face by default, the frame of
AFLW2000-3D's ``Pose_Para``; the SFM mean for the synthetic faces (their generator's frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree

from vrn.conventions import DEPTH_FACTOR
from vrn.face_models.template import FaceTemplate, load_template
from vrn.geometry.head_pose import HeadPose, fit_template_icp, similarity_fit
from vrn.geometry.transforms import CropTransform
from vrn.volume.surface import EMPTY_DEPTH, front_depth, front_surface_points

__all__ = ["PoseLandmarks", "estimate_pose_landmarks", "surface_depth_from_map", "INNER_LANDMARKS"]

#: the 31 brow, nose and eye landmarks (0-based 17..47) that seed and steer the fit
INNER_LANDMARKS = np.arange(17, 48)
#: fewest seed pairs for a fit
_MIN_SEED = 6


@dataclass(frozen=True)
class PoseLandmarks:
    """Pose and 3D landmarks of one face.

    Attributes:
        pose: :class:`HeadPose` (image frame; ``Pose_Para`` angles in degrees).
        landmarks_3d: (68, 3) float64 image px (x right, y down, z toward the camera; z in the
            mesh's frame: image px from the volume's back).
        visible: (68,) bool, the visibility rule of the module doc.
    """

    pose: HeadPose
    landmarks_3d: np.ndarray
    visible: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"pose": {...}, "landmarks_3d": [[x, y, z] x 68], "landmarks_visible": [...]}``."""
        lm = [[None if not np.isfinite(v) else round(float(v), 2) for v in row] for row in self.landmarks_3d]
        return {"pose": self.pose.to_dict(), "landmarks_3d": lm, "landmarks_visible": [bool(v) for v in self.visible]}


def surface_depth_from_map(depth_map: np.ndarray, xy: np.ndarray, depth_factor: float = DEPTH_FACTOR) -> np.ndarray:
    """Front-surface z at points of a front depth map (crop px).

    Args:
        depth_map: (H, W) front depth bins (:func:`vrn.volume.surface.front_depth`), -1 empty.
        xy: (K, 2) crop px query points (NaN rows allowed).
        depth_factor: depth bins per crop px.
    Returns:
        (K,) float64 crop px z (``(d + 1) / depth_factor``, the surface rule of
        :mod:`vrn.volume.surface`): bilinear when the 4 surrounding columns are occupied, else
        the nearest occupied of them, NaN when none is (or the query is NaN / outside).
    """
    fd = np.asarray(depth_map, np.float64)
    h, w = fd.shape
    q = np.asarray(xy, np.float64).reshape(-1, 2)
    out = np.full(len(q), np.nan)
    ok = np.isfinite(q).all(1) & (q[:, 0] > -1) & (q[:, 0] < w) & (q[:, 1] > -1) & (q[:, 1] < h)
    if not ok.any():
        return out
    x, y = q[ok, 0], q[ok, 1]
    x0 = np.clip(np.floor(x).astype(int), 0, w - 2)
    y0 = np.clip(np.floor(y).astype(int), 0, h - 2)
    fx, fy = np.clip(x - x0, 0, 1), np.clip(y - y0, 0, 1)
    cx = np.stack([x0, x0 + 1, x0, x0 + 1], 1)  # (K, 4) corners
    cy = np.stack([y0, y0, y0 + 1, y0 + 1], 1)
    wts = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1)
    d = fd[cy, cx]
    occ = d > EMPTY_DEPTH
    z = (d + 1.0) / depth_factor
    bil = (z * wts).sum(1)
    near = np.where(occ, wts, -1.0).argmax(1)
    nearest = z[np.arange(len(z)), near]
    res = np.where(occ.all(1), bil, np.where(occ.any(1), nearest, np.nan))
    out[ok] = res
    return out


def _front_depth(occupancy: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W) float32 front depth bins of a (D, H, W) bool volume, -1 where empty: the rule of
    :func:`vrn.volume.surface.front_depth`, in numpy uint8 arithmetic when D < 255 (a few ms
    where the torch version takes ~0.1 s on a CPU)."""
    if isinstance(occupancy, torch.Tensor):
        occupancy = occupancy.cpu().numpy()
    occ = np.ascontiguousarray(np.asarray(occupancy, bool))
    D = occ.shape[0]
    if D >= 255:
        return front_depth(torch.from_numpy(occ)[None])[0].numpy()
    d = np.arange(1, D + 1, dtype=np.uint8)[:, None]
    top = np.maximum.reduce(occ.reshape(D, -1).view(np.uint8) * d, axis=0)
    return top.reshape(occ.shape[1:]).astype(np.float32) - 1.0


def _robust_seed(src: np.ndarray, dst: np.ndarray, floor: float) -> tuple[Any, np.ndarray]:
    """Similarity of template landmarks onto seed points, re-fitted twice without outliers."""
    keep = np.ones(len(src), bool)
    fit = similarity_fit(src, dst)
    for _ in range(2):
        r = np.linalg.norm(fit.apply(src) - dst, axis=1)
        new = r <= max(2.5 * float(np.median(r[keep])), floor)
        if new.sum() < _MIN_SEED or np.array_equal(new, keep):
            break
        keep = new
        fit = similarity_fit(src[keep], dst[keep])
    return fit, keep


def estimate_pose_landmarks(
    occupancy: np.ndarray | torch.Tensor,
    transform: CropTransform,
    landmarks_2d: np.ndarray,
    template: FaceTemplate | str = "bfm",
    depth_factor: float = DEPTH_FACTOR,
    visibility_tol: float = 0.06,
    iterations: int = 15,
    stages: int = 3,
) -> PoseLandmarks | None:
    """Head pose and 68 3D landmarks of one face (module doc).

    Args:
        occupancy: (D, H, W) bool occupancy (``prob > threshold``), crop px, index ``[d, r, c]``.
        transform: image px -> crop px of the crop the volume was predicted from.
        landmarks_2d: (68, 2) float detector landmarks, image px (NaN rows: unknown).
        template: a :class:`FaceTemplate` or its name (:func:`load_template`).
        depth_factor: depth bins per crop px (the checkpoint's layout).
        visibility_tol: the visibility rule's tolerance, fraction of the landmark box size.
        iterations: ICP rounds in all.
        stages: the ICP rounds are split into this many stages; each starts by re-deciding
            which landmarks are visible (and so take part) with the current fit.
    Returns:
        :class:`PoseLandmarks`, or None when the volume is empty or fewer than 6 inner
        landmarks have surface under them.
    """
    tpl = load_template(template) if isinstance(template, str) else template
    lm2 = np.asarray(landmarks_2d, np.float64)
    if lm2.shape != (68, 2):
        raise ValueError(f"landmarks_2d must be (68, 2) image px, got {lm2.shape}")
    fd = _front_depth(occupancy)
    pts_crop = front_surface_points(fd, depth_factor)
    if len(pts_crop) < 10:
        return None
    surface = transform.apply_inverse(pts_crop)  # (N, 3) image px
    inv_s = 1.0 / transform.scale
    z_lm = surface_depth_from_map(fd, transform.apply(np.nan_to_num(lm2, nan=-1e9)), depth_factor) * inv_s
    z_lm[~np.isfinite(lm2).all(1)] = np.nan
    finite = np.isfinite(lm2).all(1)
    box = np.ptp(lm2[finite], axis=0) if finite.sum() >= 2 else np.ones(2)
    size = float(np.sqrt(max(box[0] * box[1], 1e-6)))
    seed_ids = INNER_LANDMARKS[np.isfinite(z_lm[INNER_LANDMARKS]) & np.isfinite(tpl.landmarks[INNER_LANDMARKS, 0])]
    if len(seed_ids) < _MIN_SEED:
        return None
    dst = np.c_[lm2[seed_ids], z_lm[seed_ids]]
    fit, keep = _robust_seed(tpl.landmarks[seed_ids], dst, 0.02 * size)
    tree = cKDTree(surface)
    rms = float("nan")
    for _ in range(max(1, int(stages))):  # landmark visibility re-decided with each stage's fit
        vis = _visible(fit, tpl, lm2, z_lm, visibility_tol * size)
        use = seed_ids[vis[seed_ids]]
        if len(use) < _MIN_SEED:
            use = seed_ids[keep]
        fit, rms = fit_template_icp(
            tpl.points,
            tpl.normals,
            surface,
            fit,
            landmark_src=tpl.landmarks[use],
            landmark_dst=np.c_[lm2[use], z_lm[use]],
            iterations=max(1, int(iterations) // max(1, int(stages))),
            min_distance=0.01 * size,
            tree=tree,
        )
    vis = _visible(fit, tpl, lm2, z_lm, visibility_tol * size)
    posed = fit.apply(tpl.landmarks)
    out = posed.copy()
    out[finite, :2] = lm2[finite]
    out[vis, 2] = z_lm[vis]
    pose = HeadPose.from_rotation(fit.R, scale=fit.scale, translation=fit.t, rms=rms)
    return PoseLandmarks(pose, out, vis)


def _visible(fit: Any, tpl: FaceTemplate, lm2: np.ndarray, z_lm: np.ndarray, tol_px: float) -> np.ndarray:
    """(68,) bool: the visibility rule (module doc) for a fitted template."""
    posed_z = fit.apply(np.nan_to_num(tpl.landmarks))[:, 2]
    # template normal at a landmark: that of its nearest template point
    _, near = cKDTree(tpl.points).query(np.nan_to_num(tpl.landmarks))
    facing = (tpl.normals[near] @ fit.R.T)[:, 2] > 0.0
    with np.errstate(invalid="ignore"):
        covered = np.isfinite(z_lm) & (np.abs(z_lm - posed_z) <= tol_px)
    return covered & facing & np.isfinite(tpl.landmarks[:, 0]) & np.isfinite(lm2).all(1)

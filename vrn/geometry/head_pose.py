"""Head pose: Euler angles in AFLW2000-3D's ``Pose_Para`` convention, and a similarity fit
(Umeyama + trimmed ICP) of a face template to a point cloud.

Frames. Points are in image px or crop px (:mod:`vrn.conventions`: x right, y down, z toward
the camera). A head rotation ``R`` here is the *crop-frame* rotation of
:mod:`vrn.geometry.transforms` and :func:`vrn.face_models.bfm.rotation_to_crop_frame`:
``posed = s * R @ frontal + t`` where ``frontal`` is the face looking at the camera in the same
frame (x right, y down, z toward the camera).

Euler angles (degrees) follow 300W-LP / AFLW2000-3D ``Pose_Para`` (= 3DDFA's
``angle2matrix``, :func:`vrn.face_models.mat_fit.angles_to_matrix_3ddfa`): in the 3DMM frame
(y up) the rotation is ``R_model = A(pitch) @ B(yaw) @ C(roll)`` with
``A = [[1,0,0],[0,cp,sp],[0,-sp,cp]]``, ``B = [[cy,0,-sy],[0,1,0],[sy,0,cy]]``,
``C = [[cr,sr,0],[-sr,cr,0],[0,0,1]]``, and ``R = F @ R_model @ F`` with ``F = diag(1,-1,1)``.
So ``yaw = asin(-R_model[0, 2])``, ``pitch = atan2(R_model[1, 2], R_model[2, 2])``,
``roll = atan2(R_model[0, 1], R_model[0, 0])``. Checked against the 3DDFA_V2 port on
AFLW2000-3D faces (``tests/test_head_pose.py``). Signs, as seen in the photo: positive yaw
turns the face toward the image's left (the nose toward -x), positive pitch tilts it up (the
nose toward -y, the top of the image), positive roll turns the face clockwise on screen (its
+x axis toward +y). This is *not* the synthetic
generator's ``euler_to_matrix`` order (``Rz Ry Rx``); compare rotations, or convert both
with :func:`pose_angles_from_rotation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "HeadPose",
    "pose_angles_from_rotation",
    "rotation_from_pose_angles",
    "rotation_angle_deg",
    "similarity_fit",
    "SimilarityFit",
    "fit_template_icp",
]

_F = np.diag([1.0, -1.0, 1.0])


def rotation_from_pose_angles(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """Crop-frame head rotation (3, 3) float64 from ``Pose_Para`` angles in degrees (module doc)."""
    p, y, r = np.deg2rad([pitch, yaw, roll])
    cp, sp, cy, sy, cr, sr = np.cos(p), np.sin(p), np.cos(y), np.sin(y), np.cos(r), np.sin(r)
    a = np.array([[1.0, 0.0, 0.0], [0.0, cp, sp], [0.0, -sp, cp]])
    b = np.array([[cy, 0.0, -sy], [0.0, 1.0, 0.0], [sy, 0.0, cy]])
    c = np.array([[cr, sr, 0.0], [-sr, cr, 0.0], [0.0, 0.0, 1.0]])
    return _F @ (a @ b @ c) @ _F


def pose_angles_from_rotation(R: np.ndarray, model_frame: bool = False) -> tuple[float, float, float]:
    """``(pitch, yaw, roll)`` degrees in the ``Pose_Para`` convention (module doc).

    Args:
        R: (3, 3) rotation; crop frame (y down, as fitted here), or the 3DMM frame (y up, as
            ``Pose_Para`` and 3DDFA's cameras) with ``model_frame=True``.
    Returns:
        pitch, yaw, roll in degrees; yaw in [-90, 90]. At |yaw| = 90 (gimbal lock) roll is set
        to 0 and pitch takes the whole remaining rotation.
    """
    Rm = np.asarray(R, np.float64)
    if Rm.shape != (3, 3):
        raise ValueError(f"rotation must be (3, 3), got {Rm.shape}")
    if not model_frame:
        Rm = _F @ Rm @ _F
    yaw = np.arcsin(np.clip(-Rm[0, 2], -1.0, 1.0))
    if abs(Rm[0, 2]) < 1.0 - 1e-9:
        pitch = np.arctan2(Rm[1, 2], Rm[2, 2])
        roll = np.arctan2(Rm[0, 1], Rm[0, 0])
    else:  # gimbal lock: only pitch -/+ roll is defined
        roll = 0.0
        pitch = np.arctan2(-Rm[2, 1], Rm[1, 1])
    return float(np.degrees(pitch)), float(np.degrees(yaw)), float(np.degrees(roll))


def rotation_angle_deg(R1: np.ndarray, R2: np.ndarray) -> float:
    """Geodesic angle (degrees) between two rotations: the angle of ``R1.T @ R2``."""
    c = (np.trace(np.asarray(R1, np.float64).T @ np.asarray(R2, np.float64)) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


@dataclass(frozen=True)
class HeadPose:
    """A face's head pose in one frame (image px unless stated).

    Attributes:
        pitch, yaw, roll: degrees, ``Pose_Para`` convention (module doc).
        rotation: (3, 3) float64 crop-frame rotation, ``posed = scale * rotation @ frontal + translation``.
        scale: template units -> px.
        translation: (3,) float64 px.
        rms: RMS distance (px) of the fit's kept point pairs (a quality hint).
    """

    pitch: float
    yaw: float
    roll: float
    rotation: np.ndarray
    scale: float = 1.0
    translation: np.ndarray | None = None
    rms: float = float("nan")

    @classmethod
    def from_rotation(cls, R: np.ndarray, **kwargs: Any) -> HeadPose:
        p, y, r = pose_angles_from_rotation(R)
        return cls(p, y, r, np.asarray(R, np.float64), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: yaw, pitch, roll (degrees, rounded to 0.01), rotation (3x3), scale, rms."""
        return {
            "yaw": round(self.yaw, 2),
            "pitch": round(self.pitch, 2),
            "roll": round(self.roll, 2),
            "convention": "AFLW2000-3D Pose_Para (degrees)",
            "rotation": [[round(float(v), 6) for v in row] for row in self.rotation],
            "scale": float(self.scale),
            "fit_rms_px": None if not np.isfinite(self.rms) else round(float(self.rms), 3),
        }


@dataclass(frozen=True)
class SimilarityFit:
    """``dst ~ scale * R @ src + t`` (R: (3, 3) det +1, t: (3,))."""

    scale: float
    R: np.ndarray
    t: np.ndarray

    def apply(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) -> (N, 3) float64."""
        return self.scale * (np.asarray(points, np.float64) @ self.R.T) + self.t


def similarity_fit(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> SimilarityFit:
    """Weighted least-squares similarity (Umeyama 1991): minimises
    ``sum w_i ||s R src_i + t - dst_i||^2``.

    Args:
        src, dst: (N, 3) corresponding points (N >= 3, not collinear).
        weights: (N,) non-negative, or None (all 1).
    Returns:
        :class:`SimilarityFit` (det R = +1).
    """
    a = np.asarray(src, np.float64)
    b = np.asarray(dst, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 3 or len(a) < 3:
        raise ValueError(f"src and dst must be equal (N>=3, 3), got {a.shape} and {b.shape}")
    w = np.ones(len(a)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    ca, cb = w @ a, w @ b
    a0, b0 = a - ca, b - cb
    cov = (b0 * w[:, None]).T @ a0  # (3, 3) = sum w (dst)(src)^T
    U, S, Vt = np.linalg.svd(cov)
    d = np.ones(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        d[2] = -1.0
    R = U @ np.diag(d) @ Vt
    var_a = float(w @ (a0 * a0).sum(1))
    s = float((S * d).sum() / var_a) if var_a > 0 else 1.0
    return SimilarityFit(s, R, cb - s * (R @ ca))


def fit_template_icp(
    template_points: np.ndarray,
    template_normals: np.ndarray,
    target_points: np.ndarray,
    init: SimilarityFit,
    landmark_src: np.ndarray | None = None,
    landmark_dst: np.ndarray | None = None,
    iterations: int = 15,
    trim: float = 2.5,
    min_distance: float = 1.0,
    landmark_share: float = 0.5,
    facing: float = 0.1,
    tree: cKDTree | None = None,
) -> tuple[SimilarityFit, float]:
    """Trimmed point-to-point similarity ICP of a face template onto a front-surface cloud.

    Each iteration poses the template, keeps its points whose normal faces the camera
    (posed normal z > ``facing``), pairs each with its nearest target point, drops pairs
    farther than ``max(trim * median distance, min_distance)``, and re-solves the similarity
    (:func:`similarity_fit`) on the kept pairs plus the landmark pairs, which together carry
    ``landmark_share`` of the total weight.

    Args:
        template_points: (N, 3) template, frontal, crop-frame axes (template units).
        template_normals: (N, 3) unit outward normals of those points.
        target_points: (M, 3) the surface cloud (px).
        init: the starting similarity (e.g. from landmarks).
        landmark_src, landmark_dst: (K, 3) template landmarks and their targets (px), or None.
        iterations: ICP rounds.
        trim, min_distance: the outlier rule above (px for ``min_distance``).
        landmark_share: weight share of the landmark pairs in [0, 1).
        facing: posed-normal z threshold for a template point to take part.
        tree: a prebuilt ``cKDTree(target_points)``.
    Returns:
        the final :class:`SimilarityFit` and the RMS distance (px) of its kept dense pairs.
    """
    src_all = np.asarray(template_points, np.float64)
    nrm = np.asarray(template_normals, np.float64)
    tgt = np.asarray(target_points, np.float64)
    tree = tree if tree is not None else cKDTree(tgt)
    have_lm = landmark_src is not None and landmark_dst is not None and len(landmark_src) >= 3
    fit, rms = init, float("nan")
    for _ in range(int(iterations)):
        front = (nrm @ fit.R.T)[:, 2] > facing
        if front.sum() < 10:
            break
        src = src_all[front]
        d, idx = tree.query(fit.apply(src))
        keep = d <= max(trim * float(np.median(d)), min_distance)
        rms = float(np.sqrt(np.mean(d[keep] ** 2)))
        s_pts, d_pts, w = src[keep], tgt[idx[keep]], np.ones(int(keep.sum()))
        if have_lm:
            k = len(landmark_src)  # type: ignore[arg-type]
            wl = np.full(k, landmark_share / (1.0 - landmark_share) * len(w) / k)
            s_pts = np.vstack([s_pts, landmark_src])
            d_pts = np.vstack([d_pts, landmark_dst])
            w = np.concatenate([w, wl])
        if len(w) < 3:
            break
        fit = similarity_fit(s_pts, d_pts, w)
    return fit, rms

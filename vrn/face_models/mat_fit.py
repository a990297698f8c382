"""300W-LP / AFLW2000-3D ``.mat`` 3DMM fits: reading them and posing their points.

A ``.mat`` beside each photo holds ``Pose_Para`` (pitch, yaw, roll [rad], tx, ty, tz,
scale), ``Shape_Para`` (199), ``Exp_Para`` (29) and, for AFLW2000-3D, ``pt3d_68``. Its
coordinates are MATLAB 1-based with y up; :func:`mat_fit_points` maps model points to the
project's 0-based image px (:mod:`vrn.conventions`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io as sio

from vrn.face_models.bfm import load_dense_bfm

__all__ = [
    "MatFitError",
    "angles_to_matrix_3ddfa",
    "mat_path_for",
    "load_mat_fit",
    "mat_fit_points",
    "mat_landmarks",
    "mat_annotation",
]


class MatFitError(ValueError):
    """A missing or incomplete ``.mat`` fit file (``reason`` is the pipeline's failure code)."""

    reason = "no_fit"


def angles_to_matrix_3ddfa(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """300W-LP's rotation (radians), as 3DDFA / face3d ``angle2matrix_3ddfa``:
    ``R = Rx(pitch) @ Ry(yaw) @ Rz(roll)`` applied as ``R @ v`` in the BFM frame."""
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    cz, sz = np.cos(roll), np.sin(roll)
    rx = np.array([[1, 0, 0], [0, cx, sx], [0, -sx, cx]])
    ry = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])
    rz = np.array([[cz, sz, 0], [-sz, cz, 0], [0, 0, 1]])
    return rx @ ry @ rz


def mat_path_for(image_path: str | os.PathLike) -> Path:
    return Path(image_path).with_suffix(".mat")


def load_mat_fit(mat_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The fields of a 300W-LP / AFLW2000-3D ``.mat``.

    Raises:
        MatFitError: the file is missing or lacks ``Pose_Para`` / ``Shape_Para`` / ``Exp_Para``.
    """
    p = Path(mat_path)
    if not p.is_file():
        raise MatFitError(f"no 3DMM fit file {p.name} beside the image")
    m = sio.loadmat(str(p))
    for k in ("Pose_Para", "Shape_Para", "Exp_Para"):
        if k not in m:
            raise MatFitError(f"{p.name} lacks {k}")
    return {k: v for k, v in m.items() if not k.startswith("__")}


def mat_fit_points(model_pts: np.ndarray, pose_para: np.ndarray, image_height: int) -> np.ndarray:
    """Model-space points (3, N) -> image px (N, 3) with a .mat's ``Pose_Para``.

    ``s R v + t`` (``R`` = :func:`angles_to_matrix_3ddfa`), then the y flip of 300W-LP
    (``y = H + 1 - y``, MATLAB 1-based) and the shift to 0-based pixel centres (x - 1,
    y - 1), as 3DDFA does. z is left in the same units, pointing toward the camera.
    """
    p = np.asarray(pose_para, np.float64).ravel()
    R = angles_to_matrix_3ddfa(p[0], p[1], p[2])
    pts = p[6] * (R @ np.asarray(model_pts, np.float64)) + p[3:6, None]
    out = pts.T.copy()
    out[:, 0] = pts[0] - 1.0
    out[:, 1] = image_height - pts[1]  # (H + 1 - y) - 1
    return out


def mat_landmarks(mat: dict[str, np.ndarray], image_height: int, bfm: Any | None = None) -> np.ndarray:
    """(68, 3) image px landmarks of a .mat's 3DMM fit (40 shape / 10 expression terms with
    the 68-point basis of ``bfm``, default the offline stand-in's exact basis)."""
    if bfm is None:
        bfm = load_dense_bfm(None, "offline_standin")
    a_s = np.asarray(mat["Shape_Para"], np.float32).ravel()[: bfm.w_shp.shape[1]]
    a_e = np.asarray(mat["Exp_Para"], np.float32).ravel()[: bfm.w_exp.shape[1]]
    return mat_fit_points(bfm.shape(a_s, a_e, dense=False), mat["Pose_Para"], image_height)


def mat_annotation(mat: dict[str, np.ndarray]) -> np.ndarray | None:
    """The .mat's own 68 landmarks (68, 2) as 0-based image px: ``pt3d_68`` (AFLW2000-3D)
    or ``pt2d`` (300W-LP, when it has 68 points); None when absent."""
    for key in ("pt3d_68", "pt2d"):
        if key in mat and np.asarray(mat[key]).shape[-1] == 68:
            return np.asarray(mat[key], np.float64)[:2].T - 1.0
    return None

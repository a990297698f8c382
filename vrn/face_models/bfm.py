"""Dense 3D face models: the 3DDFA_V2 Basel Face Model (BFM) and its offline stand-in.

Shared domain code for the data pipeline's fit stage and for evaluation: loading a dense
BFM from the asset registry (:func:`load_bfm`, :func:`load_dense_bfm`; the files are read
by the 3DDFA_V2 port's loaders in :mod:`tddfa_v2.bfm`), building a dense shape from 3DMM coefficients
(:func:`dense_model_shape`), and the rotation from the BFM frame (y up) to the crop frame
(y down, :mod:`vrn.conventions`).

Dense mesh and the offline stand-in. ``bfm_noneck_v3_offline.npz`` carries identity and
expression only on the 68 landmark vertices; used naively the mesh would be the mean face
with 68 spikes. :func:`spread_landmark_displacement` spreads the landmark displacements
over the whole mean face by a 3D polyharmonic spline (phi(r) = r, plus an affine term),
exact at the landmarks: a smooth face that passes through the fitted landmarks.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io as sio
from scipy.spatial import cKDTree

from tddfa_v2 import BFMModel, load_bfm_offline_npz, load_bfm_pkl, load_tri
from vrn.assets import available, resolve
from vrn.face_models.landmarks68 import LANDMARK_MIRROR

__all__ = [
    "BFM_SOURCES",
    "default_bfm_source",
    "dense_model_shape",
    "load_bfm",
    "load_dense_bfm",
    "mirror_vertex_order",
    "rotation_to_crop_frame",
    "spread_landmark_displacement",
]

#: registry asset behind each BFM source name (``BFMModel.source``)
BFM_SOURCES: dict[str, str] = {
    "bfm_noneck_v3": "3ddfa_v2/bfm_noneck_v3.pkl",
    "offline_standin": "3ddfa_v2/bfm_noneck_v3_offline.npz",
}
_TRI = "3ddfa_v2/tri.pkl"

#: y flip between the 3DMM model frame (y up) and the image / crop frame (y down)
_F = np.diag([1.0, -1.0, 1.0])


def rotation_to_crop_frame(R_model: np.ndarray) -> np.ndarray:
    """Head rotation in the crop frame from a BFM-frame rotation (y up, z toward camera).

    A point of the model maps to the crop as ``F @ (s R_model v) + t`` (``F`` flips y), and
    the frontal face in the crop frame is ``F v``; so ``posed = (F R_model F) @ frontal``.
    """
    return (_F @ np.asarray(R_model, np.float64) @ _F).astype(np.float64)


# --------------------------------------------------------------------------------------
# dense model
# --------------------------------------------------------------------------------------


class _Spline:
    """3D polyharmonic spline (phi(r) = r, affine term) through fixed centres, evaluated
    at fixed points; the matrices depend only on the model, the values per sample."""

    def __init__(self, centres: np.ndarray, points: np.ndarray) -> None:
        c0 = centres.mean(0)
        scale = np.linalg.norm(centres - c0, axis=1).max()
        c = (centres - c0) / scale
        p = (points - c0) / scale
        n = len(c)
        K = np.linalg.norm(c[:, None] - c[None], axis=-1)
        P = np.hstack([np.ones((n, 1)), c])
        A = np.zeros((n + 4, n + 4))
        A[:n, :n], A[:n, n:], A[n:, :n] = K, P, P.T
        self.A_inv = np.linalg.inv(A)
        # evaluation matrix (V, n + 4), float32 to keep it ~10 MB for the BFM
        Ke = np.linalg.norm(p[:, None, :] - c[None, :, :], axis=-1)
        self.E = np.hstack([Ke, np.ones((len(p), 1)), p]).astype(np.float32)
        self.n = n

    def __call__(self, values: np.ndarray) -> np.ndarray:
        rhs = np.zeros((self.n + 4, values.shape[1]))
        rhs[: self.n] = values
        coef = self.A_inv @ rhs
        return self.E @ coef.astype(np.float32)


@lru_cache(maxsize=4)
def _spline_for(bfm: Any) -> _Spline:
    """Cached per model object (BFMModel hashes by identity)."""
    u = bfm.u.reshape(-1, 3).astype(np.float64)
    return _Spline(u[bfm.landmark_vertices], u)


def spread_landmark_displacement(bfm: Any, alpha_shp: np.ndarray, alpha_exp: np.ndarray) -> np.ndarray:
    """Dense model-space shape (3, V) of the offline stand-in: the mean face plus the 68
    landmark displacements spread smoothly over it (exact at the landmark vertices)."""
    a_s = np.asarray(alpha_shp, np.float32).reshape(-1, 1)
    a_e = np.asarray(alpha_exp, np.float32).reshape(-1, 1)
    disp = (bfm.w_shp_base[:, : len(a_s)] @ a_s + bfm.w_exp_base[:, : len(a_e)] @ a_e).reshape(68, 3)
    spline = _spline_for(bfm)
    dense = bfm.u.reshape(-1, 3) + spline(disp.astype(np.float64))
    lv = bfm.landmark_vertices
    dense[lv] = bfm.u.reshape(-1, 3)[lv] + disp  # exact at the landmarks (spline is, up to float error)
    return dense.T.astype(np.float32)


@lru_cache(maxsize=4)
def mirror_vertex_order(bfm: Any) -> np.ndarray:
    """Each dense vertex's mirror image under the face's left-right flip.

    The nearest vertex of the mean face mirrored about its symmetry plane ``x = c`` (model
    frame; ``c`` the mean x of the midpoints of the 68 landmarks and their mirror landmarks,
    :data:`vrn.face_models.landmarks68.LANDMARK_MIRROR`); the 68 landmark vertices map exactly to their
    mirror landmarks' vertices. On the 3DDFA_V2 mean face the matched vertices lie a median
    0.5 % of the interocular distance from the mirrored positions.

    Returns:
        (V,) int64 vertex ids: vertex ``i`` of a mirrored mesh corresponds to vertex ``order[i]``.
    """
    u = bfm.u.reshape(-1, 3).astype(np.float64)
    lv = bfm.landmark_vertices
    c = float(np.mean((u[lv, 0] + u[lv[LANDMARK_MIRROR], 0]) / 2.0))
    mirrored = u.copy()
    mirrored[:, 0] = 2.0 * c - mirrored[:, 0]
    order = cKDTree(u).query(mirrored)[1].astype(np.int64)
    order[lv] = lv[LANDMARK_MIRROR]
    return order


def dense_model_shape(
    bfm: Any, alpha_shp: np.ndarray, alpha_exp: np.ndarray, smooth_standin: bool = True
) -> tuple[np.ndarray, np.ndarray, str]:
    """Model-space dense (3, V) and landmark (3, 68) shapes, and how the dense was built."""
    a_s = np.asarray(alpha_shp, np.float32).ravel()[: bfm.w_shp.shape[1]]
    a_e = np.asarray(alpha_exp, np.float32).ravel()[: bfm.w_exp.shape[1]]
    lms = bfm.shape(a_s, a_e, dense=False)
    if bfm.source == "offline_standin":
        if smooth_standin:
            return spread_landmark_displacement(bfm, a_s, a_e), lms, "mean_face+landmark_spline"
        return bfm.shape(a_s, a_e, dense=True), lms, "mean_face+landmark_vertices"
    return bfm.shape(a_s, a_e, dense=True), lms, "dense_bases"


def default_bfm_source() -> str:
    """``"bfm_noneck_v3"`` when its file resolves locally (no download), else ``"offline_standin"``."""
    return "bfm_noneck_v3" if available(BFM_SOURCES["bfm_noneck_v3"]) else "offline_standin"


@lru_cache(maxsize=4)
def _load_bfm_cached(source: str, path: Path, shape_dim: int, exp_dim: int) -> BFMModel:
    """One model per (source, file, truncation) and process: the bases are ~20 MB."""
    if source == "bfm_noneck_v3":
        return load_bfm_pkl(path, resolve(_TRI), shape_dim, exp_dim)
    return load_bfm_offline_npz(path, shape_dim, exp_dim)


def load_bfm(source: str = "auto", shape_dim: int = 40, exp_dim: int = 10) -> BFMModel:
    """The 3DDFA_V2 BFM from the asset registry (cached: the same object per file).

    Args:
        source: ``"auto"`` (:func:`default_bfm_source`: the dense ``bfm_noneck_v3.pkl``
            when it resolves locally, else the offline stand-in; never downloads),
            ``"bfm_noneck_v3"`` (``bfm_noneck_v3.pkl`` + ``tri.pkl``) or
            ``"offline_standin"`` (``bfm_noneck_v3_offline.npz``).
        shape_dim, exp_dim: number of shape / expression components kept.

    Raises:
        ValueError: unknown ``source``.
        vrn.assets.AssetNotFoundError: the chosen file cannot be resolved.
    """
    if source == "auto":
        source = default_bfm_source()
    if source not in BFM_SOURCES:
        raise ValueError(f"unknown BFM source {source!r}; expected 'auto' or one of {sorted(BFM_SOURCES)}")
    return _load_bfm_cached(source, resolve(BFM_SOURCES[source]), int(shape_dim), int(exp_dim))


def load_dense_bfm(bfm_path: str | os.PathLike | None = None, source: str = "auto") -> BFMModel:
    """A :class:`tddfa_v2.BFMModel` for dense meshes.

    Args:
        bfm_path: None (the registry: ``bfm_noneck_v3.pkl`` when present, else the offline
            stand-in), a 3DDFA_V2 ``bfm_noneck_v3.pkl`` (all its components, 40 shape /
            10 expression upstream), or face3d's full ``BFM.mat`` (199 / 29 components;
            reduced to the 38,365-vertex no-neck mesh with ``3ddfa_v2/indices.npy`` and
            ``tri.pkl``).
        source: passed to :func:`load_bfm` when ``bfm_path`` is None.
    """
    if bfm_path is None:
        return load_bfm(source)
    p = Path(os.path.expanduser(str(bfm_path)))
    if not p.is_file():
        raise FileNotFoundError(
            f"fitter.bfm_path={p} does not exist: give the path of bfm_noneck_v3.pkl "
            f"(3DDFA_V2 configs/) or face3d's BFM.mat, or null for the offline stand-in"
        )
    if p.suffix == ".pkl":
        return load_bfm_pkl(p, resolve(_TRI))
    if p.suffix == ".mat":
        m = sio.loadmat(str(p))["model"][0, 0]
        idx = np.load(resolve("3ddfa_v2/indices.npy")).astype(np.int64).ravel()
        rows = (idx[:, None] * 3 + np.arange(3)).ravel()
        mu = (np.asarray(m["shapeMU"], np.float64) + np.asarray(m["expMU"], np.float64)).reshape(-1, 1)
        kpt = np.asarray(m["kpt_ind"]).astype(np.int64).ravel() - 1  # MATLAB 1-based
        pos = np.searchsorted(idx, kpt)
        if not np.array_equal(idx[np.clip(pos, 0, len(idx) - 1)], kpt):
            raise ValueError(f"{p}: landmark vertices outside the no-neck mesh; is this face3d's BFM.mat?")
        return BFMModel(
            u=mu[rows].astype(np.float32),
            w_shp=np.ascontiguousarray(np.asarray(m["shapePC"], np.float32)[rows]),
            w_exp=np.ascontiguousarray(np.asarray(m["expPC"], np.float32)[rows]),
            tri=load_tri(resolve(_TRI)),
            keypoints=(pos[:, None] * 3 + np.arange(3)).ravel(),
            source="bfm_full_mat",
        )
    raise ValueError(f"fitter.bfm_path={p}: expected a .pkl (3DDFA_V2) or .mat (face3d BFM)")

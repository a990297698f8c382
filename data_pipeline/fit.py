"""Stage 2, fit: a dense 3D face mesh for every crop.

``python -m data_pipeline.fit input_dir=<out>/crop output_dir=<out>/fit source=tddfa``

Sources (``source=<name>``):

* ``tddfa``: 3DDFA_V2 (mb05) run on the crop, its ROI from the crop's 68 landmarks
  (upstream's landmark policy).
* ``300wlp``: the 3DMM fit stored in each 300W-LP / AFLW2000-3D ``.mat`` beside the photo:
  ``Pose_Para`` (pitch, yaw, roll [rad], tx, ty, tz, scale), ``Shape_Para`` (199),
  ``Exp_Para`` (29). The dense mesh needs a BFM: ``source.bfm_path`` (3DDFA_V2's
  ``bfm_noneck_v3.pkl``, or face3d's full ``BFM.mat``); without one, the offline stand-in
  with the 40 shape / 10 expression truncation, whose 68 landmarks reproduce the .mat's
  to ~1 px (see docs/pipeline.md for the measured numbers).

Output frame (both sources): crop px, x right, y down, z toward the camera with the same
scale as x/y; the target solid's depth range is centred in the volume (:func:`vrn.volume.voxelize.solid_depth_shift`).
``R`` is the head rotation in that frame (``posed = R @ frontal``; frontal = the mesh
looking at the camera, upright), det +1.

Per sample ``items/<id>.npz`` (written atomically, deterministic bytes): ``verts`` (V, 3)
float32, ``tris`` (F, 3) int32 (no-neck BFM: no neck, no ears), ``R`` (3, 3) float32,
``landmarks`` (68, 3) float32 crop px, ``bfm_source`` (str).

Dense mesh and the offline stand-in. ``bfm_noneck_v3_offline.npz`` carries identity and
expression only on the 68 landmark vertices; used naively the mesh would be the mean face
with 68 spikes. With ``smooth_standin`` (default) the landmark displacements are spread
over the whole mean face by a 3D polyharmonic spline (phi(r) = r, plus an affine term),
exact at the landmarks: a smooth face that passes through the fitted landmarks. The
sample's ``bfm_source`` says which model was used and ``dense_model`` how.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from vrn.conventions import DEPTH_BINS, DEPTH_FACTOR
from vrn.geometry.transforms import CropTransform
from vrn.io import read_image_rgb
from vrn.volume.voxelize import solid_depth_shift

from . import _ensure_tddfa_v2_importable
from .stage import Item, ItemContext, ItemFailure, Stage, load_npz

__all__ = ["FitResult", "TDDFAFitter", "MatFitter", "FitStage", "angles_to_matrix_3ddfa", "load_mat_fit",
           "mat_landmarks", "mat_fit_points", "spread_landmark_displacement", "load_dense_bfm",
           "rotation_to_crop_frame"]

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


def dense_model_shape(bfm: Any, alpha_shp: np.ndarray, alpha_exp: np.ndarray,
                      smooth_standin: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """Model-space dense (3, V) and landmark (3, 68) shapes, and how the dense was built."""
    a_s = np.asarray(alpha_shp, np.float32).ravel()[: bfm.w_shp.shape[1]]
    a_e = np.asarray(alpha_exp, np.float32).ravel()[: bfm.w_exp.shape[1]]
    lms = bfm.shape(a_s, a_e, dense=False)
    if bfm.source == "offline_standin":
        if smooth_standin:
            return spread_landmark_displacement(bfm, a_s, a_e), lms, "mean_face+landmark_spline"
        return bfm.shape(a_s, a_e, dense=True), lms, "mean_face+landmark_vertices"
    return bfm.shape(a_s, a_e, dense=True), lms, "dense_bases"


def load_dense_bfm(bfm_path: str | os.PathLike | None = None, source: str = "auto") -> Any:
    """A :class:`tddfa_v2.BFMModel` for dense meshes.

    Args:
        bfm_path: None (the registry: ``bfm_noneck_v3.pkl`` when present, else the offline
            stand-in), a 3DDFA_V2 ``bfm_noneck_v3.pkl`` (40 shape / 10 expression
            components), or face3d's full ``BFM.mat`` (199 / 29 components; reduced to the
            38,365-vertex no-neck mesh with ``3ddfa_v2/indices.npy`` and ``tri.pkl``).
        source: passed to :func:`tddfa_v2.load_bfm` when ``bfm_path`` is None.
    """
    _ensure_tddfa_v2_importable()
    from tddfa_v2 import BFMModel, load_bfm

    from vrn.assets import resolve

    if bfm_path is None:
        return load_bfm(source)
    p = Path(os.path.expanduser(str(bfm_path)))
    if not p.is_file():
        raise FileNotFoundError(f"source.bfm_path={p} does not exist: give the path of bfm_noneck_v3.pkl "
                                f"(3DDFA_V2 configs/) or face3d's BFM.mat, or null for the offline stand-in")
    import pickle

    if p.suffix == ".pkl":
        with open(p, "rb") as f:
            d = pickle.load(f)
        tri = np.asarray(pickle.load(open(resolve("3ddfa_v2/tri.pkl"), "rb")))
        tri = tri.T if tri.shape[0] == 3 and tri.shape[1] != 3 else tri
        return BFMModel(u=np.asarray(d["u"], np.float32).reshape(-1, 1),
                        w_shp=np.ascontiguousarray(np.asarray(d["w_shp"], np.float32)),
                        w_exp=np.ascontiguousarray(np.asarray(d["w_exp"], np.float32)),
                        tri=np.ascontiguousarray(tri, np.int32),
                        keypoints=np.asarray(d["keypoints"], np.int64).ravel(), source="bfm_noneck_v3")
    if p.suffix == ".mat":
        import scipy.io as sio

        m = sio.loadmat(str(p))["model"][0, 0]
        idx = np.load(resolve("3ddfa_v2/indices.npy")).astype(np.int64).ravel()
        rows = (idx[:, None] * 3 + np.arange(3)).ravel()
        mu = (np.asarray(m["shapeMU"], np.float64) + np.asarray(m["expMU"], np.float64)).reshape(-1, 1)
        kpt = np.asarray(m["kpt_ind"]).astype(np.int64).ravel() - 1  # MATLAB 1-based
        pos = np.searchsorted(idx, kpt)
        if not np.array_equal(idx[np.clip(pos, 0, len(idx) - 1)], kpt):
            raise ValueError(f"{p}: landmark vertices outside the no-neck mesh; is this face3d's BFM.mat?")
        tri = np.asarray(pickle.load(open(resolve("3ddfa_v2/tri.pkl"), "rb")))
        tri = tri.T if tri.shape[0] == 3 and tri.shape[1] != 3 else tri
        return BFMModel(u=mu[rows].astype(np.float32),
                        w_shp=np.ascontiguousarray(np.asarray(m["shapePC"], np.float32)[rows]),
                        w_exp=np.ascontiguousarray(np.asarray(m["expPC"], np.float32)[rows]),
                        tri=np.ascontiguousarray(tri, np.int32),
                        keypoints=(pos[:, None] * 3 + np.arange(3)).ravel(), source="bfm_full_mat")
    raise ValueError(f"source.bfm_path={p}: expected a .pkl (3DDFA_V2) or .mat (face3d BFM)")


# --------------------------------------------------------------------------------------
# 300W-LP / AFLW2000-3D .mat fits
# --------------------------------------------------------------------------------------


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
    """The fields of a 300W-LP / AFLW2000-3D ``.mat`` (raises ItemFailure when absent)."""
    import scipy.io as sio

    p = Path(mat_path)
    if not p.is_file():
        raise ItemFailure("no_fit", f"no 3DMM fit file {p.name} beside the image")
    m = sio.loadmat(str(p))
    for k in ("Pose_Para", "Shape_Para", "Exp_Para"):
        if k not in m:
            raise ItemFailure("no_fit", f"{p.name} lacks {k}")
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


# --------------------------------------------------------------------------------------
# fitters
# --------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """A fitted mesh in crop px (x right, y down, z toward the camera, any z offset).

    verts (V, 3) float, tris (F, 3) int32, R (3, 3) posed = R @ frontal,
    landmarks (68, 3), bfm_source, dense_model (how the dense mesh was built).
    """

    verts: np.ndarray
    tris: np.ndarray
    R: np.ndarray
    landmarks: np.ndarray
    bfm_source: str
    dense_model: str


class TDDFAFitter:
    """3DDFA_V2 on the crop, ROI from the crop's landmarks (``source=tddfa``).

    Args:
        arch: "mb05" or "mb1".
        device: torch device.
        bfm_source: "auto" (``bfm_noneck_v3.pkl`` when present, else the offline stand-in).
        smooth_standin: spread the stand-in's landmark displacements (module doc).
        iterations: 3DDFA_V2 passes; each pass after the first takes its ROI from the
            previous pass's landmarks.
    """

    name = "tddfa"

    def __init__(self, arch: str = "mb05", device: str = "cpu", bfm_source: str = "auto",
                 smooth_standin: bool = True, iterations: int = 1) -> None:
        self.arch, self.device, self.bfm_source = arch, device, bfm_source
        self.smooth_standin = bool(smooth_standin)
        self.iterations = max(1, int(iterations))
        self._tddfa = None

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "arch": self.arch, "bfm_source": self.bfm_source,
                "smooth_standin": self.smooth_standin, "iterations": self.iterations}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tddfa": None}

    def setup(self) -> None:
        if self._tddfa is None:
            _ensure_tddfa_v2_importable()
            from tddfa_v2 import TDDFA

            self._tddfa = TDDFA(arch=self.arch, device=self.device, bfm_source=self.bfm_source)

    def fit(self, crop_rgb: np.ndarray, landmarks_crop: np.ndarray, sample: dict[str, Any],
            ctx: ItemContext) -> FitResult:
        from tddfa_v2 import similar_transform, split_param

        self.setup()
        pts = np.asarray(landmarks_crop, np.float64)[:, :2].T
        res = None
        for _ in range(self.iterations):
            res = self._tddfa.from_landmarks(crop_rgb, pts)[0]
            pts = res.pts68[:2]
        sr, t, a_s, a_e = split_param(res.param)
        bfm = self._tddfa.bfm
        dense, lms, how = dense_model_shape(bfm, a_s, a_e, self.smooth_standin)
        V = dense.shape[1]
        # one similar_transform over both sets: the same z shift for the mesh and landmarks
        both = similar_transform(np.hstack([sr @ dense + t, sr @ lms + t]), res.roi_box, res.size).T
        return FitResult(verts=both[:V], tris=np.asarray(bfm.tri, np.int32), R=rotation_to_crop_frame(res.R),
                         landmarks=both[V:], bfm_source=bfm.source, dense_model=how)


class MatFitter:
    """The 3DMM fit of the ``.mat`` beside each photo (``source=300wlp``).

    Args:
        bfm_path: full BFM for the dense mesh (see :func:`load_dense_bfm`); None = the
            registry (``bfm_noneck_v3.pkl`` when present, else the offline stand-in).
        smooth_standin: see the module doc.
        max_landmark_error: crop px; the fit's landmarks must lie within this mean distance
            of the crop's landmarks, else the sample fails with ``fit_mismatch`` (a crop of
            another face of the photo, or a wrong .mat).
    """

    name = "300wlp"

    def __init__(self, bfm_path: str | None = None, smooth_standin: bool = True,
                 max_landmark_error: float = 12.0) -> None:
        self.bfm_path = None if bfm_path in (None, "", "null") else str(bfm_path)
        self.smooth_standin = bool(smooth_standin)
        self.max_landmark_error = float(max_landmark_error)
        self._bfm = None

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "bfm_path": self.bfm_path, "smooth_standin": self.smooth_standin,
                "max_landmark_error": self.max_landmark_error}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bfm": None}

    def setup(self) -> None:
        if self._bfm is None:
            self._bfm = load_dense_bfm(self.bfm_path)

    def fit(self, crop_rgb: np.ndarray, landmarks_crop: np.ndarray, sample: dict[str, Any],
            ctx: ItemContext) -> FitResult:
        self.setup()
        src = ctx.path(sample["files"]["source_image"])
        mat = load_mat_fit(mat_path_for(src))
        rec = sample["_crop_record"]
        H = int(rec["image_size"][0])
        bfm = self._bfm
        dense, lms, how = dense_model_shape(bfm, mat["Shape_Para"], mat["Exp_Para"], self.smooth_standin)
        t = CropTransform.from_dict(rec["transform"])
        pose = mat["Pose_Para"]
        verts = t.apply(mat_fit_points(dense, pose, H))
        lm = t.apply(mat_fit_points(lms, pose, H))
        err = float(np.linalg.norm(lm[:, :2] - np.asarray(landmarks_crop)[:, :2], axis=1).mean())
        if err > self.max_landmark_error:
            raise ItemFailure("fit_mismatch", f"the .mat fit's landmarks lie {err:.1f} crop px (mean) from the "
                                              f"crop's; limit source.max_landmark_error={self.max_landmark_error}")
        p = np.asarray(pose, np.float64).ravel()
        R = rotation_to_crop_frame(angles_to_matrix_3ddfa(p[0], p[1], p[2]))
        return FitResult(verts=verts, tris=np.asarray(bfm.tri, np.int32), R=R, landmarks=lm,
                         bfm_source=bfm.source, dense_model=how)


# --------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------


class FitStage(Stage):
    """The fit stage (module doc).

    Args:
        fitter: :class:`TDDFAFitter` or :class:`MatFitter` (``source=`` in the config).
        depth_bins, depth_factor: volume layout, to centre the mesh's depth range on
            ``depth_bins / (2 depth_factor)``.
    """

    name = "fit"
    previous = "crop"

    def __init__(self, fitter: Any, depth_bins: int = DEPTH_BINS, depth_factor: float = DEPTH_FACTOR) -> None:
        self.fitter = fitter
        self.depth_bins = int(depth_bins)
        self.depth_factor = float(depth_factor)

    def params(self) -> dict[str, Any]:
        return {"source": self.fitter.params(), "depth_bins": self.depth_bins, "depth_factor": self.depth_factor}

    def setup(self) -> None:
        self.fitter.setup()

    def process(self, item: Item, ctx: ItemContext) -> list[dict[str, Any]]:
        s = dict(item.data)
        import json

        rec = json.loads(ctx.path(s["files"]["crop_record"]).read_text())
        crop = read_image_rgb(ctx.path(s["files"]["crop"]))
        lm_crop = np.asarray(rec["landmarks_crop"], np.float64)
        try:
            r = self.fitter.fit(crop, lm_crop, {**s, "_crop_record": rec}, ctx)
        except ItemFailure:
            raise
        except Exception as e:
            raise ItemFailure("fit_failed", f"{type(e).__name__}: {e}") from e
        verts = np.asarray(r.verts, np.float64)
        lms = np.asarray(r.landmarks, np.float64)
        if not (np.isfinite(verts).all() and np.isfinite(lms).all() and np.isfinite(r.R).all()):
            raise ItemFailure("fit_failed", "non-finite mesh")
        R = np.asarray(r.R, np.float64)
        if abs(np.linalg.det(R) - 1.0) > 1e-3 or not np.allclose(R @ R.T, np.eye(3), atol=1e-3):
            raise ItemFailure("fit_failed", "head rotation is not a rotation")
        shift = solid_depth_shift(verts, np.asarray(r.tris, np.int32), R, depth_bins=self.depth_bins,
                                  depth_factor=self.depth_factor)
        verts[:, 2] += shift
        lms[:, 2] += shift
        lm_err = float(np.linalg.norm(lms[:, :2] - lm_crop[:, :2], axis=1).mean())
        mesh = ctx.write_npz(f"items/{item.id}.npz", verts=verts.astype(np.float32),
                             tris=np.asarray(r.tris, np.int32), R=R.astype(np.float32),
                             landmarks=lms.astype(np.float32), bfm_source=np.array(r.bfm_source))
        zmin, zmax = float(verts[:, 2].min()), float(verts[:, 2].max())
        return [{**s, "fit_source": self.fitter.name, "bfm_source": r.bfm_source, "dense_model": r.dense_model,
                 "rotation": np.round(R, 6).tolist(), "fit_landmark_error": round(lm_err, 4),
                 "depth_range": [round(zmin, 4), round(zmax, 4)],
                 "files": {**s["files"], "mesh": mesh}}]


def read_mesh(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a fit stage ``.npz`` (verts, tris, R, landmarks, bfm_source)."""
    return load_npz(path)


@hydra.main(version_base="1.3", config_path="../conf/pipeline", config_name="fit")
def main(cfg: DictConfig) -> None:
    from .run import run_single_stage

    run_single_stage(cfg, "fit")


if __name__ == "__main__":
    main()

"""Stage 2, fit: a dense 3D face mesh for every crop.

``python -m data_pipeline.fit input_dir=<out>/crop output_dir=<out>/fit fitter=tddfa``

Fitters (``fitter=<name>``, config group ``conf/pipeline/fitter/``):

* ``tddfa``: 3DDFA_V2 (mb05) run on the crop, its ROI from the crop's 68 landmarks
  (upstream's landmark policy).
* ``300wlp``: the 3DMM fit stored in each 300W-LP / AFLW2000-3D ``.mat`` beside the photo:
  ``Pose_Para`` (pitch, yaw, roll [rad], tx, ty, tz, scale), ``Shape_Para`` (199),
  ``Exp_Para`` (29). The dense mesh needs a BFM: ``fitter.bfm_path`` (3DDFA_V2's
  ``bfm_noneck_v3.pkl``, or face3d's full ``BFM.mat``); without one, the offline stand-in
  with the 40 shape / 10 expression truncation, whose 68 landmarks reproduce the .mat's
  to ~1 px (see docs/pipeline.md for the measured numbers).
* ``sfm``: 3DDFA_V2 exactly as ``tddfa`` for its 68 3D landmarks, then the Surrey Face Model
  (identity + expression bases, a N(0, 1) prior) fitted to them
  (:func:`vrn.face_models.sfm_fit.fit_sfm_to_landmarks`): a dense mesh with a real shape
  prior offline, where the BFM stand-in only spreads the landmark displacements
  (``bfm_source: sfm_3448``, ``dense_model: sfm_fit_to_tddfa_landmarks``).

Output frame (all fitters): crop px, x right, y down, z toward the camera with the same
scale as x/y; the target solid's depth range is centred in the volume (:func:`vrn.volume.voxelize.solid_depth_shift`).
``R`` is the head rotation in that frame (``posed = R @ frontal``; frontal = the mesh
looking at the camera, upright), det +1.

Per sample ``items/<id>.npz`` (written atomically, deterministic bytes): ``verts`` (V, 3)
float32, ``R`` (3, 3) float32, ``landmarks`` (68, 3) float32 crop px, ``bfm_source`` (str);
the sample also records ``dense_model`` (how the dense mesh was built). The triangles
(F, 3) int32 (no-neck BFM: no neck, no ears) are the same for every fit of one face model, so
they are stored once per stage folder, ``topology/<sha256 of the array>.npy``, named by the
sample's ``files["topology"]`` (they were two thirds of every item: 1.38 -> 0.46 MB per face
with the BFM). :func:`load_fit_mesh` reads either layout (items from before this kept ``tris``
inside the ``.npz``).

Dense mesh and the offline stand-in (``smooth_standin``): see :mod:`vrn.face_models.bfm`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from data_pipeline.run import run_single_stage
from data_pipeline.stage import Item, ItemContext, ItemFailure, Stage, load_npz
from tddfa_v2 import similar_transform, split_param
from vrn.conventions import DEPTH_BINS, DEPTH_FACTOR
from vrn.face_models.bfm import dense_model_shape, load_dense_bfm, mirror_vertex_order, rotation_to_crop_frame
from vrn.face_models.landmarks68 import mirror_landmarks
from vrn.face_models.mat_fit import MatFitError, angles_to_matrix_3ddfa, load_mat_fit, mat_fit_points, mat_path_for
from vrn.face_models.sfm import load_sfm
from vrn.face_models.sfm_fit import DEFAULT_LAMBDA_EXPRESSION, DEFAULT_LAMBDA_SHAPE, fit_sfm_to_landmarks
from vrn.face_models.tddfa_models import load_tddfa
from vrn.geometry.transforms import CropTransform
from vrn.image_io import read_image_rgb
from vrn.volume.voxelize import solid_depth_shift

__all__ = ["FitResult", "TDDFAFitter", "SFMFitter", "MatFitter", "FitStage", "load_fit_mesh", "topology_file"]

TOPOLOGY_DIR = "topology"

# the stored mesh
# --------------------------------------------------------------------------------------


def topology_file(tris: np.ndarray) -> tuple[str, bytes]:
    """The shared triangle file of a mesh topology: ``(relative path, .npy bytes)``.

    tris: (F, 3) int vertex indices. The name is the sha256 of the int32 array's ``.npy``
    bytes, so every fit with the same topology names the same file.
    """
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(tris, dtype=np.int32), allow_pickle=False)
    data = buf.getvalue()
    return f"{TOPOLOGY_DIR}/{hashlib.sha256(data).hexdigest()[:32]}.npy", data


def load_fit_mesh(stage_dir: str | os.PathLike, sample: dict[str, Any]) -> dict[str, np.ndarray]:
    """A fit sample's mesh: ``verts`` (V, 3) float32 crop px, ``tris`` (F, 3) int32, ``R`` (3, 3),
    ``landmarks`` (68, 3) crop px, ``bfm_source``.

    Args:
        stage_dir: the folder ``sample["files"]`` is relative to (the fit folder for the fit
            manifest's samples; a later stage's folder for its rebased copies).
        sample: a manifest sample with ``files["mesh"]`` (and ``files["topology"]`` unless
            the ``.npz`` holds its own ``tris``, the layout before shared topology files).
    Raises:
        FileNotFoundError: the sample names no topology file and its ``.npz`` has no ``tris``.
    """
    stage_dir = Path(stage_dir)
    files = sample["files"]
    mesh = load_npz(stage_dir / files["mesh"])
    if "tris" not in mesh:
        if "topology" not in files:
            raise FileNotFoundError(
                f"{stage_dir / files['mesh']} has no triangles and its sample names no topology file; "
                "rerun the fit stage into a fresh output_dir"
            )
        mesh["tris"] = np.load(stage_dir / files["topology"], allow_pickle=False)
    return mesh


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


def mirror_average(fit: FitResult, mirrored: FitResult, width: int, vertex_order: np.ndarray) -> FitResult:
    """The mean of a fit and the fit of the mirrored crop, mirrored back.

    The mirrored fit goes back through x -> ``width - 1 - x`` (crop px, pixel centres at
    integers), its vertices through ``vertex_order`` (:func:`vrn.face_models.bfm.mirror_vertex_order`)
    and its landmarks through the 68-point mirror order; its z is shifted onto the fit's (mean
    landmark z; depth has no common origin); the rotations are mirrored (``F R F``, ``F`` the x
    flip) and averaged on SO(3) (the nearest rotation to their sum).

    Args:
        fit, mirrored: fits of the crop and of the mirrored crop (same mesh topology).
        width: crop width in px.
        vertex_order: (V,) int64 mirror vertex of each vertex.
    Returns:
        the averaged :class:`FitResult` (the fit's triangles, sources and dense model).
    """
    flip_x = np.diag([-1.0, 1.0, 1.0])
    lms_b = mirror_landmarks(mirrored.landmarks, width)
    verts_b = np.asarray(mirrored.verts, np.float64)[vertex_order]
    verts_b[:, 0] = (width - 1) - verts_b[:, 0]
    dz = float(np.mean(np.asarray(fit.landmarks, np.float64)[:, 2] - lms_b[:, 2]))
    lms_b[:, 2] += dz
    verts_b[:, 2] += dz
    u, _s, vt = np.linalg.svd(np.asarray(fit.R, np.float64) + flip_x @ np.asarray(mirrored.R, np.float64) @ flip_x)
    R = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
    return FitResult(
        verts=((np.asarray(fit.verts, np.float64) + verts_b) / 2.0).astype(np.asarray(fit.verts).dtype),
        tris=fit.tris,
        R=R,
        landmarks=(np.asarray(fit.landmarks, np.float64) + lms_b) / 2.0,
        bfm_source=fit.bfm_source,
        dense_model=fit.dense_model + "+flip_mean",
    )


class TDDFAFitter:
    """3DDFA_V2 on the crop, ROI from the crop's landmarks (``fitter=tddfa``).

    Args:
        arch: "mb05" or "mb1".
        device: torch device.
        bfm_source: "auto" (``bfm_noneck_v3.pkl`` when present, else the offline stand-in).
        smooth_standin: spread the stand-in's landmark displacements
            (:func:`vrn.face_models.bfm.dense_model_shape`).
        iterations: 3DDFA_V2 passes; each pass after the first takes its ROI from the
            previous pass's landmarks.
        flip: also fit the mirrored crop and average the two fits (:func:`mirror_average`):
            the port's landmarks on AFLW2000-3D's crops come 3.77 -> 3.62 % 2D NME closer to
            the ground truth that way (scripts/port_flip_landmarks.py); twice the port's time.
    """

    name = "tddfa"

    def __init__(
        self,
        arch: str = "mb05",
        device: str = "cpu",
        bfm_source: str = "auto",
        smooth_standin: bool = True,
        iterations: int = 1,
        flip: bool = False,
    ) -> None:
        self.arch, self.device, self.bfm_source = arch, device, bfm_source
        self.smooth_standin = bool(smooth_standin)
        self.iterations = max(1, int(iterations))
        self.flip = bool(flip)
        self._tddfa = None

    def params(self) -> dict[str, Any]:
        p = {
            "name": self.name,
            "arch": self.arch,
            "bfm_source": self.bfm_source,
            "smooth_standin": self.smooth_standin,
            "iterations": self.iterations,
        }
        return {**p, "flip": True} if self.flip else p  # unchanged records for the default

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tddfa": None}

    def setup(self) -> None:
        if self._tddfa is None:
            self._tddfa = load_tddfa(arch=self.arch, device=self.device, bfm_source=self.bfm_source)

    def fit(
        self, crop_rgb: np.ndarray, landmarks_crop: np.ndarray, sample: dict[str, Any], ctx: ItemContext
    ) -> FitResult:
        self.setup()
        lm = np.asarray(landmarks_crop, np.float64)[:, :2]
        fit = self._fit_once(crop_rgb, lm)
        if not self.flip:
            return fit
        width = crop_rgb.shape[1]
        other = self._fit_once(np.ascontiguousarray(crop_rgb[:, ::-1]), mirror_landmarks(lm, width))
        return mirror_average(fit, other, width, mirror_vertex_order(self._tddfa.bfm))

    def _fit_once(self, crop_rgb: np.ndarray, landmarks_xy: np.ndarray) -> FitResult:
        """The port on the crop (ROI from ``landmarks_xy`` (68, 2) crop px) -> the stand-in fit."""
        pts = np.asarray(landmarks_xy, np.float64).T
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
        return FitResult(
            verts=both[:V],
            tris=np.asarray(bfm.tri, np.int32),
            R=rotation_to_crop_frame(res.R),
            landmarks=both[V:],
            bfm_source=bfm.source,
            dense_model=how,
        )


class SFMFitter(TDDFAFitter):
    """3DDFA_V2 landmarks + a Surrey Face Model fit (``fitter=sfm``).

    The port runs exactly as in :class:`TDDFAFitter` (same ROI policy and passes; its
    landmarks in crop px come from ``TDDFAFitter.fit``); the SFM (3448 vertices, 63 identity
    components, 6 expression blendshapes) is then fitted to those 68 3D landmarks
    (:func:`vrn.face_models.sfm_fit.fit_sfm_to_landmarks`: similarity + regularised least
    squares, the jaw contour to the SFM's model contour). The mesh is the fitted SFM in crop
    px, ``R`` the fit's head rotation, ``landmarks`` the port's.

    Args:
        arch, device, bfm_source, iterations: the port, as :class:`TDDFAFitter`.
        flip: the port also runs on the mirrored crop and the SFM is fitted to the two landmark
            sets' average (:func:`mirror_average`, as ``fitter=tddfa flip=true`` makes its
            targets); twice the port's time, the SFM fit once.
        lambda_shape, lambda_expression, expression_max, fit_iterations, contour:
            :func:`fit_sfm_to_landmarks` (``fit_iterations`` = its ``iterations``).
        max_residual: crop px; a fit whose mean landmark residual exceeds it fails with
            ``fit_failed`` (the port's landmarks are not a face the SFM can take).
    """

    name = "sfm"

    def __init__(
        self,
        arch: str = "mb05",
        device: str = "cpu",
        bfm_source: str = "auto",
        iterations: int = 1,
        lambda_shape: float = DEFAULT_LAMBDA_SHAPE,
        lambda_expression: float = DEFAULT_LAMBDA_EXPRESSION,
        expression_max: float = 1.0,
        fit_iterations: int = 5,
        contour: bool = True,
        max_residual: float = 10.0,
        flip: bool = False,
    ) -> None:
        # smooth_standin=False: the port's dense mesh is discarded, only its landmarks are used
        super().__init__(
            arch=arch, device=device, bfm_source=bfm_source, smooth_standin=False, iterations=iterations, flip=flip
        )
        self.lambda_shape, self.lambda_expression = float(lambda_shape), float(lambda_expression)
        self.expression_max = float(expression_max)
        self.fit_iterations = max(1, int(fit_iterations))
        self.contour = bool(contour)
        self.max_residual = float(max_residual)
        self._sfm = None

    def params(self) -> dict[str, Any]:
        p = {k: v for k, v in super().params().items() if k != "smooth_standin"}
        return {
            **p,
            "name": self.name,
            "lambda_shape": self.lambda_shape,
            "lambda_expression": self.lambda_expression,
            "expression_max": self.expression_max,
            "fit_iterations": self.fit_iterations,
            "contour": self.contour,
            "max_residual": self.max_residual,
        }

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_sfm": None}

    def setup(self) -> None:
        super().setup()
        if self._sfm is None:
            self._sfm = load_sfm()

    def fit(
        self, crop_rgb: np.ndarray, landmarks_crop: np.ndarray, sample: dict[str, Any], ctx: ItemContext
    ) -> FitResult:
        port = super().fit(crop_rgb, landmarks_crop, sample, ctx)
        f = fit_sfm_to_landmarks(
            port.landmarks,
            self._sfm,
            lambda_shape=self.lambda_shape,
            lambda_expression=self.lambda_expression,
            expression_max=self.expression_max,
            iterations=self.fit_iterations,
            contour=self.contour,
        )
        if not f.residual <= self.max_residual:
            raise ItemFailure(
                "fit_failed",
                f"SFM fit to the 3DDFA_V2 landmarks left {f.residual:.1f} crop px (mean); "
                f"limit fitter.max_residual={self.max_residual}",
            )
        return FitResult(
            verts=f.verts,
            tris=f.tris,
            R=f.R,
            landmarks=port.landmarks,
            bfm_source="sfm_3448",
            dense_model="sfm_fit_to_tddfa_landmarks" + ("+flip_mean" if self.flip else ""),
        )


class MatFitter:
    """The 3DMM fit of the ``.mat`` beside each photo (``fitter=300wlp``).

    Args:
        bfm_path: full BFM for the dense mesh (see :func:`load_dense_bfm`); None = the
            registry (``bfm_noneck_v3.pkl`` when present, else the offline stand-in).
        smooth_standin: see :func:`vrn.face_models.bfm.dense_model_shape`.
        max_landmark_error: crop px; the fit's landmarks must lie within this mean distance
            of the crop's landmarks, else the sample fails with ``fit_mismatch`` (a crop of
            another face of the photo, or a wrong .mat).
    """

    name = "300wlp"

    def __init__(
        self, bfm_path: str | None = None, smooth_standin: bool = True, max_landmark_error: float = 12.0
    ) -> None:
        self.bfm_path = None if bfm_path in (None, "", "null") else str(bfm_path)
        self.smooth_standin = bool(smooth_standin)
        self.max_landmark_error = float(max_landmark_error)
        self._bfm = None

    def params(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bfm_path": self.bfm_path,
            "smooth_standin": self.smooth_standin,
            "max_landmark_error": self.max_landmark_error,
        }

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bfm": None}

    def setup(self) -> None:
        if self._bfm is None:
            self._bfm = load_dense_bfm(self.bfm_path)

    def fit(
        self, crop_rgb: np.ndarray, landmarks_crop: np.ndarray, sample: dict[str, Any], ctx: ItemContext
    ) -> FitResult:
        self.setup()
        src = ctx.path(sample["files"]["source_image"])
        try:
            mat = load_mat_fit(mat_path_for(src))
        except MatFitError as e:
            raise ItemFailure(e.reason, str(e)) from e
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
            raise ItemFailure(
                "fit_mismatch",
                f"the .mat fit's landmarks lie {err:.1f} crop px (mean) from the "
                f"crop's; limit fitter.max_landmark_error={self.max_landmark_error}",
            )
        p = np.asarray(pose, np.float64).ravel()
        R = rotation_to_crop_frame(angles_to_matrix_3ddfa(p[0], p[1], p[2]))
        return FitResult(
            verts=verts, tris=np.asarray(bfm.tri, np.int32), R=R, landmarks=lm, bfm_source=bfm.source, dense_model=how
        )


# --------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------


class FitStage(Stage):
    """The fit stage (module doc).

    Args:
        fitter: :class:`TDDFAFitter`, :class:`SFMFitter` or :class:`MatFitter` (``fitter=`` in the config).
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
        # the fitter's key stays "source" (the recorded stage.json format): renaming it would make
        # every existing fit folder refuse a resume with StageConfigError
        return {"source": self.fitter.params(), "depth_bins": self.depth_bins, "depth_factor": self.depth_factor}

    def setup(self) -> None:
        self.fitter.setup()

    def process(self, item: Item, ctx: ItemContext) -> list[dict[str, Any]]:
        s = dict(item.data)
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
        shift = solid_depth_shift(
            verts, np.asarray(r.tris, np.int32), R, depth_bins=self.depth_bins, depth_factor=self.depth_factor
        )
        verts[:, 2] += shift
        lms[:, 2] += shift
        lm_err = float(np.linalg.norm(lms[:, :2] - lm_crop[:, :2], axis=1).mean())
        mesh = ctx.write_npz(
            f"items/{item.id}.npz",
            verts=verts.astype(np.float32),
            R=R.astype(np.float32),
            landmarks=lms.astype(np.float32),
            bfm_source=np.array(r.bfm_source),
        )
        topology = ctx.write_shared(*topology_file(r.tris))
        zmin, zmax = float(verts[:, 2].min()), float(verts[:, 2].max())
        return [
            {
                **s,
                "fit_source": self.fitter.name,
                "bfm_source": r.bfm_source,
                "dense_model": r.dense_model,
                "rotation": np.round(R, 6).tolist(),
                "fit_landmark_error": round(lm_err, 4),
                "depth_range": [round(zmin, 4), round(zmax, 4)],
                "files": {**s["files"], "mesh": mesh, "topology": topology},
            }
        ]


@hydra.main(version_base="1.3", config_path="../conf/pipeline", config_name="fit")
def main(cfg: DictConfig) -> None:
    run_single_stage(cfg, "fit")


if __name__ == "__main__":
    main()

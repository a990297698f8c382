"""Mean-face templates for head-pose fitting: points, outward normals and 68 landmarks.

A template is a model's mean face, frontal, in crop-frame axes (x right, y down, z toward
the camera; model units, centred on its landmarks): the model frame (y up) with y flipped,
so that ``posed = s R frontal + t`` with ``R`` a crop-frame rotation whose Euler angles are
the ``Pose_Para`` angles of the model (:mod:`vrn.geometry.head_pose`).

* ``"bfm"`` (default): the 3DDFA_V2 BFM mean face (38,365 vertices; exact in the offline
  stand-in too), its 68 landmark vertices: the frame of AFLW2000-3D's ``Pose_Para`` and of the
  3DDFA_V2 port's pose.
* ``"sfm"``: the Surrey Face Model mean (3,448 vertices), the frame of the synthetic
  generator's ``rotation`` (:mod:`vrn.data.synthetic`); its 18 unmapped landmarks (jaw
  contour, inner mouth corners) are NaN.

``points`` keep the part of the face above the base of the nose (iBUG 34), which moves little
with expression (an open mouth or a smile biased the pitch by ~4 degrees when the whole face
was fitted), every ``stride``-th vertex: ~2,300 BFM points, ~2,150 SFM points.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from vrn.face_models.bfm import load_bfm
from vrn.face_models.sfm import load_sfm
from vrn.geometry.normals import vertex_normals

__all__ = ["FaceTemplate", "load_template", "TEMPLATES"]

TEMPLATES = ("bfm", "sfm")
_F = np.array([1.0, -1.0, 1.0])
#: iBUG landmark 34 (0-based 33), the base of the nose: template points below it are left out
NOSE_BASE = 33


@dataclass(frozen=True, eq=False)
class FaceTemplate:
    """A frontal mean face (module doc).

    Attributes:
        name: "bfm" or "sfm".
        points: (N, 3) float64 surface points (a subsample of the mesh vertices).
        normals: (N, 3) float64 unit outward normals (toward +z on the front of the face).
        landmarks: (68, 3) float64 iBUG-68 landmark vertices, NaN rows where the model has none.
    """

    name: str
    points: np.ndarray
    normals: np.ndarray
    landmarks: np.ndarray


def _make(name: str, verts: np.ndarray, tris: np.ndarray, lm_ids: np.ndarray, stride: int) -> FaceTemplate:
    v = np.asarray(verts, np.float64) * _F
    n = vertex_normals(v, tris).astype(np.float64)
    if n[np.argmax(v[:, 2]), 2] < 0:  # the nose tip must face the camera (+z)
        n = -n
    ok = lm_ids >= 0
    lms = np.full((68, 3), np.nan)
    lms[ok] = v[lm_ids[ok]]
    c = np.nanmean(lms, axis=0)
    used = np.zeros(len(v), bool)
    used[np.asarray(tris).ravel()] = True
    # the expression-rigid part: above the base of the nose (iBUG 34; the mouth and jaw move)
    used &= v[:, 1] <= lms[NOSE_BASE, 1]
    keep = np.flatnonzero(used)[:: max(1, int(stride))]
    return FaceTemplate(name, v[keep] - c, n[keep], lms - c)


@lru_cache(maxsize=4)
def load_template(name: str = "bfm", stride: int = 0) -> FaceTemplate:
    """The template ``name`` (cached).

    Args:
        name: "bfm" or "sfm" (module doc).
        stride: keep every ``stride``-th vertex; 0 = the default (10 for the BFM, 1 for the SFM).
    Raises:
        ValueError: unknown name.
        vrn.assets.AssetNotFoundError: the model files cannot be resolved.
    """
    if name == "bfm":
        bfm = load_bfm("auto")  # bfm_noneck_v3.pkl or its offline stand-in: the same mean face and landmarks
        return _make(name, bfm.u.reshape(-1, 3), bfm.tri, bfm.landmark_vertices, stride or 10)
    if name == "sfm":
        m = load_sfm()
        ids = np.array([m.landmarks.get(i, -1) for i in range(1, 69)])
        return _make(name, m.mean, m.tris, ids, stride or 1)
    raise ValueError(f"unknown face template {name!r}; expected one of {list(TEMPLATES)}")

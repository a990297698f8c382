"""Basel Face Model (no-neck, 38,365 vertices) as used by 3DDFA_V2.

The model is a linear 3DMM over vertex coordinates interleaved ``x0, y0, z0, x1, ...``:

    S = u + w_shp @ alpha_shp + w_exp @ alpha_exp        (3V,)  ->  (3, V)

with 40 shape and 10 expression components (3DDFA_V2's truncation). ``keypoints``
(204,) are the flat row indices of the 68 landmarks (3 rows per landmark), so the
68-point basis is the dense basis restricted to those rows.

The loaders take file paths, one loader per file kind (each file is read in exactly
one function):

* :func:`load_bfm_pkl`: upstream ``configs/bfm_noneck_v3.pkl`` (dense bases), with the
  triangles from ``configs/tri.pkl`` (:func:`load_tri`) as upstream does;
  ``source = "bfm_noneck_v3"``;
* :func:`load_bfm_offline_npz`: ``bfm_noneck_v3_offline.npz``, same keys and layout,
  built from the other upstream files: the exact dense mean face, the exact bases on
  the 204 landmark rows and zero bases elsewhere. Landmarks are exact; the dense mesh is
  the posed mean face away from the landmarks. ``source = "offline_standin"``;
* :func:`load_landmark_basis_v1`: 3DDFA v1's exact 68-landmark text basis.

Which file a model came from is in :attr:`BFMModel.source`. Choosing between the files
(e.g. "the dense file when present, else the stand-in") is the caller's business; the
vrn project's adapter is ``vrn.face_models.bfm.load_bfm``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BFMModel",
    "load_bfm_offline_npz",
    "load_bfm_pkl",
    "load_landmark_basis_v1",
    "load_tri",
]

PathLike = str | os.PathLike


@dataclass(frozen=True, eq=False)
class BFMModel:
    """A 3DMM with dense and 68-landmark bases (all float32, interleaved xyz rows)."""

    u: np.ndarray  # (3V, 1)
    w_shp: np.ndarray  # (3V, n_shp)
    w_exp: np.ndarray  # (3V, n_exp)
    tri: np.ndarray  # (F, 3) int32, 0-based vertex ids
    keypoints: np.ndarray  # (204,) int64 rows of the 68 landmarks
    source: str  # file kind: "bfm_noneck_v3", "offline_standin" (or a caller's label)
    u_base: np.ndarray = field(init=False)  # (204, 1)
    w_shp_base: np.ndarray = field(init=False)  # (204, n_shp)
    w_exp_base: np.ndarray = field(init=False)  # (204, n_exp)

    def __post_init__(self) -> None:
        kp = self.keypoints
        object.__setattr__(self, "u_base", np.ascontiguousarray(self.u[kp].reshape(-1, 1)))
        object.__setattr__(self, "w_shp_base", np.ascontiguousarray(self.w_shp[kp]))
        object.__setattr__(self, "w_exp_base", np.ascontiguousarray(self.w_exp[kp]))

    @property
    def n_vertices(self) -> int:
        return self.u.shape[0] // 3

    @property
    def landmark_vertices(self) -> np.ndarray:
        """(68,) vertex ids of the 68 landmarks in the dense mesh."""
        return (self.keypoints[0::3] // 3).astype(np.int64)

    def shape(self, alpha_shp: np.ndarray, alpha_exp: np.ndarray, dense: bool = True) -> np.ndarray:
        """Model-space vertices (3, V) (or (3, 68) when ``dense=False``), float32."""
        a_s = np.asarray(alpha_shp, dtype=np.float32).reshape(-1, 1)
        a_e = np.asarray(alpha_exp, dtype=np.float32).reshape(-1, 1)
        if dense:
            flat = self.u + self.w_shp @ a_s + self.w_exp @ a_e
        else:
            flat = self.u_base + self.w_shp_base @ a_s + self.w_exp_base @ a_e
        # interleaved xyz -> (3, V); same as upstream's reshape(3, -1, order="F")
        return flat.reshape(-1, 3).T


def _load_pickle(path: PathLike) -> object:
    with open(path, "rb") as f:
        return pickle.load(f)


def _as_faces(tri: np.ndarray) -> np.ndarray:
    """Triangles as (F, 3) int32 (upstream files store them as (3, F))."""
    t = np.asarray(tri)
    if t.shape[0] == 3 and t.shape[1] != 3:
        t = t.T
    return np.ascontiguousarray(t, dtype=np.int32)


def _bfm_from_arrays(
    data: Mapping[str, np.ndarray], tri: np.ndarray, source: str, shape_dim: int | None, exp_dim: int | None
) -> BFMModel:
    """A :class:`BFMModel` from the upstream keys ``u``, ``w_shp``, ``w_exp``, ``keypoints``.

    ``shape_dim`` / ``exp_dim``: components kept (None = all in the file).
    """
    return BFMModel(
        u=np.asarray(data["u"], dtype=np.float32).reshape(-1, 1),
        w_shp=np.ascontiguousarray(np.asarray(data["w_shp"], dtype=np.float32)[:, :shape_dim]),
        w_exp=np.ascontiguousarray(np.asarray(data["w_exp"], dtype=np.float32)[:, :exp_dim]),
        tri=_as_faces(tri),
        keypoints=np.asarray(data["keypoints"], dtype=np.int64).ravel(),
        source=source,
    )


def load_tri(tri_path: PathLike) -> np.ndarray:
    """Triangles (F, 3) int32, 0-based, from upstream's ``configs/tri.pkl`` ((3, 76073) there).

    Upstream rebuilt the triangles for the v3 no-neck mesh and ships them separately
    from ``bfm_noneck_v3.pkl``.
    """
    return _as_faces(np.asarray(_load_pickle(tri_path)))


def load_bfm_pkl(
    pkl_path: PathLike, tri_path: PathLike, shape_dim: int | None = None, exp_dim: int | None = None
) -> BFMModel:
    """The dense BFM from upstream's ``bfm_noneck_v3.pkl`` and its ``tri.pkl``.

    Args:
        pkl_path: dict with ``u`` (3V, 1), ``w_shp`` (3V, 40), ``w_exp`` (3V, 10),
            ``keypoints`` (204,); rows interleaved xyz.
        tri_path: ``tri.pkl`` (see :func:`load_tri`).
        shape_dim, exp_dim: shape / expression components kept (None = all in the file).

    Returns a model with ``source == "bfm_noneck_v3"``.
    """
    data = _load_pickle(pkl_path)
    if not isinstance(data, Mapping):
        raise TypeError(f"{pkl_path}: expected a dict with u, w_shp, w_exp, keypoints, got {type(data).__name__}")
    return _bfm_from_arrays(data, load_tri(tri_path), "bfm_noneck_v3", shape_dim, exp_dim)


def load_bfm_offline_npz(npz_path: PathLike, shape_dim: int | None = None, exp_dim: int | None = None) -> BFMModel:
    """The offline stand-in ``bfm_noneck_v3_offline.npz`` (same keys as the .pkl, plus
    ``tri`` (3, F)); returns a model with ``source == "offline_standin"``.

    ``shape_dim`` / ``exp_dim``: components kept (None = all in the file).
    """
    with np.load(npz_path) as z:
        data = {k: z[k] for k in z.files}
    return _bfm_from_arrays(data, data["tri"], "offline_standin", shape_dim, exp_dim)


def load_landmark_basis_v1(
    u_base_path: PathLike, w_shp_path: PathLike, w_exp_path: PathLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact 68-landmark basis shipped with 3DDFA v1's C++ demo.

    Args:
        u_base_path, w_shp_path, w_exp_path: 3DDFA v1's ``c++/weights/u_base.txt``,
            ``w_shp_base.txt``, ``w_exp_base.txt``.

    Returns ``u_base`` (204, 1), ``w_shp_base`` (204, 40), ``w_exp_base`` (204, 10)
    float32, rows interleaved xyz per landmark. These are the same numbers as the dense
    model's keypoint rows (to the 6 printed decimals), independent of which dense
    source is available.
    """
    u = np.loadtxt(u_base_path, dtype=np.float32).reshape(-1, 1)
    ws = np.loadtxt(w_shp_path, dtype=np.float32).reshape(u.shape[0], -1)
    we = np.loadtxt(w_exp_path, dtype=np.float32).reshape(u.shape[0], -1)
    return u, ws, we

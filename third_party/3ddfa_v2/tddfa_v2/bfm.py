"""Basel Face Model (no-neck, 38,365 vertices) as used by 3DDFA_V2.

The model is a linear 3DMM over vertex coordinates interleaved ``x0, y0, z0, x1, ...``:

    S = u + w_shp @ alpha_shp + w_exp @ alpha_exp        (3V,)  ->  (3, V)

with 40 shape and 10 expression components (3DDFA_V2's truncation). ``keypoints``
(204,) are the flat row indices of the 68 landmarks (3 rows per landmark), so the
68-point basis is the dense basis restricted to those rows.

Sources, in order of preference (``source="auto"``):

* ``"bfm_noneck_v3"``: upstream ``configs/bfm_noneck_v3.pkl`` (dense bases), with the
  triangles from ``configs/tri.pkl`` as upstream does;
* ``"offline_standin"``: ``bfm_noneck_v3_offline.npz``, same keys and layout, built from
  the other upstream files: the exact dense mean face, the exact bases on the 204
  landmark rows and zero bases elsewhere. Landmarks are exact; the dense mesh is the
  posed mean face away from the landmarks.

Which one a model came from is in :attr:`BFMModel.source`.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "BFMModel",
    "BFM_SOURCES",
    "load_bfm",
    "load_landmark_basis_v1",
    "default_bfm_source",
]

#: registry asset behind each source name
BFM_SOURCES: dict[str, str] = {
    "bfm_noneck_v3": "3ddfa_v2/bfm_noneck_v3.pkl",
    "offline_standin": "3ddfa_v2/bfm_noneck_v3_offline.npz",
}


@dataclass(frozen=True, eq=False)
class BFMModel:
    """A 3DMM with dense and 68-landmark bases (all float32, interleaved xyz rows)."""

    u: np.ndarray  # (3V, 1)
    w_shp: np.ndarray  # (3V, n_shp)
    w_exp: np.ndarray  # (3V, n_exp)
    tri: np.ndarray  # (F, 3) int32, 0-based vertex ids
    keypoints: np.ndarray  # (204,) int64 rows of the 68 landmarks
    source: str  # "bfm_noneck_v3" or "offline_standin"
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

    def shape(
        self, alpha_shp: np.ndarray, alpha_exp: np.ndarray, dense: bool = True
    ) -> np.ndarray:
        """Model-space vertices (3, V) (or (3, 68) when ``dense=False``), float32."""
        a_s = np.asarray(alpha_shp, dtype=np.float32).reshape(-1, 1)
        a_e = np.asarray(alpha_exp, dtype=np.float32).reshape(-1, 1)
        if dense:
            flat = self.u + self.w_shp @ a_s + self.w_exp @ a_e
        else:
            flat = self.u_base + self.w_shp_base @ a_s + self.w_exp_base @ a_e
        # interleaved xyz -> (3, V); same as upstream's reshape(3, -1, order="F")
        return flat.reshape(-1, 3).T


def _load_pickle(path: Path) -> object:
    with open(path, "rb") as f:
        return pickle.load(f)


def default_bfm_source() -> str:
    """``"bfm_noneck_v3"`` when its file resolves locally (no download), else the stand-in."""
    from vrn.assets import available

    return "bfm_noneck_v3" if available(BFM_SOURCES["bfm_noneck_v3"]) else "offline_standin"


@lru_cache(maxsize=4)
def load_bfm(source: str = "auto", shape_dim: int = 40, exp_dim: int = 10) -> BFMModel:
    """Load the BFM from the asset registry.

    Args:
        source: ``"auto"`` (dense file when available locally, else the offline
            stand-in), ``"bfm_noneck_v3"`` or ``"offline_standin"``.
        shape_dim, exp_dim: number of shape / expression components kept.

    Raises:
        vrn.assets.AssetNotFoundError: the chosen file cannot be resolved.
    """
    from vrn.assets import resolve

    if source == "auto":
        source = default_bfm_source()
    if source not in BFM_SOURCES:
        raise ValueError(
            f"unknown BFM source {source!r}; expected 'auto' or one of {sorted(BFM_SOURCES)}"
        )
    path = resolve(BFM_SOURCES[source])
    if source == "bfm_noneck_v3":
        data = _load_pickle(path)
        assert isinstance(data, dict)
        # upstream rebuilt the triangles for the v3 no-neck mesh and ships them separately
        tri = np.asarray(_load_pickle(resolve("3ddfa_v2/tri.pkl")))
    else:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        tri = np.asarray(data["tri"])
    u = np.asarray(data["u"], dtype=np.float32).reshape(-1, 1)
    w_shp = np.ascontiguousarray(np.asarray(data["w_shp"], dtype=np.float32)[:, :shape_dim])
    w_exp = np.ascontiguousarray(np.asarray(data["w_exp"], dtype=np.float32)[:, :exp_dim])
    if tri.shape[0] == 3 and tri.shape[1] != 3:
        tri = tri.T
    return BFMModel(
        u=u,
        w_shp=w_shp,
        w_exp=w_exp,
        tri=np.ascontiguousarray(tri, dtype=np.int32),
        keypoints=np.asarray(data["keypoints"], dtype=np.int64).ravel(),
        source=source,
    )


def load_landmark_basis_v1() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact 68-landmark basis shipped with 3DDFA v1's C++ demo.

    Returns ``u_base`` (204, 1), ``w_shp_base`` (204, 40), ``w_exp_base`` (204, 10)
    float32, rows interleaved xyz per landmark. These are the same numbers as the dense
    model's keypoint rows (to the 6 printed decimals), independent of which dense
    source is available.
    """
    from vrn.assets import resolve

    u = np.loadtxt(resolve("3ddfa_v1/u_base.txt"), dtype=np.float32).reshape(-1, 1)
    ws = np.loadtxt(resolve("3ddfa_v1/w_shp_base.txt"), dtype=np.float32).reshape(u.shape[0], -1)
    we = np.loadtxt(resolve("3ddfa_v1/w_exp_base.txt"), dtype=np.float32).reshape(u.shape[0], -1)
    return u, ws, we

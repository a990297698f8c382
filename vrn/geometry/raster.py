"""Orthographic z-buffer rasteriser and per-pixel depth crossings over pixel centres.

Frame: crop px (:mod:`vrn.conventions`): x right, y down, z toward the camera; pixel
(r, c) is sampled at its centre (x=c, y=r). Projection is orthographic along z.

Facing / orientation: a triangle (v0, v1, v2) has normal ``n = (v1 - v0) x (v2 - v0)``
computed component-wise in crop px; it *faces the camera* when ``n_z > 0``. Because the
crop frame (y down, z toward the camera) is left-handed, a triangle that faces the camera
is drawn clockwise on screen. A mesh converted from a right-handed y-up frame by flipping
y must also reverse its triangle winding to keep "outward" meaning outward under this
rule (neither function here depends on it: both windings are rasterised, no culling).

Fill rule: x, y are snapped to 1/256 px and tested in exact integer arithmetic with a
top-left style tie rule, so a pixel centre on an edge shared by two triangles is hit by
exactly one of them (no gaps, no double hits), vertices included. Triangles with zero
projected area (after snapping) cover nothing. |x|, |y| must stay below 2**20 px.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from vrn.geometry import _raster

__all__ = ["Raster", "rasterize", "depth_crossings", "boundary_edges", "MAX_ABS_COORD"]

MAX_ABS_COORD: float = float(_raster.MAX_ABS_COORD)


@dataclass
class Raster:
    """Result of :func:`rasterize` on an (H, W) grid of crop-px pixel centres.

    Attributes:
        depth: (H, W) float32, z (crop px) of the kept surface at the pixel centre;
            -inf where no triangle covers the pixel.
        tri_id: (H, W) int32, index into ``tris`` of the kept triangle; -1 where empty.
        bary: (H, W, 3) float32, barycentric weights of the kept triangle's vertices
            ``tris[tri_id, 0..2]`` at the pixel centre (sum to 1; zeros where empty).
    """

    depth: np.ndarray
    tri_id: np.ndarray
    bary: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool, pixels covered by some triangle."""
        return self.tri_id >= 0


def _prep(verts: np.ndarray, tris: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Shapes and dtypes; the kernels check values (finite, in range, valid indices)."""
    v = np.ascontiguousarray(verts, dtype=np.float32)
    t = np.ascontiguousarray(tris, dtype=np.int32)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"verts must be (V, 3), got {v.shape}")
    if t.ndim != 2 or t.shape[1] != 3:
        raise ValueError(f"tris must be (F, 3), got {t.shape}")
    if height <= 0 or width <= 0:
        raise ValueError(f"grid must be non-empty, got {height}x{width}")
    return v, t


def rasterize(
    verts: np.ndarray, tris: np.ndarray, height: int, width: int, keep: Literal["front", "back"] = "front"
) -> Raster:
    """Z-buffer a triangle mesh over the pixel centres of an (height, width) grid.

    Args:
        verts: (V, 3) float32, crop px (x, y, z).
        tris: (F, 3) int32 vertex indices. Both windings are drawn (no culling).
        height, width: grid size in pixels; pixel (r, c) is sampled at (x=c, y=r).
        keep: "front" keeps the max z per pixel (nearest the camera), "back" the min z.
            Equal z: the first triangle in ``tris`` order wins.

    Returns:
        :class:`Raster` with depth (H, W) float32, tri_id (H, W) int32, bary (H, W, 3) float32.
    """
    if keep not in ("front", "back"):
        raise ValueError(f"keep must be 'front' or 'back', got {keep!r}")
    v, t = _prep(verts, tris, height, width)
    depth, tri_id, bary = _raster.rasterize_kernel(v, t, int(height), int(width), keep == "front")
    return Raster(depth, tri_id, bary)


def depth_crossings(
    verts: np.ndarray, tris: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every crossing of a triangle with a pixel centre's depth ray, grouped by pixel.

    Args:
        verts: (V, 3) float32, crop px (x, y, z).
        tris: (F, 3) int32.
        height, width: grid size.

    Returns:
        offsets: (H*W + 1,) int64 CSR offsets by flat pixel index ``r * W + c``: pixel k's
            crossings are ``[offsets[k], offsets[k+1])``.
        z: (N,) float32, z (crop px) of each crossing; within a pixel sorted by decreasing
            z (front to back; ties keep triangle order).
        facing: (N,) int8, +1 where the triangle's normal z (crop px, see module doc) is
            positive (faces the camera), -1 otherwise.
    """
    v, t = _prep(verts, tris, height, width)
    return _raster.crossings_kernel(v, t, int(height), int(width))


def boundary_edges(tris: np.ndarray, n_verts: int | None = None) -> np.ndarray:
    """Edges used by exactly one triangle (the mesh's open boundary).

    Args:
        tris: (F, 3) int32.
        n_verts: number of vertices (default ``tris.max() + 1``).

    Returns:
        (E, 2) int32 directed edges (a, b): ``a -> b`` is the direction in which the single
        triangle using the edge traverses it (v0->v1, v1->v2 or v2->v0).
    """
    t = np.ascontiguousarray(tris, dtype=np.int32)
    if t.ndim != 2 or t.shape[1] != 3:
        raise ValueError(f"tris must be (F, 3), got {t.shape}")
    if len(t) == 0:
        return np.zeros((0, 2), dtype=np.int32)
    v = int(t.max()) + 1 if n_verts is None else int(n_verts)
    return _raster.boundary_edges_kernel(t, v)

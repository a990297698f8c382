"""Volume -> triangle mesh (marching cubes) and mesh export.

Frames (:mod:`vrn.conventions`): volume index ``[d, r, c]``; a mesh vertex at index-space
position (d, r, c) maps to crop px ``x = c, y = r, z = (d + 0.5) / depth_factor``.

Orientation: faces are wound so that ``n = (v1 - v0) x (v2 - v0)``, computed
component-wise in crop px, points out of the solid -- toward +z (the camera) on the front
surface, the same rule as ``facing`` in :mod:`vrn.geometry.raster`; trimesh then reports a
positive volume.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vrn.atomic_write import atomic_write
from vrn.conventions import DEPTH_FACTOR

__all__ = ["volume_to_mesh", "export_mesh", "MESH_FORMATS"]

MESH_FORMATS = (".obj", ".ply", ".glb")


def volume_to_mesh(
    prob: np.ndarray, level: float = 0.5, depth_factor: float = DEPTH_FACTOR
) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface of an occupancy / probability volume (skimage marching cubes).

    The volume is padded by one voxel of "empty" on every side first, so the surface is
    closed where the solid touches the volume's border.

    Args:
        prob: (D, H, W) float (or bool) array, index ``[d, r, c]``; inside where > level.
        level: iso level.
        depth_factor: bins per crop px along z.

    Returns:
        verts: (V, 3) float32 crop px (x, y, z).
        faces: (F, 3) int32, oriented outward (see module doc).
        Both empty ((0, 3)) when the volume has no crossing of ``level``.
    """
    from skimage.measure import marching_cubes

    p = np.asarray(prob)
    if p.ndim != 3:
        raise ValueError(f"prob must be (D, H, W), got {p.shape}")
    p = p.astype(np.float32, copy=False)
    above = p > level
    if not above.any():
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)
    # crop to the voxels above the level plus one voxel of real data around them (the
    # surface cannot leave that box), then pad by one "empty" voxel so it closes
    lo = np.zeros(3, int)
    hi = np.zeros(3, int)
    for ax in range(3):
        idx = np.flatnonzero(above.any(axis=tuple(a for a in range(3) if a != ax)))
        lo[ax], hi[ax] = max(idx[0] - 1, 0), min(idx[-1] + 2, p.shape[ax])
    box = p[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    pad_value = 0.0 if level > 0 else level - 1.0
    q = np.pad(box, 1, mode="constant", constant_values=pad_value)
    v, f, _n, _val = marching_cubes(q, level=level, gradient_direction="descent", allow_degenerate=False)
    v = v - 1.0 + lo  # undo the padding and the crop: index space (d, r, c) of the full volume
    verts = np.empty_like(v, dtype=np.float32)
    verts[:, 0] = v[:, 2]
    verts[:, 1] = v[:, 1]
    verts[:, 2] = (v[:, 0] + 0.5) / depth_factor
    # skimage's faces, carried through the (d, r, c) -> (x, y, z) axis swap (a reflection),
    # come out wound outward in crop px as they are (checked in tests/test_mesh.py).
    faces = np.ascontiguousarray(f, dtype=np.int32)
    return verts, faces


def _colors_uint8(vertex_colors: np.ndarray, n: int) -> np.ndarray:
    c = np.asarray(vertex_colors)
    if c.ndim != 2 or c.shape[0] != n or c.shape[1] not in (3, 4):
        raise ValueError(f"vertex_colors must be ({n}, 3) or ({n}, 4), got {c.shape}")
    if c.dtype != np.uint8:
        if np.issubdtype(c.dtype, np.floating):
            c = np.clip(np.rint(c * 255.0), 0, 255)
        c = c.astype(np.uint8)
    if c.shape[1] == 3:
        c = np.concatenate([c, np.full((n, 1), 255, np.uint8)], axis=1)
    return c


def export_mesh(
    path: str | os.PathLike, verts: np.ndarray, faces: np.ndarray, vertex_colors: np.ndarray | None = None
) -> Path:
    """Write a mesh with trimesh, atomically (temporary file in the same folder, then rename).

    Args:
        path: destination; the suffix picks the format: .obj, .ply (binary, per-vertex
            red/green/blue(/alpha) uint8 properties) or .glb (COLOR_0 attribute).
        verts: (V, 3) float crop px (x, y, z) -- written as is, no axis flip.
        faces: (F, 3) int.
        vertex_colors: optional (V, 3) or (V, 4) RGB(A), uint8 or float in [0, 1].

    Returns:
        the written path.
    """
    import trimesh

    path = Path(path)
    ext = path.suffix.lower()
    if ext not in MESH_FORMATS:
        raise ValueError(f"unsupported mesh format {ext!r}; use one of {MESH_FORMATS}")
    v = np.asarray(verts, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    colors = None if vertex_colors is None else _colors_uint8(vertex_colors, len(v))
    mesh = trimesh.Trimesh(vertices=v, faces=f, vertex_colors=colors, process=False)
    data = mesh.export(file_type=ext[1:])
    if isinstance(data, str):
        data = data.encode("utf-8")
    atomic_write(path, data)
    return path

"""Vertex normals of a triangle mesh (shading in the renderer and the synthetic generator)."""

from __future__ import annotations

import numpy as np

__all__ = ["vertex_normals"]


def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (outward for an outward-wound mesh).

    Args:
        verts: (V, 3) float, any frame.
        faces: (F, 3) int vertex indices.
    Returns:
        (V, 3) float32; zero for vertices used by no face.
    """
    v = np.asarray(verts, np.float64)
    f = np.asarray(faces, np.int64)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])  # length = 2 * area
    n = np.zeros_like(v)
    for k in range(3):  # three corners x three coordinates, each vectorised over all faces
        for c in range(3):
            n[:, c] += np.bincount(f[:, k], weights=fn[:, c], minlength=len(v))
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return (n / np.where(norm > 0, norm, 1.0)).astype(np.float32)

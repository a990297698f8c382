"""Per-vertex confidence of a marching-cubes surface, from the occupancy probabilities around it.

Rule: the network is sure where its probabilities jump from 0 to 1 within a voxel and unsure
where they ramp slowly through the 0.5 level. The confidence of a surface vertex is the slope
of the probability across the surface there:

* ``g`` = the gradient, at the vertex, of the trilinear interpolation of the probabilities
  (the field whose ``threshold`` level marching cubes follows), in probability per voxel
  (index space ``(d, r, c)``: one step along any axis is one voxel). It reads the 8 voxels
  of the grid cell that holds the vertex (the cell at ``floor`` of its position).
* ``confidence = clip(1 + log10(|g|) / 2, 0, 1)``: the slope relative to a perfect step on
  a log scale, half a point per decade. A perfect step (0 on one voxel, 1 on the next)
  changes by 1 across the voxel and scores 1; a logistic ramp ``p = sigmoid(t / w)`` (``t``
  in voxels across the surface) changes by ``tanh(1 / (4 w))`` across the voxel at the 0.5
  level: slope 0.46 (``w = 0.5``) scores 0.83, slope 0.1 (``w = 2.5``, 10-90 % over ~11
  voxels) 0.5, slope 0.01 or less (or a flat volume) 0. The log scale keeps the colour map
  readable for a network with soft outputs (the project's pretrained model has slopes of
  about 0.02-0.25 on real faces, 0.15-0.7 in confidence) as well as for a sharp one.

Only the 8 voxels around each vertex are read (never a gradient of the whole volume), so it
costs a few ms beside marching cubes' ~100 ms on a (200, 192, 192) volume
(docs/video_and_confidence.md).
"""

from __future__ import annotations

import numpy as np

from vrn.conventions import DEPTH_FACTOR

__all__ = ["vertex_confidence", "confidence_colors"]

#: slopes below this score 0 (and keep log10 finite)
_MIN_SLOPE = 0.01

#: colour map stops (value, RGB): low confidence red, middle yellow, high green
_STOPS = np.array([0.0, 0.5, 1.0])
_STOP_RGB = np.array([[215, 48, 39], [254, 224, 80], [26, 152, 80]], np.float64)


def _bilerp(a: np.ndarray, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(V, 2, 2) corner values, (V,) positions in [0, 1] along their axes 1 and 2 -> (V,) bilinear value."""
    return (a[:, 0, 0] * (1 - t) + a[:, 0, 1] * t) * (1 - s) + (a[:, 1, 0] * (1 - t) + a[:, 1, 1] * t) * s


def vertex_confidence(prob: np.ndarray, verts_crop: np.ndarray, depth_factor: float = DEPTH_FACTOR) -> np.ndarray:
    """Confidence in [0, 1] of each surface vertex (module doc for the rule).

    Args:
        prob: (D, H, W) float occupancy probabilities, crop px, index ``[d, r, c]``.
        verts_crop: (V, 3) float vertices in crop px (x, y, z), as
            :func:`vrn.volume.mesh.volume_to_mesh` returns them (``d = z * depth_factor - 0.5``,
            ``r = y``, ``c = x``).
        depth_factor: depth bins per crop px.
    Returns:
        (V,) float32 in [0, 1].
    """
    p = np.asarray(prob, dtype=np.float32)
    if p.ndim != 3 or min(p.shape) < 2:
        raise ValueError(f"prob must be (D, H, W) with every side >= 2, got {p.shape}")
    v = np.asarray(verts_crop, dtype=np.float32).reshape(-1, 3)
    if len(v) == 0:
        return np.zeros(0, np.float32)
    shape = np.array(p.shape)
    # index-space position (d, r, c) of each vertex, clamped into the volume
    pos = np.stack([v[:, 2] * np.float32(depth_factor) - np.float32(0.5), v[:, 1], v[:, 0]], axis=1)
    pos = np.clip(pos, 0.0, (shape - 1).astype(np.float32))
    base = np.minimum(np.floor(pos).astype(np.int64), shape - 2)  # the cell: voxels base .. base + 1
    t = pos - base.astype(np.float32)  # (V, 3) float32 position inside the cell, [0, 1]
    strides = np.array([p.shape[1] * p.shape[2], p.shape[2], 1], np.int64)
    lin = base[:, 0] * strides[0] + base[:, 1] * strides[1] + base[:, 2]  # (no int matmul: it has no BLAS path)
    offs = (np.array(list(np.ndindex(2, 2, 2)), np.int64) * strides).sum(axis=1)  # (8,) corners, (d, r, c) order
    vals = p.reshape(-1)[lin[:, None] + offs].reshape(-1, 2, 2, 2)  # (V, d, r, c) corner values
    td, tr, tc = t[:, 0], t[:, 1], t[:, 2]
    # each gradient component: the change across the cell along its axis, bilinear in the other two
    g = np.stack(
        [
            _bilerp(vals[:, 1] - vals[:, 0], tr, tc),
            _bilerp(vals[:, :, 1] - vals[:, :, 0], td, tc),
            _bilerp(vals[:, :, :, 1] - vals[:, :, :, 0], td, tr),
        ],
        axis=1,
    )
    slope = np.maximum(np.linalg.norm(g, axis=1), _MIN_SLOPE)
    return np.clip(1.0 + np.log10(slope) / 2.0, 0.0, 1.0).astype(np.float32)


def confidence_colors(confidence: np.ndarray) -> np.ndarray:
    """Colour map for display: 0 red, 0.5 yellow, 1 green (linear between the stops).

    Args:
        confidence: (V,) float in [0, 1] (clipped).
    Returns:
        (V, 3) uint8 RGB.
    """
    c = np.clip(np.asarray(confidence, np.float64).reshape(-1), 0.0, 1.0)
    rgb = np.stack([np.interp(c, _STOPS, _STOP_RGB[:, k]) for k in range(3)], axis=1)
    return np.rint(rgb).astype(np.uint8)

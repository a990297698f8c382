"""Evaluation math: surface NME (VRN paper protocol), landmark NME (3DDFA / PRNet
protocol), ICP, surface depth look-up and yaw-bucket summaries.

Frames: every point set here is in one metric frame shared by prediction and ground truth,
usually image px (x right, y down, z toward the camera, :mod:`vrn.conventions`). Depth has
no absolute origin in an orthographic reconstruction, so wherever predicted and true z are
compared, a single z shift (the least-squares one) is removed first.

Surface NME (Jackson et al., ICCV 2017, Sec. 5): the mean Euclidean distance between each
ground-truth vertex and its corresponding point of the predicted surface, divided by the 3D
outer interocular distance (iBUG landmarks 37 and 46, 1-based). The meshes have different
vertices, so correspondences come from ICP:

* ``nme_icp`` (the paper's protocol): ICP (rigid, point-to-point; ground truth moved onto
  the prediction) only *establishes* the correspondences: each ground-truth vertex is paired
  with the predicted vertex nearest to it after alignment; the distance is then measured
  between the *unaligned* pair (apart from the z shift above).
* ``nme_rigid``: the same pairs, distance measured after the full rigid alignment (always
  <= the above; the paper notes the ranking of methods does not change).

The predicted surface is represented by its vertices (nearest-vertex distance; marching-cubes
vertices are at most ~0.7 voxel apart, which bounds the gap to a point-to-triangle distance).

Landmark NME (3DDFA / PRNet on AFLW2000-3D): the mean distance over the 68 landmarks divided
by ``sqrt(w * h)`` of the ground-truth 2D landmark box. ``nme_lmk_2d`` uses (x, y);
``nme_lmk_3d`` adds z, each predicted landmark's z read from the predicted surface at its
(x, y) (:func:`surface_depth_at`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from vrn.geometry.raster import rasterize

__all__ = [
    "interocular_distance",
    "landmark_box_size",
    "rigid_transform",
    "IcpResult",
    "icp",
    "SurfaceNME",
    "surface_nme",
    "landmark_nme",
    "surface_depth_at",
    "yaw_bucket",
    "YAW_BUCKETS",
    "summarize",
    "rows_by_yaw_bucket",
    "markdown_table",
    "yaw_from_rotation",
]

#: iBUG 68 outer eye corners, 0-based (landmarks 37 and 46 1-based)
OUTER_EYE_CORNERS: tuple[int, int] = (36, 45)
#: |yaw| buckets in degrees, as 3DDFA's benchmark code splits AFLW2000-3D: [0, 30], (30, 60],
#: (60, 90] (> 90 goes to the last)
YAW_BUCKETS: tuple[tuple[float, float], ...] = ((0.0, 30.0), (30.0, 60.0), (60.0, 90.0))


# --------------------------------------------------------------------------------------
# normalisers
# --------------------------------------------------------------------------------------


def interocular_distance(landmarks: np.ndarray) -> float:
    """3D outer interocular distance.

    Args:
        landmarks: (68, 3) iBUG landmarks (x, y, z), any metric frame.
    Returns:
        ``||l[36] - l[45]||`` (0-based), NaN when either is not finite.
    """
    lm = np.asarray(landmarks, np.float64)
    if lm.shape != (68, 3):
        raise ValueError(f"landmarks must be (68, 3), got {lm.shape}")
    a, b = lm[OUTER_EYE_CORNERS[0]], lm[OUTER_EYE_CORNERS[1]]
    return float(np.linalg.norm(a - b)) if np.isfinite(a).all() and np.isfinite(b).all() else float("nan")


def landmark_box_size(landmarks: np.ndarray) -> float:
    """``sqrt(w * h)`` of the 2D box of the finite landmarks.

    Args:
        landmarks: (K, 2+) (x, y, ...); rows with a NaN in x or y are ignored.
    Returns:
        the box size, NaN when fewer than 2 finite landmarks.
    """
    p = np.asarray(landmarks, np.float64)[:, :2]
    p = p[np.isfinite(p).all(1)]
    if len(p) < 2:
        return float("nan")
    w, h = p.max(0) - p.min(0)
    return float(math.sqrt(max(w, 0.0) * max(h, 0.0)))


# --------------------------------------------------------------------------------------
# rigid alignment
# --------------------------------------------------------------------------------------


def rigid_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rotation and translation (Kabsch / Umeyama without scale).

    Args:
        src, dst: (N, 3) corresponding points.
    Returns:
        R (3, 3) float64 with det +1, t (3,) minimising ``sum ||R src_i + t - dst_i||^2``.
    """
    a = np.asarray(src, np.float64)
    b = np.asarray(dst, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"src and dst must be equal (N, 3), got {a.shape} and {b.shape}")
    ca, cb = a.mean(0), b.mean(0)
    H = (a - ca).T @ (b - cb)
    U, _, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(Vt.T @ U.T)) or 1.0
    R = Vt.T @ np.diag([1.0, 1.0, d]) @ U.T
    return R, cb - R @ ca


@dataclass
class IcpResult:
    """Output of :func:`icp`.

    Attributes:
        R: (3, 3) rotation and t: (3,) translation mapping source onto target (``R x + t``).
        indices: (N,) int, index in ``target`` of each source point's nearest neighbour
            after the final alignment.
        distances: (N,) float, those nearest distances.
        iterations: ICP iterations run.
        converged: the RMS change fell below the tolerance.
    """

    R: np.ndarray
    t: np.ndarray
    indices: np.ndarray
    distances: np.ndarray
    iterations: int
    converged: bool

    def apply(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) -> (N, 3): ``R p + t``."""
        return np.asarray(points, np.float64) @ self.R.T + self.t


def icp(
    source: np.ndarray,
    target: np.ndarray,
    init_R: np.ndarray | None = None,
    init_t: np.ndarray | None = None,
    max_iterations: int = 50,
    tolerance: float = 1e-6,
    tree: cKDTree | None = None,
    fit_subsample: int = 1,
) -> IcpResult:
    """Point-to-point rigid ICP moving ``source`` onto ``target``.

    Each iteration pairs every source point with its nearest target point
    (``scipy.spatial.cKDTree``) and re-solves the rigid transform from the original source
    (:func:`rigid_transform`); it stops when the RMS pair distance changes by less than
    ``tolerance`` (relative) or after ``max_iterations``.

    Args:
        source: (N, 3) points that move (ground truth in :func:`surface_nme`).
        target: (M, 3) fixed points.
        init_R, init_t: initial transform (identity, zero by default).
        max_iterations, tolerance: stopping rule.
        tree: a prebuilt ``cKDTree(target)``.
        fit_subsample: fit the transform on every k-th source point (speed); the final
            correspondences are always computed for all points.
    Returns:
        :class:`IcpResult`.
    """
    src = np.asarray(source, np.float64)
    tgt = np.asarray(target, np.float64)
    if src.ndim != 2 or src.shape[1] != 3 or tgt.ndim != 2 or tgt.shape[1] != 3 or not len(src) or not len(tgt):
        raise ValueError(f"source and target must be non-empty (N, 3), got {src.shape} and {tgt.shape}")
    tree = tree if tree is not None else cKDTree(tgt)
    R = np.eye(3) if init_R is None else np.asarray(init_R, np.float64)
    t = np.zeros(3) if init_t is None else np.asarray(init_t, np.float64).reshape(3)
    fit = src[:: max(1, int(fit_subsample))]
    prev = np.inf
    converged = False
    it = 0
    for it in range(1, int(max_iterations) + 1):  # noqa: B007 - the count is reported after the loop
        d, idx = tree.query(fit @ R.T + t)
        R, t = rigid_transform(fit, tgt[idx])
        rms = float(np.sqrt(np.mean(d * d)))
        if abs(prev - rms) <= tolerance * max(rms, 1e-12):
            converged = True
            break
        prev = rms
    d, idx = tree.query(src @ R.T + t)
    return IcpResult(R, t, idx.astype(np.int64), d, it, converged)


# --------------------------------------------------------------------------------------
# surface NME
# --------------------------------------------------------------------------------------


@dataclass
class SurfaceNME:
    """Result of :func:`surface_nme` (distances in the input frame's units).

    Attributes:
        nme_icp: paper protocol (ICP correspondences, unaligned distances up to a z shift).
        nme_rigid: distances after the full rigid alignment.
        mean_dist_icp, mean_dist_rigid: the un-normalised mean distances.
        normalizer: the interocular distance used.
        z_shift: the z shift removed for ``nme_icp`` (added to the ground truth).
        icp: the ICP result (ground truth -> prediction).
    """

    nme_icp: float
    nme_rigid: float
    mean_dist_icp: float
    mean_dist_rigid: float
    normalizer: float
    z_shift: float
    icp: IcpResult


def _init_depth_shift(source: np.ndarray, target: np.ndarray, q: float = 99.0) -> float:
    """z shift bringing the source's front (its ``q``-th z percentile, the nose region) to the
    target's: a start for ICP when x, y are already registered but z has no common origin."""
    return float(np.percentile(target[:, 2], q) - np.percentile(source[:, 2], q))


def surface_nme(
    pred_verts: np.ndarray,
    gt_verts: np.ndarray,
    normalizer: float,
    max_iterations: int = 50,
    tolerance: float = 1e-6,
    fit_subsample: int = 1,
    init: str = "depth",
) -> SurfaceNME:
    """Surface NME between a predicted mesh and the ground-truth mesh (module doc).

    Args:
        pred_verts: (M, 3) predicted surface vertices.
        gt_verts: (N, 3) ground-truth vertices (the face region), same frame.
        normalizer: the 3D outer interocular distance (:func:`interocular_distance`).
        max_iterations, tolerance, fit_subsample: ICP settings (:func:`icp`).
        init: "depth" (x, y registered, z fronts matched: the photo case), "centroid"
            (centroids matched), or "none".
    Returns:
        :class:`SurfaceNME`.
    """
    pred = np.asarray(pred_verts, np.float64)
    gt = np.asarray(gt_verts, np.float64)
    if init == "depth":
        t0 = np.array([0.0, 0.0, _init_depth_shift(gt, pred)])
    elif init == "centroid":
        t0 = pred.mean(0) - gt.mean(0)
    elif init == "none":
        t0 = np.zeros(3)
    else:
        raise ValueError(f"init must be 'depth', 'centroid' or 'none', got {init!r}")
    res = icp(gt, pred, init_t=t0, max_iterations=max_iterations, tolerance=tolerance, fit_subsample=fit_subsample)
    matched = pred[res.indices]
    d_rigid = np.linalg.norm(res.apply(gt) - matched, axis=1)
    dz = float(np.mean(matched[:, 2] - gt[:, 2]))
    d_icp = np.linalg.norm(gt + np.array([0.0, 0.0, dz]) - matched, axis=1)
    n = float(normalizer)
    return SurfaceNME(
        float(d_icp.mean() / n), float(d_rigid.mean() / n), float(d_icp.mean()), float(d_rigid.mean()), n, dz, res
    )


# --------------------------------------------------------------------------------------
# landmarks
# --------------------------------------------------------------------------------------


def landmark_nme(pred: np.ndarray, gt: np.ndarray, normalizer: float, align_z: bool = True) -> float:
    """Mean landmark distance over the landmarks finite in both, divided by ``normalizer``.

    Args:
        pred, gt: (K, 2) or (K, 3) landmarks, same frame.
        normalizer: e.g. :func:`landmark_box_size` of the ground truth.
        align_z: for (K, 3), shift the predicted z by the mean z difference first (depth has
            no common origin).
    Returns:
        the NME (NaN when no landmark is finite in both).
    """
    p = np.asarray(pred, np.float64).copy()
    g = np.asarray(gt, np.float64)
    if p.shape != g.shape or p.ndim != 2 or p.shape[1] not in (2, 3):
        raise ValueError(f"pred and gt must be equal (K, 2|3), got {p.shape} and {g.shape}")
    ok = np.isfinite(p).all(1) & np.isfinite(g).all(1)
    if not ok.any():
        return float("nan")
    if p.shape[1] == 3 and align_z:
        p[:, 2] += np.mean(g[ok, 2] - p[ok, 2])
    return float(np.linalg.norm(p[ok] - g[ok], axis=1).mean() / float(normalizer))


def surface_depth_at(verts: np.ndarray, faces: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """z of the front (camera-facing) surface of a mesh at points (x, y).

    The mesh is rasterised (:func:`vrn.geometry.raster.rasterize`, keep="front") over the
    pixel window it covers; z is bilinear between the four surrounding pixel centres when
    all four are covered, else the z of the nearest covered pixel centre.

    Args:
        verts: (V, 3) float px (x, y, z); faces (F, 3) int.
        xy: (K, 2) query points, same px frame (NaN rows give NaN).
    Returns:
        (K,) float64 z; NaN where the query is NaN or the mesh is empty.
    """

    q = np.asarray(xy, np.float64)[:, :2]
    out = np.full(len(q), np.nan)
    v = np.asarray(verts, np.float64)
    if len(v) == 0 or len(faces) == 0 or len(q) == 0:
        return out
    x0, y0 = np.floor(v[:, :2].min(0)).astype(int) - 1
    x1, y1 = np.ceil(v[:, :2].max(0)).astype(int) + 2
    r = rasterize(
        (v - [x0, y0, 0]).astype(np.float32),
        np.ascontiguousarray(faces, np.int32),
        int(y1 - y0),
        int(x1 - x0),
        keep="front",
    )
    m = r.tri_id >= 0
    if not m.any():
        return out
    ok = np.isfinite(q).all(1)
    qx, qy = q[ok, 0] - x0, q[ok, 1] - y0
    h, w = m.shape
    cx = np.clip(np.floor(qx).astype(int), 0, w - 2)
    cy = np.clip(np.floor(qy).astype(int), 0, h - 2)
    fx = np.clip(qx - cx, 0, 1)
    fy = np.clip(qy - cy, 0, 1)
    all4 = m[cy, cx] & m[cy, cx + 1] & m[cy + 1, cx] & m[cy + 1, cx + 1]
    d = np.where(m, r.depth, 0.0).astype(np.float64)  # -inf off the surface; only used where covered
    bil = (d[cy, cx] * (1 - fx) + d[cy, cx + 1] * fx) * (1 - fy) + (
        d[cy + 1, cx] * (1 - fx) + d[cy + 1, cx + 1] * fx
    ) * fy
    rr, cc = np.nonzero(m)
    _, nn = cKDTree(np.stack([cc, rr], 1)).query(np.stack([qx, qy], 1))
    near = d[rr[nn], cc[nn]]
    out[ok] = np.where(all4, bil, near)
    return out


# --------------------------------------------------------------------------------------
# yaw buckets and summaries
# --------------------------------------------------------------------------------------


def yaw_from_rotation(R: np.ndarray) -> float:
    """Yaw (degrees) of a head rotation ``R = Rz(roll) Ry(yaw) Rx(pitch)`` in the crop frame
    (:func:`vrn.geometry.transforms.euler_to_matrix`): ``asin(-R[2, 0])``."""
    return float(np.degrees(np.arcsin(np.clip(-np.asarray(R, np.float64)[2, 0], -1.0, 1.0))))


def yaw_bucket(yaw_deg: float) -> str:
    """Name of the |yaw| bucket, 3DDFA's split: "[0, 30]", "(30, 60]", "(60, 90]" (> 90 counts
    as the last)."""
    a = abs(float(yaw_deg))
    if not math.isfinite(a):
        return "unknown"
    for i, (lo, hi) in enumerate(YAW_BUCKETS):
        last = i == len(YAW_BUCKETS) - 1
        if (lo < a <= hi) or (i == 0 and a == lo) or (last and a > hi):
            return f"[{lo:g}, {hi:g}]" if i == 0 else f"({lo:g}, {hi:g}]"
    return "unknown"


def bucket_names() -> list[str]:
    return [yaw_bucket((lo + hi) / 2) for lo, hi in YAW_BUCKETS]


def rows_by_yaw_bucket(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows grouped by :func:`yaw_bucket` of their ``"yaw"`` (degrees; missing = NaN):
    every bucket of :data:`YAW_BUCKETS` in order (empty ones too), then any other group
    ("unknown") in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {b: [] for b in bucket_names()}
    for r in rows:
        groups.setdefault(yaw_bucket(r.get("yaw", float("nan"))), []).append(r)
    return groups


def summarize(rows: Sequence[dict[str, Any]], metrics: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Mean of each metric per yaw bucket, over all samples, and the bucket-balanced mean.

    Args:
        rows: per-sample dicts with ``"yaw"`` (degrees) and metric values (NaN/None = missing).
        metrics: metric names to average.
    Returns:
        ``{bucket: {"n": samples, metric: mean or None, metric + "_n": values used}}`` for
        each bucket, ``"all"``, and ``"balanced"`` (mean of the three bucket means, as
        3DDFA reports AFLW2000-3D).
    """
    metrics = list(metrics)
    groups = rows_by_yaw_bucket(rows)

    def agg(rs: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"n": len(rs)}
        for m in metrics:
            vals = np.array([float(r[m]) for r in rs if r.get(m) is not None and np.isfinite(float(r[m]))])
            out[m] = float(vals.mean()) if len(vals) else None
            out[f"{m}_n"] = int(len(vals))
        return out

    summary = {b: agg(rs) for b, rs in groups.items() if rs or b in bucket_names()}
    summary["all"] = agg(list(rows))
    bal: dict[str, Any] = {"n": len(rows)}
    for m in metrics:
        means = [summary[b][m] for b in bucket_names() if summary[b][m] is not None]
        bal[m] = float(np.mean(means)) if len(means) == len(YAW_BUCKETS) else None
        bal[f"{m}_n"] = sum(summary[b][f"{m}_n"] for b in bucket_names())
    summary["balanced"] = bal
    return summary


def markdown_table(summary: dict[str, dict[str, Any]], columns: Sequence[tuple[str, str, float, int]]) -> str:
    """Markdown table of a :func:`summarize` result.

    Args:
        summary: from :func:`summarize`.
        columns: (metric key, header, scale, decimals), e.g. ``("nme_icp", "NME (%)", 100, 2)``.
    Returns:
        the table text: one row per bucket, then "all" and "balanced"; "-" for missing values.
    """
    head = "| yaw | n | " + " | ".join(c[1] for c in columns) + " |"
    sep = "|---|---:|" + "---:|" * len(columns)
    lines = [head, sep]
    for b, row in summary.items():
        cells = []
        for key, _, scale, dec in columns:
            v = row.get(key)
            cells.append("-" if v is None else f"{v * scale:.{dec}f}")
        label = {"all": "all", "balanced": "balanced (mean of buckets)"}.get(b, b)
        lines.append(f"| {label} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

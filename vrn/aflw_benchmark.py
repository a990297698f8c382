"""The AFLW2000-3D benchmark as the papers run it, plus a surface metric that needs no Basel model.

3DDFA's benchmark arrays (``benchmark.npz`` beside the images; 3DDFA / 3DDFA_V2 /
2DASL all report with them): ``names`` (N,), ``pts68`` (N, 3, 68) ground-truth landmarks
of the 3DMM fits (the ``.mat`` files' ``pt3d_68``, stored as the fits give them),
``pts68_reannotated`` (N, 2, 68) 3DDFA's re-annotated 2D points, ``roi_box`` (N, 4) the
crop box each face is evaluated with, ``pose`` (N,) |yaw| in degrees, which defines the
buckets [0, 30], (30, 60], (60, 90].

Metrics (image px throughout; x right, y down, z toward the camera):

* :func:`nme_2d_3ddfa`: 3DDFA's 68-point 2D NME: the mean point distance divided by
  ``sqrt(w * h)`` of the ground-truth landmark box; predictions are compared with the arrays
  as stored, exactly as 3DDFA's benchmark code does (so published numbers are comparable).
* :func:`surface_landmark_nme`: the 68 ground-truth 3D points against a reconstructed
  *surface*: ICP (rigid) finds each point's exact closest surface point (point-to-triangle);
  "ICP corr." (the VRN paper's protocol, as :func:`vrn.nme.surface_nme`) measures the
  distance to it without the alignment, up to one common z shift (depth has no common
  origin; x, y are registered by the photo); "rigid" measures it after the alignment, which
  forgives pose errors. Both / the 3D outer interocular distance (landmarks 36 and 45, 0-based).
* :func:`depth_error_at_landmarks`: the front surface's depth at each ground-truth (x, y)
  against the ground-truth z (common z offset removed, the median), / the same distance.
  Hidden points (the far jaw in profile) have surface in front of them: this error has a floor.
* :func:`pose_errors`: head pose error in degrees, |predicted - ``Pose_Para``| per angle
  (yaw, pitch, roll, wrapped to [0, 180]) and their mean, for VRN's template fit
  (:mod:`vrn.pose_landmarks`) and the 3DDFA_V2 port's camera (same convention,
  :mod:`vrn.geometry.head_pose`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from tddfa_v2 import BFMModel, TDDFAResult, similar_transform, split_param
from vrn.face_models.bfm import dense_model_shape
from vrn.geometry.head_pose import pose_angles_from_rotation, rotation_angle_deg, rotation_from_pose_angles
from vrn.nme import bucket_names, icp, interocular_distance, surface_depth_at

__all__ = [
    "BenchmarkArrays",
    "load_benchmark",
    "nme_2d_3ddfa",
    "point_to_mesh_distance",
    "surface_landmark_nme",
    "depth_error_at_landmarks",
    "closest_points_on_mesh",
    "SurfaceLandmarkNME",
    "port_meshes",
    "score_benchmark",
    "benchmark_table",
    "BENCHMARK_COLUMNS",
    "BENCHMARK_FILE",
    "pose_errors",
    "POSE_ANGLES",
]

BENCHMARK_FILE = "benchmark.npz"


@dataclass(frozen=True)
class BenchmarkArrays:
    """3DDFA's AFLW2000-3D arrays (module doc), row ``i`` = image ``names[i]``."""

    names: np.ndarray
    pts68: np.ndarray
    pts68_reannotated: np.ndarray
    roi_box: np.ndarray
    yaw_abs_deg: np.ndarray

    def row(self, name: str) -> int | None:
        """Row of an image stem (``"image00002"``), None when the arrays do not hold it."""
        hit = np.flatnonzero(self.names == name)
        return int(hit[0]) if len(hit) else None


def load_benchmark(root: str | os.PathLike) -> BenchmarkArrays | None:
    """The arrays of ``<root>/benchmark.npz``; None when the folder has none.

    Raises:
        ValueError: the file lacks a key or its arrays disagree in length.
    """
    p = Path(root) / BENCHMARK_FILE
    if not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as z:
        need = ("names", "pts68", "pts68_reannotated", "roi_box", "pose")
        missing = [k for k in need if k not in z.files]
        if missing:
            raise ValueError(f"{p} lacks {missing}: expected 3DDFA's AFLW2000-3D arrays ({', '.join(need)})")
        names = np.array([str(n) for n in z["names"]])
        arrays = BenchmarkArrays(
            names,
            z["pts68"].astype(np.float64),
            z["pts68_reannotated"].astype(np.float64),
            z["roi_box"].astype(np.float64),
            np.abs(z["pose"].astype(np.float64)),
        )
    n = len(names)
    if not all(len(a) == n for a in (arrays.pts68, arrays.pts68_reannotated, arrays.roi_box, arrays.yaw_abs_deg)):
        raise ValueError(f"{p}: arrays of different lengths")
    return arrays


def nme_2d_3ddfa(pred: np.ndarray, gt: np.ndarray) -> float:
    """3DDFA's 68-point 2D NME of one face.

    Args:
        pred: (2+, 68) predicted landmarks (x, y rows first), image px.
        gt: (2+, 68) ground truth, image px.
    Returns:
        mean over the 68 points of the 2D distance / ``sqrt(w * h)`` of the ground-truth box.
    """
    p = np.asarray(pred, np.float64)[:2]
    g = np.asarray(gt, np.float64)[:2]
    if p.shape != (2, 68) or g.shape != (2, 68):
        raise ValueError(f"landmarks must be (2+, 68), got {np.shape(pred)} and {np.shape(gt)}")
    w, h = np.ptp(g[0]), np.ptp(g[1])
    return float(np.linalg.norm(p - g, axis=0).mean() / np.sqrt(w * h))


def _closest_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Closest points on triangles (a, b, c) to points p, all (K, 3) float64 (vectorised
    Voronoi-region test over the 7 regions: 3 vertices, 3 edges, the face)."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(1), (ac * ap).sum(1)
    bp = p - b
    d3, d4 = (ab * bp).sum(1), (ac * bp).sum(1)
    cp = p - c
    d5, d6 = (ab * cp).sum(1), (ac * cp).sum(1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    denom = va + vb + vc
    safe = np.where(np.abs(denom) > 1e-300, denom, 1.0)
    v, w = vb / safe, vc / safe
    out = a + ab * v[:, None] + ac * w[:, None]  # inside the face
    # edges (later assignments win over earlier ones, vertices last)

    def edge(mask: np.ndarray, start: np.ndarray, vec: np.ndarray, num: np.ndarray, den: np.ndarray) -> None:
        t = num / np.where(np.abs(den) > 1e-300, den, 1.0)
        out[mask] = (start + vec * t[:, None])[mask]

    edge((vc <= 0) & (d1 >= 0) & (d3 <= 0), a, ab, d1, d1 - d3)
    edge((vb <= 0) & (d2 >= 0) & (d6 <= 0), a, ac, d2, d2 - d6)
    edge((va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0), b, c - b, d4 - d3, (d4 - d3) + (d5 - d6))
    m = (d1 <= 0) & (d2 <= 0)
    out[m] = a[m]
    m = (d3 >= 0) & (d4 <= d3)
    out[m] = b[m]
    m = (d6 >= 0) & (d5 <= d6)
    out[m] = c[m]
    return out


def closest_points_on_mesh(
    points: np.ndarray, verts: np.ndarray, faces: np.ndarray, k: int = 16, tree: cKDTree | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact closest surface point of each query point (see :func:`point_to_mesh_distance`).

    Returns:
        distances (K,) float64 and closest points (K, 3) float64; NaN rows for an empty mesh.
    """
    q = np.asarray(points, np.float64)
    v = np.asarray(verts, np.float64)
    f = np.asarray(faces, np.int64)
    if len(v) == 0 or len(f) == 0:
        return np.full(len(q), np.nan), np.full((len(q), 3), np.nan)
    tree = tree if tree is not None else cKDTree(v)
    _, near = tree.query(q, k=min(int(k), len(v)))
    near = near.reshape(len(q), -1)
    # vertex -> incident faces as CSR
    order = np.argsort(f.ravel(), kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(f.ravel(), minlength=len(v)))])
    face_of = order // 3
    rows, cand = [], []
    for i in range(len(q)):  # K query points (68 landmarks), each a vectorised gather
        fi = np.unique(np.concatenate([face_of[starts[n] : starts[n + 1]] for n in near[i]]))
        rows.append(np.full(len(fi), i))
        cand.append(fi)
    r = np.concatenate(rows)
    fc = f[np.concatenate(cand)]
    closest = _closest_on_triangles(q[r], v[fc[:, 0]], v[fc[:, 1]], v[fc[:, 2]])
    d = np.linalg.norm(closest - q[r], axis=1)
    # per query: the candidate with the smallest distance (sort by (query, distance), take firsts)
    o = np.lexsort((d, r))
    first = o[np.r_[True, r[o][1:] != r[o][:-1]]]
    dist = np.full(len(q), np.nan)
    pts = np.full((len(q), 3), np.nan)
    dist[r[first]] = d[first]
    pts[r[first]] = closest[first]
    return dist, pts


def point_to_mesh_distance(
    points: np.ndarray, verts: np.ndarray, faces: np.ndarray, k: int = 16, tree: cKDTree | None = None
) -> np.ndarray:
    """Exact distance from each point to a triangle mesh, among the triangles that touch the
    point's ``k`` nearest vertices (exact for meshes whose triangles are small next to the
    distances measured, such as marching-cubes and 3DMM meshes).

    Args:
        points: (K, 3) float, same frame as ``verts``.
        verts: (V, 3) float; faces: (F, 3) int.
        k: nearest vertices whose triangles are searched.
        tree: a prebuilt ``cKDTree(verts)``.
    Returns:
        (K,) float64 distances.
    """
    return closest_points_on_mesh(points, verts, faces, k, tree)[0]


@dataclass(frozen=True)
class SurfaceLandmarkNME:
    """:func:`surface_landmark_nme` of one face (both / 3D outer interocular distance).

    Attributes:
        icp_corr: the VRN paper's protocol: ICP finds each GT point's closest surface point,
            the distance is taken without the alignment, up to one common z shift.
        rigid: the distance after the full rigid ICP alignment (forgives pose errors).
    """

    icp_corr: float
    rigid: float


def surface_landmark_nme(
    gt_points: np.ndarray,
    verts: np.ndarray,
    faces: np.ndarray,
    max_iterations: int = 50,
    tolerance: float = 1e-6,
    iod: float | None = None,
) -> SurfaceLandmarkNME:
    """The 68 ground-truth 3D points against a reconstructed surface (module doc).

    Args:
        gt_points: (68, 3) ground-truth landmarks, image px (any z origin); or (N, 3), any subset
            of them, with ``iod`` given.
        verts: (V, 3) reconstructed surface, image px; faces: (F, 3).
        iod: the normaliser (3D outer interocular distance, image px); None: from ``gt_points``
            (iBUG 37 and 46).
    Returns:
        :class:`SurfaceLandmarkNME`; NaNs for an empty mesh.
    """
    g = np.asarray(gt_points, np.float64)
    v = np.asarray(verts, np.float64)
    if len(v) == 0 or len(faces) == 0:
        return SurfaceLandmarkNME(float("nan"), float("nan"))
    iod = interocular_distance(g) if iod is None else float(iod)
    tree = cKDTree(v)
    # x, y are registered (same photo); start with the fronts (nose region) matched in depth
    t0 = np.array([0.0, 0.0, np.percentile(v[:, 2], 99) - np.percentile(g[:, 2], 99)])
    res = icp(g, v, init_t=t0, max_iterations=max_iterations, tolerance=tolerance, tree=tree)
    d_rigid, closest = closest_points_on_mesh(res.apply(g), v, faces, tree=tree)
    ok = np.isfinite(d_rigid)
    dz = float(np.mean(closest[ok, 2] - g[ok, 2]))
    d_corr = np.linalg.norm(g[ok] + np.array([0.0, 0.0, dz]) - closest[ok], axis=1)
    return SurfaceLandmarkNME(float(d_corr.mean() / iod), float(d_rigid[ok].mean() / iod))


def depth_error_at_landmarks(gt_points: np.ndarray, verts: np.ndarray, faces: np.ndarray) -> float:
    """Front-surface depth at the ground-truth (x, y) vs the ground-truth z (module doc).

    Args:
        gt_points: (68, 3) image px; verts (V, 3) image px, faces (F, 3).
    Returns:
        mean |z_surface - (z_gt + median offset)| over the points the surface covers,
        / 3D outer interocular distance; NaN when the surface covers none of them.
    """
    g = np.asarray(gt_points, np.float64)
    if len(verts) == 0 or len(faces) == 0:
        return float("nan")
    z = surface_depth_at(verts, faces, g[:, :2])
    ok = np.isfinite(z)
    if not ok.any():
        return float("nan")
    dz = z[ok] - g[ok, 2]
    return float(np.abs(dz - np.median(dz)).mean() / interocular_distance(g))


def port_meshes(result: TDDFAResult, bfm: BFMModel) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The two baselines of the benchmark table from one 3DDFA_V2 result, image px.

    * ``"port mesh"``: the port's own dense mesh (its shape and expression; offline, the
      stand-in's landmark displacements spread over the mean face, as the pipeline's
      ``fitter=tddfa`` builds targets);
    * ``"posed mean face"``: the mean face with the port's pose and scale (no identity,
      no expression): what a model learns if it learns only the pose.

    Returns:
        ``{name: (verts (V, 3) float64 image px, faces (F, 3) int32)}``.
    """
    sr, t, a_s, a_e = split_param(result.param)
    dense, _lms, _how = dense_model_shape(bfm, a_s, a_e)
    mean, _lms, _how = dense_model_shape(bfm, np.zeros_like(a_s), np.zeros_like(a_e))
    tri = np.asarray(bfm.tri, np.int32)
    return {
        name: (similar_transform(sr @ shape + t, result.roi_box, result.size).T.astype(np.float64), tri)
        for name, shape in (("port mesh", dense), ("posed mean face", mean))
    }


#: (row key, method, metric, scale, decimals) of the benchmark table
BENCHMARK_COLUMNS: list[tuple[str, str, str, float, int]] = [
    ("bench_nme2d_port", "3DDFA_V2 port (mb05)", "68-pt 2D NME vs pts68 (%)", 100.0, 2),
    ("bench_nme2d_port_reann", "3DDFA_V2 port (mb05)", "68-pt 2D NME vs pts68_reannotated (%)", 100.0, 2),
    ("bench_surf_vrn", "VRN (this checkpoint)", "68 GT points to surface, ICP corr. (% IOD)", 100.0, 2),
    ("bench_surf_port_mesh", "3DDFA_V2 port mesh", "68 GT points to surface, ICP corr. (% IOD)", 100.0, 2),
    ("bench_surf_posed_mean_face", "posed mean face", "68 GT points to surface, ICP corr. (% IOD)", 100.0, 2),
    ("bench_surfrigid_vrn", "VRN (this checkpoint)", "68 GT points to surface, rigid ICP (% IOD)", 100.0, 2),
    ("bench_surfrigid_port_mesh", "3DDFA_V2 port mesh", "68 GT points to surface, rigid ICP (% IOD)", 100.0, 2),
    ("bench_surfrigid_posed_mean_face", "posed mean face", "68 GT points to surface, rigid ICP (% IOD)", 100.0, 2),
    ("bench_depth_vrn", "VRN (this checkpoint)", "depth error at GT x, y (% IOD)", 100.0, 2),
    ("bench_depth_port_mesh", "3DDFA_V2 port mesh", "depth error at GT x, y (% IOD)", 100.0, 2),
    ("bench_depth_posed_mean_face", "posed mean face", "depth error at GT x, y (% IOD)", 100.0, 2),
    *[
        (f"bench_pose_{a}_{key}", method, f"pose error, {a} (deg)", 1.0, 2)
        for key, method in (
            ("vrn", "VRN (this checkpoint)"),
            ("port", "3DDFA_V2 port (mb05)"),
            ("gtvol", "pose fit on the GT volume (check)"),
        )
        for a in ("yaw", "pitch", "roll", "mean", "rotation")
    ],
]

#: the angles of a ``(pitch, yaw, roll)`` pose vector, in that order (``Pose_Para``)
POSE_ANGLES = ("pitch", "yaw", "roll")


def pose_errors(pred_deg: np.ndarray | None, gt_deg: np.ndarray | None, key: str) -> dict[str, float | None]:
    """Absolute pose errors of one face, degrees.

    Args:
        pred_deg, gt_deg: (3,) pitch, yaw, roll in degrees (``Pose_Para`` convention), or None.
        key: the method's column suffix ("vrn", "port", "gtvol": the same fit as "vrn" on the
            ground-truth volume, where the data has one: checks the computation on real faces).
    Returns:
        ``{"bench_pose_<angle>_<key>": |difference| wrapped to [0, 180], ...}`` for yaw, pitch,
        roll and their ``mean``, both poses first brought to the one Euler triple of their
        rotation with |yaw| <= 90 (:func:`vrn.geometry.head_pose.pose_angles_from_rotation`),
        and ``rotation``: the angle of the rotation between the two (geodesic; free of the
        gimbal lock that makes pitch and roll trade off near |yaw| 90); Nones when either pose
        is missing.
    """
    out: dict[str, float | None] = {f"bench_pose_{a}_{key}": None for a in (*POSE_ANGLES, "mean", "rotation")}
    if pred_deg is None or gt_deg is None or not np.isfinite(np.r_[pred_deg, gt_deg]).all():
        return out
    # one representative per rotation (|yaw| <= 90): a few fits store e.g. yaw -103 deg
    Rp, Rg = rotation_from_pose_angles(*pred_deg), rotation_from_pose_angles(*gt_deg)
    p, g = np.array(pose_angles_from_rotation(Rp)), np.array(pose_angles_from_rotation(Rg))
    d = p - g
    err = np.abs((d + 180.0) % 360.0 - 180.0)
    for a, e in zip(POSE_ANGLES, err):
        out[f"bench_pose_{a}_{key}"] = float(e)
    out[f"bench_pose_mean_{key}"] = float(err.mean())
    out[f"bench_pose_rotation_{key}"] = rotation_angle_deg(Rp, Rg)
    return out


def benchmark_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown table of the benchmark rows of a :func:`vrn.nme.summarize` result: one row per
    (method, metric), columns the yaw buckets and their mean."""
    buckets = bucket_names()
    lines = [
        "| method | metric | " + " | ".join(buckets) + " | mean of buckets |",
        "|---|---|" + "---:|" * (len(buckets) + 1),
    ]
    for key, method, metric, scale, dec in BENCHMARK_COLUMNS:
        if summary.get("all", {}).get(key) is None:
            continue
        cells = []
        for b in [*buckets, "balanced"]:
            v = summary.get(b, {}).get(key)
            cells.append("-" if v is None else f"{v * scale:.{dec}f}")
        lines.append(f"| {method} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def score_benchmark(
    gt_points: np.ndarray,
    pred_mesh: tuple[np.ndarray, np.ndarray] | None,
    bench: dict[str, Any],
    icp_iterations: int = 50,
) -> dict[str, float | None]:
    """The benchmark columns of one face.

    Args:
        gt_points: (68, 3) ground-truth landmarks, image px (0-based pixel centres).
        pred_mesh: the model's (verts, faces) in image px, or None (no surface).
        bench: the sample's arrays: ``pts68`` (3, 68) and ``pts68_reannotated`` (2, 68) as
            stored, ``port_pts68`` (3, 68) the port's landmarks on ``roi_box`` (or absent),
            ``meshes`` from :func:`port_meshes` (or absent).
    Returns:
        ``{column key: value or None}`` (keys of :data:`BENCHMARK_COLUMNS`).
    """
    out: dict[str, float | None] = {c[0]: None for c in BENCHMARK_COLUMNS}

    def num(x: float) -> float | None:
        return float(x) if np.isfinite(x) else None

    if bench.get("port_pts68") is not None:
        out["bench_nme2d_port"] = num(nme_2d_3ddfa(bench["port_pts68"], bench["pts68"]))
        out["bench_nme2d_port_reann"] = num(nme_2d_3ddfa(bench["port_pts68"], bench["pts68_reannotated"]))
    meshes = {"vrn": pred_mesh, **{k.replace(" ", "_"): m for k, m in (bench.get("meshes") or {}).items()}}
    for key, mesh in meshes.items():
        if mesh is None or len(mesh[1]) == 0:
            continue
        sn = surface_landmark_nme(gt_points, mesh[0], mesh[1], icp_iterations)
        out[f"bench_surf_{key}"], out[f"bench_surfrigid_{key}"] = num(sn.icp_corr), num(sn.rigid)
        out[f"bench_depth_{key}"] = num(depth_error_at_landmarks(gt_points, mesh[0], mesh[1]))
    return out

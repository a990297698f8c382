"""AFLW2000-3D benchmark protocol: 3DDFA's 2D NME of the port, the surface metric, the dataset wiring."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import trimesh

from vrn.aflw_benchmark import (
    BENCHMARK_FILE,
    benchmark_table,
    depth_error_at_landmarks,
    load_benchmark,
    nme_2d_3ddfa,
    point_to_mesh_distance,
    score_benchmark,
    surface_landmark_nme,
)
from vrn.eval_datasets import AFLW2000Dataset
from vrn.face_models.landmarks68 import mirror_landmarks
from vrn.face_models.tddfa_models import load_tddfa
from vrn.geometry.crop import crop_for_layout
from vrn.image_io import read_image_rgb
from vrn.nme import interocular_distance, summarize


@pytest.fixture(scope="module")
def sample_benchmark(shared_dir: Path, tmp_path_factory) -> Path:
    """The 6 faces of aflw2000_3d_sample with their rows of the full set's benchmark.npz."""
    src = shared_dir / "data" / "aflw2000_3d_sample"
    full = np.load(shared_dir / "data" / "aflw2000_3d" / BENCHMARK_FILE)
    out = tmp_path_factory.mktemp("aflw_sample")
    names = sorted(p.stem for p in src.glob("*.jpg"))
    for n in names:
        shutil.copy(src / f"{n}.jpg", out)
        shutil.copy(src / f"{n}.mat", out)
    rows = [int(np.flatnonzero(full["names"] == n)[0]) for n in names]
    np.savez(out / BENCHMARK_FILE, **{k: full[k][rows] for k in full.files})
    return out


def test_port_nme_matches_a_hand_computed_table(sample_benchmark: Path) -> None:
    arrays = load_benchmark(sample_benchmark)
    assert arrays is not None and len(arrays.names) == 6
    port = load_tddfa()
    table = []
    for i, name in enumerate(arrays.names):
        image = read_image_rgb(sample_benchmark / f"{name}.jpg")
        pred = port.from_roi_boxes(image, [arrays.roi_box[i]])[0].pts68
        gt = arrays.pts68[i]
        # by hand: per point distance, box of the GT points, sqrt(w * h)
        dists = [np.hypot(pred[0, k] - gt[0, k], pred[1, k] - gt[1, k]) for k in range(68)]
        w = max(gt[0]) - min(gt[0])
        h = max(gt[1]) - min(gt[1])
        by_hand = sum(dists) / 68 / (w * h) ** 0.5
        table.append((name, arrays.yaw_abs_deg[i], by_hand))
        assert nme_2d_3ddfa(pred, gt) == pytest.approx(by_hand, rel=1e-12)
    print("\n| image | |yaw| | 2D NME (%) |\n|---|---:|---:|")
    for name, yaw, v in table:
        print(f"| {name} | {yaw:.1f} | {100 * v:.3f} |")
    nmes = np.array([v for *_, v in table])
    # the port is a good landmark regressor: a few percent on every face, never a failure
    assert np.all(nmes < 0.08) and 0.01 < nmes.mean() < 0.05


def test_nme_2d_known_answers() -> None:
    rng = np.random.default_rng(0)
    gt = np.stack([rng.uniform(100, 200, 68), rng.uniform(50, 250, 68)])  # box about 100 x 200
    w, h = np.ptp(gt[0]), np.ptp(gt[1])
    assert nme_2d_3ddfa(gt, gt) == 0.0
    shifted = gt + np.array([[3.0], [4.0]])  # every point 5 px off
    assert nme_2d_3ddfa(shifted, gt) == pytest.approx(5.0 / np.sqrt(w * h))
    with pytest.raises(ValueError, match="68"):
        nme_2d_3ddfa(gt[:, :10], gt[:, :10])


def _sphere(radius: float = 60.0) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=5, radius=radius)


def _face_points(mesh: trimesh.Trimesh, n: int = 68, seed: int = 0) -> np.ndarray:
    """n points on the front (+z) cap of the mesh surface, with outer eye corners 36/45 apart."""
    rng = np.random.default_rng(seed)
    pts, _ = trimesh.sample.sample_surface(mesh, 4000, seed=seed)
    front = pts[pts[:, 2] > 0.6 * mesh.vertices[:, 2].max()]
    return front[rng.choice(len(front), n, replace=False)]


def test_point_to_mesh_distance_known_answers() -> None:
    m = _sphere()
    rng = np.random.default_rng(1)
    dirs = rng.normal(size=(50, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    for r in (30.0, 57.0, 75.0):  # inside, near, outside
        d = point_to_mesh_distance(dirs * r, m.vertices, m.faces)
        # the icosphere's flat faces lie up to ~0.03 % of the radius inside the true sphere
        np.testing.assert_allclose(d, abs(r - 60.0), atol=0.05)
    # a flat square: distance = height above it, and to the nearest edge outside it
    v = np.array([[0, 0, 0], [10, 0, 0], [10, 10, 0], [0, 10, 0]], float)
    f = np.array([[0, 1, 2], [0, 2, 3]])
    q = np.array([[5, 5, 3.0], [15, 5, 0.0], [13, 14, 0.0]])
    np.testing.assert_allclose(point_to_mesh_distance(q, v, f, k=4), [3.0, 5.0, 5.0])


def _bumpy_surface(n: int = 121, half: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """A face-sized height field z(x, y) with bumps (no rigid symmetry), as (verts, faces)."""
    x, y = np.meshgrid(np.linspace(-half, half, n), np.linspace(-half, half, n))
    z = 30.0 * np.exp(-(x**2 + y**2) / 1500.0) + 4.0 * np.sin(x / 7.0) * np.cos(y / 9.0) + 0.004 * x * y
    verts = np.stack([x, y, z], -1).reshape(-1, 3)
    i = np.arange(n * n).reshape(n, n)
    a, b, c, d = i[:-1, :-1].ravel(), i[:-1, 1:].ravel(), i[1:, :-1].ravel(), i[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, c, b], 1), np.stack([b, c, d], 1)])
    return verts, faces


def _points_on(verts: np.ndarray, seed: int = 0) -> np.ndarray:
    """68 surface vertices of the central region (outer eye corners 36 / 45 set 40 px apart)."""
    rng = np.random.default_rng(seed)
    central = np.flatnonzero(np.abs(verts[:, :2]).max(1) < 35)
    g = verts[rng.choice(central, 68, replace=False)].copy()
    g[36] = verts[np.argmin(np.linalg.norm(verts[:, :2] - [-20, -10], axis=1))]
    g[45] = verts[np.argmin(np.linalg.norm(verts[:, :2] - [20, -10], axis=1))]
    return g


def test_surface_metric_known_answers() -> None:
    v, f = _bumpy_surface()
    g = _points_on(v)
    iod = interocular_distance(g)
    assert iod == pytest.approx(np.linalg.norm(g[36] - g[45]))
    # on the surface, whatever the z origin: ~0 in both variants
    r = surface_landmark_nme(g + np.array([0.0, 0.0, 40.0]), v, f)
    assert r.icp_corr < 0.002 and r.rigid < 0.002
    # a small rotation and an x, y shift: the rigid variant forgives them, the paper's (z only) does not
    c, s = np.cos(0.05), np.sin(0.05)
    R = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    moved = g @ R.T + np.array([1.5, -2.0, 40.0])
    r = surface_landmark_nme(moved, v, f)
    assert r.rigid < 0.01 and r.icp_corr > 4 * r.rigid  # ICP pairs with vertices 1 px apart: rigid ~0.3 px
    # scaled: the same points at twice the size are on the surface scaled twice
    assert surface_landmark_nme(2 * g, 2 * v, f).icp_corr < 0.002
    # one point lifted 12 px off the surface: the rigid fit can only spread that error over the
    # other points (least squares pulls the set toward the outlier), never remove it
    off = g.copy()
    off[10, 2] += 12.0
    r = surface_landmark_nme(off, v, f)
    for value in (r.rigid, r.icp_corr):
        assert 0.5 * 12.0 / 68 / iod < value < 3 * 12.0 / 68 / iod
    # depth at GT x, y: a constant offset is removed, a single 6 px depth error counts once
    dz = g.copy()
    dz[:, 2] += 25.0
    assert depth_error_at_landmarks(dz, v, f) < 0.002
    dz[3, 2] += 6.0
    assert depth_error_at_landmarks(dz, v, f) == pytest.approx(6.0 / 68 / iod, rel=0.05)
    assert np.isnan(surface_landmark_nme(g, np.zeros((0, 3)), np.zeros((0, 3), int)).rigid)


def test_dataset_adds_benchmark_rows_and_table(sample_benchmark: Path) -> None:
    ds = AFLW2000Dataset(sample_benchmark, crop="gt")
    assert len(ds) == 6
    s = ds[0]
    assert s.benchmark is not None and s.yaw == pytest.approx(s.benchmark["yaw_abs_deg"])
    assert set(s.benchmark["meshes"]) == {"port mesh", "posed mean face"}
    v, f = s.benchmark["meshes"]["port mesh"]
    # the port's own mesh passes near the GT points (a good fit), the pose-only mean face less so
    row = score_benchmark(s.gt_landmarks, None, s.benchmark)
    assert row["bench_surf_vrn"] is None  # no prediction: no VRN column
    assert 0 < row["bench_surf_port_mesh"] < 0.05 and 0 < row["bench_nme2d_port"] < 0.08
    table = benchmark_table(summarize([{"yaw": s.yaw, **row}], list(row)))
    assert "| 3DDFA_V2 port (mb05) | 68-pt 2D NME vs pts68 (%) |" in table and "posed mean face" in table
    assert len(v) == 38365 and f.shape[1] == 3
    # without the arrays: no benchmark, every jpg + mat pair
    plain = AFLW2000Dataset(sample_benchmark, crop="gt", benchmark=False)
    assert plain[0].benchmark is None
    with pytest.raises(ValueError, match="roi_box needs"):
        AFLW2000Dataset(sample_benchmark, crop="roi_box", benchmark=False)


def test_roi_box_crop_is_the_ports_landmarks_on_the_roi_box(sample_benchmark: Path) -> None:
    """data.crop=roi_box (3DDFA's protocol): the crop and landmark x, y are the port's on the
    benchmark roi_box, the same port result the baselines use (run once per face)."""
    ds = AFLW2000Dataset(sample_benchmark, crop="roi_box")
    port = load_tddfa()
    arrays = load_benchmark(sample_benchmark)
    for i in range(len(ds)):
        s = ds[i]
        image = read_image_rgb(sample_benchmark / f"{s.id}.jpg")
        ref = port.from_roi_boxes(image, [arrays.roi_box[arrays.row(s.id)]])[0].pts68[:2].T
        np.testing.assert_allclose(s.pred_landmarks_xy, ref, atol=1e-4)
        np.testing.assert_allclose(s.benchmark["port_pts68"][:2].T, ref, atol=1e-4)
        assert s.landmarks_xy_from == "detector" and s.info["crop"] == "port on roi_box"
        # the crop is cut with the model's rule around those landmarks
        crop, T = crop_for_layout(image, ref, ds.layout)
        assert np.array_equal(s.crop, crop) and T == s.transform


def test_roi_box_flip_averages_the_models_landmarks_only(sample_benchmark: Path) -> None:
    """data.roi_box_flip: the model's landmarks are the mean of the port's on the roi_box and,
    mirrored back, on the mirrored photo with the mirrored box; the baselines keep one pass."""
    ds = AFLW2000Dataset(sample_benchmark, crop="roi_box", roi_box_flip=True)
    port = load_tddfa()
    arrays = load_benchmark(sample_benchmark)
    for i in (0, 3):
        s = ds[i]
        image = read_image_rgb(sample_benchmark / f"{s.id}.jpg")
        x1, y1, x2, y2 = arrays.roi_box[arrays.row(s.id)]
        one = port.from_roi_boxes(image, [arrays.roi_box[arrays.row(s.id)]])[0].pts68[:2].T
        w = image.shape[1]
        box_m = np.array([w - x2, y1, w - x1, y2])  # pixel edges mirror through x -> w - x
        other = port.from_roi_boxes(np.ascontiguousarray(image[:, ::-1]), [box_m])[0].pts68[:2].T
        back = mirror_landmarks(other, w)
        np.testing.assert_allclose(s.pred_landmarks_xy, (one + back) / 2.0, atol=1e-4)
        assert np.abs(s.pred_landmarks_xy - one).max() > 0.05  # the mirrored pass moved them
        np.testing.assert_allclose(s.benchmark["port_pts68"][:2].T, one, atol=1e-4)
        assert s.info["crop"] == "port on roi_box, flip averaged"
        crop, T = crop_for_layout(image, s.pred_landmarks_xy, ds.layout)
        assert np.array_equal(s.crop, crop) and T == s.transform


def test_roi_box_flip_without_roi_box_names_the_setting(sample_benchmark: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.roi_box_flip=true only applies with data\.crop=roi_box.*crop=gt"):
        AFLW2000Dataset(sample_benchmark, crop="gt", roi_box_flip=True)

"""Z-buffer rasteriser and depth crossings: exact coverage, interpolation, fill rule, windings."""

from __future__ import annotations

import numpy as np
import pytest

from vrn.geometry.raster import MAX_ABS_COORD, boundary_edges, depth_crossings, rasterize

SUB = 256  # fixed-point steps per px used by the kernels


def _reference(tri_xyz: np.ndarray, H: int, W: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy reference over all pixel centres for ONE triangle whose x, y lie on the 1/256 grid:
    integer edge functions with the documented tie rule. Returns inside (H, W), bary (H, W, 3), z (H, W)."""
    X = np.rint(tri_xyz[:, 0] * SUB).astype(np.int64)
    Y = np.rint(tri_xyz[:, 1] * SUB).astype(np.int64)
    assert np.array_equal(X / SUB, tri_xyz[:, 0]) and np.array_equal(Y / SUB, tri_xyz[:, 1])
    py, px = np.mgrid[0:H, 0:W].astype(np.int64) * SUB
    area = (X[1] - X[0]) * (Y[2] - Y[0]) - (Y[1] - Y[0]) * (X[2] - X[0])
    s = 1 if area > 0 else -1
    es, inside = [], np.ones((H, W), bool)
    for k in range(3):
        i, j = (k + 1) % 3, (k + 2) % 3  # edge opposite vertex k: i -> j
        dx, dy = s * (X[j] - X[i]), s * (Y[j] - Y[i])
        e = dx * (py - Y[i]) - dy * (px - X[i])
        tie = dx > 0 or (dx == 0 and dy < 0)
        inside &= (e > 0) | ((e == 0) & tie)
        es.append(e.astype(np.float64))
    bary = np.stack(es, axis=-1) / (s * area)
    z = bary @ tri_xyz[:, 2].astype(np.float64)
    return inside, bary, z


def test_single_triangle_matches_reference() -> None:
    H, W = 48, 64
    # x, y on the 1/256 grid (so the reference needs no snapping); one edge passes exactly
    # through pixel centres (y = 10 for x in [5, 50]).
    tri = np.array([[5.0, 10.0, 3.0], [50.0, 10.0, 12.5], [20.25, 40.5, -4.0]], np.float32)
    ref_in, ref_b, ref_z = _reference(tri.astype(np.float64), H, W)
    assert ref_in.sum() > 400
    for order in ([0, 1, 2], [0, 2, 1]):  # both windings
        r = rasterize(tri, np.array([order], np.int32), H, W)
        assert np.array_equal(r.tri_id >= 0, ref_in)
        m = ref_in
        np.testing.assert_allclose(r.depth[m], ref_z[m], rtol=0, atol=1e-5)
        np.testing.assert_allclose(r.bary[m], ref_b[m][:, order], rtol=0, atol=1e-6)
        np.testing.assert_allclose(r.bary[m].sum(-1), 1.0, atol=1e-6)
        assert np.all(np.isneginf(r.depth[~m])) and np.all(r.tri_id[~m] == -1) and np.all(r.bary[~m] == 0)
        # the same pixels as crossings, with the right z and facing
        off, z, facing = depth_crossings(tri, np.array([order], np.int32), H, W)
        counts = np.diff(off).reshape(H, W)
        assert np.array_equal(counts, ref_in.astype(np.int64))
        np.testing.assert_allclose(z, ref_z[m], atol=1e-5)  # CSR order = row-major pixels
        n = np.cross(tri[order[1]] - tri[order[0]], tri[order[2]] - tri[order[0]])
        assert np.all(facing == np.sign(n[2]))


def test_front_back_choice_with_overlap() -> None:
    H = W = 32
    verts = np.array(
        [
            [2, 2, 10],
            [28, 2, 10],
            [2, 28, 10],  # plane z = 10 (tri 0)
            [4, 4, 20],
            [30, 4, 30],
            [4, 30, 5],
        ],  # sloped, crosses z = 10 (tri 1)
        np.float32,
    )
    tris = np.array([[0, 1, 2], [3, 5, 4]], np.int32)
    front = rasterize(verts, tris, H, W, keep="front")
    back = rasterize(verts, tris, H, W, keep="back")
    both = np.diff(depth_crossings(verts, tris, H, W)[0]).reshape(H, W) == 2
    assert both.sum() > 100
    d0 = np.full((H, W), 10.0)
    # plane of tri 1 through its vertices: z = 20 + (x-4)*10/26 + (y-4)*(-15/26)
    yy, xx = np.mgrid[0:H, 0:W]
    d1 = 20 + (xx - 4) * 10 / 26 - (yy - 4) * 15 / 26
    exp_front = np.where(d1 > d0, 1, 0)
    exp_back = 1 - exp_front
    sel = both & (np.abs(d1 - d0) > 1e-3)
    assert np.array_equal(front.tri_id[sel], exp_front[sel])
    assert np.array_equal(back.tri_id[sel], exp_back[sel])
    np.testing.assert_allclose(front.depth[sel], np.maximum(d0, d1)[sel], atol=1e-4)
    np.testing.assert_allclose(back.depth[sel], np.minimum(d0, d1)[sel], atol=1e-4)
    assert (front.depth[sel] > 10).any() and (front.depth[sel] == 10).any()


def _grid_mesh(n: int, spacing: float, origin: float, jitter: float, rng: np.random.Generator):
    """(n+1)^2 vertex grid, 2 n^2 triangles, random diagonals; interior vertices jittered."""
    g = np.arange(n + 1) * spacing + origin
    yy, xx = np.meshgrid(g, g, indexing="ij")
    v = np.stack([xx, yy, rng.uniform(0, 5, xx.shape)], axis=-1).reshape(-1, 3)
    inner = np.zeros((n + 1, n + 1), bool)
    inner[1:-1, 1:-1] = True
    inner = inner.ravel()
    v[inner, :2] += np.round(rng.uniform(-jitter, jitter, (inner.sum(), 2)) * 4) / 4  # often on centres / edges
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    flip = rng.random(len(a)) < 0.5
    t1 = np.where(flip[:, None], np.stack([a, b, d], 1), np.stack([a, b, c], 1))
    t2 = np.where(flip[:, None], np.stack([a, d, c], 1), np.stack([b, d, c], 1))
    tris = np.concatenate([t1, t2]).astype(np.int32)
    # random winding per triangle: both must be drawn
    w = rng.random(len(tris)) < 0.5
    tris[w] = tris[w][:, ::-1]
    return v.astype(np.float32), tris


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partition_covers_every_centre_exactly_once(seed: int) -> None:
    """A triangulated square whose vertices and edges hit pixel centres exactly: no gaps,
    no double hits anywhere inside (the property the watertight fill relies on)."""
    rng = np.random.default_rng(seed)
    n, sp, o = 12, 4.0, 8.0
    v, t = _grid_mesh(n, sp, o, jitter=1.5, rng=rng)
    H = W = 64
    counts = np.diff(depth_crossings(v, t, H, W)[0]).reshape(H, W)
    yy, xx = np.mgrid[0:H, 0:W]
    lo, hi = o, o + n * sp
    inside = (xx > lo) & (xx < hi) & (yy > lo) & (yy < hi)
    outside = (xx < lo) | (xx > hi) | (yy < lo) | (yy > hi)
    assert counts[inside].min() == 1 and counts[inside].max() == 1
    assert counts[outside].max() == 0
    r = rasterize(v, t, H, W)
    assert (r.tri_id[inside] >= 0).all()


def test_fan_around_vertex_on_pixel_centre() -> None:
    # 7 triangles around a vertex exactly at pixel centre (10, 10): claimed exactly once
    k = 7
    ang = np.linspace(0, 2 * np.pi, k, endpoint=False) + 0.3
    ring = np.stack([10 + 6 * np.cos(ang), 10 + 6 * np.sin(ang), np.zeros(k)], 1)
    v = np.concatenate([[[10.0, 10.0, 1.0]], ring]).astype(np.float32)
    t = np.array([[0, 1 + i, 1 + (i + 1) % k] for i in range(k)], np.int32)
    off, z, _ = depth_crossings(v, t, 21, 21)
    assert off[10 * 21 + 10 + 1] - off[10 * 21 + 10] == 1
    assert z[off[10 * 21 + 10]] == pytest.approx(1.0)


def test_crossings_sorted_front_to_back() -> None:
    rng = np.random.default_rng(3)
    v = rng.uniform([0, 0, 0], [20, 20, 50], (60, 3)).astype(np.float32)
    t = rng.integers(0, 60, (80, 3)).astype(np.int32)
    off, z, facing = depth_crossings(v, t, 20, 20)
    assert off[0] == 0 and off[-1] == len(z) == len(facing)
    for k in np.nonzero(np.diff(off) > 1)[0]:
        zz = z[off[k] : off[k + 1]]
        assert np.all(np.diff(zz) <= 0)
    assert set(np.unique(facing)) <= {-1, 1}
    # the z-buffer's front depth is the first crossing
    r = rasterize(v, t, 20, 20, keep="front")
    has = np.diff(off) > 0
    np.testing.assert_array_equal(r.depth.ravel()[has], z[off[:-1][has]])


def test_degenerate_and_offscreen() -> None:
    v = np.array([[0, 0, 0], [10, 10, 0], [20, 20, 0], [-50, -50, 0], [-40, -50, 0], [-50, -40, 0]], np.float32)
    t = np.array([[0, 1, 2], [3, 4, 5]], np.int32)  # collinear; off-grid
    r = rasterize(v, t, 16, 16)
    assert (r.tri_id == -1).all()
    assert depth_crossings(v, t, 16, 16)[1].size == 0


def test_bad_input_raises() -> None:
    v = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError):
        rasterize(v, np.array([[0, 1, 3]], np.int32), 4, 4)
    with pytest.raises(ValueError):
        depth_crossings(np.array([[0, 0, np.nan], [1, 0, 0], [0, 1, 0]], np.float32), np.array([[0, 1, 2]]), 4, 4)
    with pytest.raises(ValueError):
        depth_crossings(
            np.array([[0, 0, 0], [MAX_ABS_COORD, 0, 0], [0, 1, 0]], np.float32), np.array([[0, 1, 2]]), 4, 4
        )
    with pytest.raises(ValueError):
        rasterize(v, np.array([[0, 1, 2]]), 4, 4, keep="middle")  # type: ignore[arg-type]


def test_boundary_edges_directed() -> None:
    # square 0-1-2-3 split along 0-2; triangles (0,1,2), (0,2,3)
    t = np.array([[0, 1, 2], [0, 2, 3]], np.int32)
    e = boundary_edges(t)
    assert set(map(tuple, e.tolist())) == {(0, 1), (1, 2), (2, 3), (3, 0)}
    # a closed tetrahedron has none
    tet = np.array([[0, 1, 2], [0, 3, 1], [1, 3, 2], [2, 3, 0]], np.int32)
    assert boundary_edges(tet).shape == (0, 2)


# ---- transforms (vrn.geometry.transforms) ----------------------------------------------


def test_euler_to_matrix_axes_and_signs() -> None:
    from vrn.geometry.transforms import euler_to_matrix

    R = euler_to_matrix(30, -20, 10)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    nose = np.array([0.0, 0.0, 1.0])
    assert (euler_to_matrix(30, 0, 0) @ nose)[0] > 0  # +yaw: face turns to image right
    assert (euler_to_matrix(0, 30, 0) @ nose)[1] < 0  # +pitch: face turns up (-y)
    assert (euler_to_matrix(0, 0, 30) @ np.array([1.0, 0, 0]))[1] > 0  # +roll: x toward +y
    # order: Rz(roll) Ry(yaw) Rx(pitch)
    np.testing.assert_allclose(
        R, euler_to_matrix(0, 0, 10) @ euler_to_matrix(30, 0, 0) @ euler_to_matrix(0, -20, 0), atol=1e-12
    )


def test_crop_transform_round_trip_and_json() -> None:
    import json

    from vrn.geometry.transforms import CropTransform

    ct = CropTransform.from_center_scale((320.5, 210.25), 0.75, angle_deg=12.0)
    assert ct.scale == pytest.approx(0.75)
    np.testing.assert_allclose(ct.apply(np.array([[320.5, 210.25]])), [[95.5, 95.5]])
    rng = np.random.default_rng(0)
    p3 = rng.uniform(0, 500, (20, 3))
    q3 = ct.apply(p3)
    np.testing.assert_allclose(q3[:, 2], 0.75 * p3[:, 2])
    np.testing.assert_allclose(ct.apply_inverse(q3), p3, atol=1e-9)
    np.testing.assert_allclose(ct.inverse().apply(ct.apply(p3[:, :2])), p3[:, :2], atol=1e-9)
    np.testing.assert_allclose(ct.compose(ct.inverse()).matrix, [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    assert CropTransform.from_dict(json.loads(json.dumps(ct.to_dict()))) == ct
    box = CropTransform.from_box((100, 100, 200, 260), face_size=90.0)
    assert box.scale == pytest.approx(90.0 / np.sqrt(100 * 160))

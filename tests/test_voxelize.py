"""voxelize_face: analytic height field (frontal and 90-degree yaw) and real face meshes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from vrn.geometry.raster import boundary_edges, depth_crossings, rasterize
from vrn.geometry.transforms import euler_to_matrix
from vrn.volume.codec import decode
from vrn.volume.surface import front_depth_of_code
from vrn.volume.voxelize import DEFAULT_BACK_OFFSET, closed_face_mesh, solid_code_from_crossings, voxelize_face

F = 2.0
D, S = 200, 192
CX, CY, ZC = 96.0, 96.0, 40.3  # cap centre (x, y) and rim depth (crop px); off the voxel grid
RAD, HGT = 30.0, 15.0  # cap radius and height (crop px)


def cap_height(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The paraboloid cap z = ZC + HGT (1 - rho^2 / RAD^2) (crop px)."""
    return ZC + HGT * (1 - ((x - CX) ** 2 + (y - CY) ** 2) / RAD**2)


def cap_mesh(rings: int = 40, seg: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Polar mesh of the cap: centre vertex + `rings` rings of `seg` vertices."""
    rho = RAD * np.arange(1, rings + 1) / rings
    ang = 2 * np.pi * np.arange(seg) / seg
    x = CX + rho[:, None] * np.cos(ang)[None]
    y = CY + rho[:, None] * np.sin(ang)[None]
    v = np.concatenate(
        [[[CX, CY, cap_height(np.array(CX), np.array(CY))]], np.stack([x, y, cap_height(x, y)], -1).reshape(-1, 3)]
    )
    t = [[0, 1 + (s + 1) % seg, 1 + s] for s in range(seg)]
    for r in range(rings - 1):
        a, b = 1 + r * seg, 1 + (r + 1) * seg
        for s in range(seg):
            s1 = (s + 1) % seg
            t += [[a + s, a + s1, b + s1], [a + s, b + s1, b + s]]
    return v.astype(np.float32), np.array(t, np.int32)


def test_cap_frontal_exact_solid() -> None:
    v, t = cap_mesh()
    code = voxelize_face(v, t, np.eye(3))
    assert code.lo.shape == (S, S) and code.depth_bins == D
    # one run per column, exactly on the silhouette of the surface
    sil = rasterize(v, t, S, S).tri_id >= 0
    occ = code.hi > code.lo
    assert np.array_equal(occ, sil) and sil.sum() > 2500
    assert len(code.extra) == 0
    # filled down to the back plane: z_b = min z - offset
    zb = float(v[:, 2].min()) - DEFAULT_BACK_OFFSET
    assert np.all(code.lo[occ] == np.floor(F * zb - 0.5) + 1)
    # front surface within one bin of the height field
    yy, xx = np.mgrid[0:S, 0:S]
    top = np.ceil(F * cap_height(xx, yy) - 0.5) - 1  # highest bin centre below the surface
    err = code.hi.astype(float)[occ] - 1 - top[occ]
    assert np.abs(err).max() <= 1
    # and the front matches the rasterised mesh surface exactly (same quantisation)
    top_mesh = np.ceil(F * rasterize(v, t, S, S).depth - 0.5) - 1
    assert np.array_equal(code.hi[occ] - 1, top_mesh[occ].astype(np.uint8))


def test_back_offset_moves_back_plane() -> None:
    v, t = cap_mesh(20, 64)
    c1 = voxelize_face(v, t, np.eye(3), back_offset=1.0)
    c5 = voxelize_face(v, t, np.eye(3), back_offset=5.0)
    occ = c1.hi > c1.lo
    assert np.array_equal(occ, c5.hi > c5.lo)
    assert np.all(c1.lo[occ].astype(int) - c5.lo[occ].astype(int) == 8)  # 4 px = 8 bins


def _brute_force_cap(R: np.ndarray, pivot: np.ndarray, pts: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Points (N, 3) crop px in the posed frame -> (surely inside, surely outside) of the
    posed cap solid, with a `tol` px band left undecided."""
    q = (pts - pivot) @ R + pivot  # R^T (p - pivot) + pivot, row vectors
    rho = np.hypot(q[:, 0] - CX, q[:, 1] - CY)
    h = cap_height(q[:, 0], q[:, 1])
    zb = ZC - DEFAULT_BACK_OFFSET
    sure_in = (rho < RAD - tol) & (q[:, 2] > zb + tol) & (q[:, 2] < h - tol)
    sure_out = (rho > RAD + tol) | (q[:, 2] < zb - tol) | (q[:, 2] > h + tol)
    return sure_in, sure_out


@pytest.mark.parametrize("yaw,pitch,roll", [(90, 0, 0), (-90, 0, 0), (40, 25, -15)])
def test_cap_posed_matches_rotated_solid(yaw: float, pitch: float, roll: float) -> None:
    v, t = cap_mesh()
    R = euler_to_matrix(yaw, pitch, roll)
    pivot = np.array([CX, CY, 50.0])
    posed = ((v - pivot) @ R.T + pivot).astype(np.float32)
    code = voxelize_face(posed, t, R)
    vol = decode(code)
    # voxels in the posed solid's box (+2 px); nothing may be occupied outside it
    cv, _ = closed_face_mesh(posed, t, R)
    lo = np.floor(np.min(cv, 0) - 2).astype(int)
    hi = np.ceil(np.max(cv, 0) + 2).astype(int)
    box = (slice(max(int(F * lo[2]), 0), int(F * hi[2])), slice(max(lo[1], 0), hi[1]), slice(max(lo[0], 0), hi[0]))
    assert vol.sum() == vol[box].sum()
    d, r, c = np.nonzero(np.ones(vol[box].shape, bool))
    d, r, c = d + box[0].start, r + box[1].start, c + box[2].start
    pts = np.stack([c, r, (d + 0.5) / F], 1).astype(np.float64)  # voxel centres (x, y, z)
    occ = vol[d, r, c]
    sure_in, sure_out = _brute_force_cap(R, pivot, pts, tol=1.0)
    assert sure_in.sum() > 20000
    assert occ[sure_in].all(), f"{(~occ[sure_in]).sum()} holes"
    assert not occ[sure_out].any(), f"{occ[sure_out].sum()} spurious voxels"
    # total volume: cylinder of the back offset + half the paraboloid's cylinder, in voxels
    expected = np.pi * RAD**2 * (DEFAULT_BACK_OFFSET + HGT / 2) * F
    assert abs(vol.sum() - expected) < 0.03 * expected


# ---- real faces --------------------------------------------------------------------------


def _to_crop(mean_mm: np.ndarray, tris: np.ndarray, width_px: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """y-up mm mesh -> crop px (flip y, reverse winding), ~width_px wide, centred at
    x = y = 96, frontal; depth centred later after posing."""
    m = mean_mm.astype(np.float64)
    s = width_px / (m[:, 0].max() - m[:, 0].min())
    v = (m - m.mean(0)) * np.array([s, -s, s])
    return v, np.ascontiguousarray(tris[:, ::-1], dtype=np.int32)


def sfm_mean_face() -> tuple[np.ndarray, np.ndarray]:
    eos = pytest.importorskip("eos")
    from vrn import assets

    m = eos.morphablemodel.load_model(str(assets.resolve("sfm/sfm_shape_3448.bin")))
    sm = m.get_shape_model()
    return _to_crop(np.array(sm.get_mean()).reshape(-1, 3), np.array(sm.get_triangle_list()))


def bfm_mean_face() -> tuple[np.ndarray, np.ndarray]:
    from vrn import assets

    z = np.load(assets.resolve("3ddfa_v2/bfm_noneck_v3_offline.npz"))
    tri = z["tri"]
    tri = tri.T if tri.shape[0] == 3 else tri
    assert tri.min() == 0  # 0-based
    return _to_crop(z["u"].reshape(-1, 3), tri)


def pose(v0: np.ndarray, R: np.ndarray) -> np.ndarray:
    p = v0 @ R.T
    p[:, :2] += 96.0
    p[:, 2] += 50.0 - (p[:, 2].min() + p[:, 2].max()) / 2
    return p.astype(np.float32)


def xray_volume(cv: np.ndarray, ct: np.ndarray) -> np.ndarray:
    """Independent fill of the same closed mesh with rays along x instead of z: (D, S, S) bool."""
    w = np.empty_like(cv)
    w[:, 0] = F * cv[:, 2] - 0.5  # grid column = depth bin d
    w[:, 1] = cv[:, 1]  # grid row = r
    w[:, 2] = cv[:, 0] + 0.5  # "depth" = x, shifted so bin c <-> x = c
    off, z, fc = depth_crossings(w, ct, S, D)
    code = solid_code_from_crossings(off, z, fc, S, D, depth_bins=S, depth_factor=1.0)
    return decode(code).transpose(2, 1, 0)  # [c, r, d] -> [d, r, c]


@pytest.mark.parametrize("which", ["sfm", "bfm"])
@pytest.mark.parametrize("ypr", [(0, 0, 0), (35, 15, 10), (-70, -20, 5), (90, 0, 0)])
def test_face_watertight(which: str, ypr: tuple[float, float, float]) -> None:
    v0, t = sfm_mean_face() if which == "sfm" else bfm_mean_face()
    assert len(boundary_edges(t)) > 0
    R = euler_to_matrix(*ypr)
    posed = pose(v0, R)
    code = voxelize_face(posed, t, R)
    vol = decode(code)
    assert vol.sum() > 300_000
    # 1. rays along x see the same solid (a leak along z would show as whole wrong runs)
    xr = xray_volume(*closed_face_mesh(posed, t, R))
    diff = vol ^ xr
    surface = vol ^ ndimage.binary_erosion(vol)
    near = ndimage.binary_dilation(surface, iterations=1)
    assert not (diff & ~near).any()
    assert diff.sum() <= 1e-4 * vol.sum()
    # 2. every pixel that sees the face has a non-empty column, unless the solid is thinner
    #    than a bin along its ray there (grazing rims)
    sil = rasterize(posed, t, S, S).tri_id >= 0
    occ = code.hi > code.lo
    occ.ravel()[code.extra[:, 0]] = True
    empty = np.flatnonzero(sil & ~occ)
    assert len(empty) <= 1e-3 * sil.sum()
    off, z, fc = depth_crossings(*closed_face_mesh(posed, t, R), S, S)
    for k in empty:  # a handful of pixels
        zz, w = z[off[k] : off[k + 1]], np.cumsum(fc[off[k] : off[k + 1]])
        inside_len = sum(zz[i] - zz[i + 1] for i in range(len(zz) - 1) if w[i] != 0)
        assert inside_len < 1.0 / F
    # 3. the top of each column is the front surface of the closed solid, wherever the
    #    first inside interval along the ray (first two crossings) holds a bin centre
    n = np.diff(off)
    has2 = n >= 2
    k = np.flatnonzero(has2)
    z0, z1 = z[off[k]], z[off[k] + 1]
    top0 = np.ceil(F * z0.astype(np.float64) - 0.5) - 1
    thick = top0 >= np.floor(F * z1.astype(np.float64) - 0.5) + 1
    sel = k[thick & (top0 >= 0) & (top0 < D)]
    fd = front_depth_of_code(code).ravel()
    assert len(sel) > 0.98 * sil.sum()
    np.testing.assert_array_equal(fd[sel], top0[thick & (top0 >= 0) & (top0 < D)])
    # 4. frontal pose: a single slab almost everywhere
    if ypr == (0, 0, 0):
        assert len(code.extra) <= 0.01 * sil.sum()


def test_evenodd_equals_nonzero_on_face() -> None:
    v0, t = sfm_mean_face()
    R = euler_to_matrix(20, -10, 0)
    posed = pose(v0, R)
    assert voxelize_face(posed, t, R, fill_rule="evenodd") == voxelize_face(posed, t, R)


def test_closed_mesh_is_closed() -> None:
    v0, t = sfm_mean_face()
    R = euler_to_matrix(30, 10, 0)
    cv, ct = closed_face_mesh(pose(v0, R), t, R)
    assert len(cv) == 2 * len(v0)
    assert len(boundary_edges(ct)) == 0
    # every directed edge appears once and its reverse once (consistently oriented)
    e = np.concatenate([ct[:, [0, 1]], ct[:, [1, 2]], ct[:, [2, 0]]]).astype(np.int64)
    key = e[:, 0] * len(cv) + e[:, 1]
    rkey = e[:, 1] * len(cv) + e[:, 0]
    assert len(np.unique(key)) == len(key)
    assert np.array_equal(np.sort(key), np.sort(rkey))
    # back copy lies on one plane of the frontal frame
    depth_back = cv[len(v0) :].astype(np.float64) @ R[:, 2]
    assert np.ptp(depth_back) < 1e-3
    depth_front = cv[: len(v0)].astype(np.float64) @ R[:, 2]
    assert depth_back.mean() == pytest.approx(depth_front.min() - DEFAULT_BACK_OFFSET, abs=1e-3)


def test_boundary_edge_cache_sees_in_place_changes() -> None:
    from vrn.volume.voxelize import _cached_boundary_edges

    _, t = cap_mesh(4, 8)
    t = t.copy()
    e1 = _cached_boundary_edges(t, int(t.max()) + 1)
    assert np.array_equal(e1, boundary_edges(t))
    t[-8:] = t[-8:, ::-1]  # flip the outer ring's winding in place: same shape, new edges
    e2 = _cached_boundary_edges(t, int(t.max()) + 1)
    assert np.array_equal(e2, boundary_edges(t)) and not np.array_equal(e1, e2)

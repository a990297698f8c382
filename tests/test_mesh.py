"""volume_to_mesh (marching cubes in crop px) and atomic mesh export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh

from vrn.volume.codec import decode
from vrn.volume.mesh import export_mesh, volume_to_mesh
from vrn.volume.voxelize import voxelize_face

F = 2.0
D, S = 200, 192
CENTRE = np.array([96.3, 90.2, 50.1])  # sphere centre, crop px (x, y, z)
RADIUS = 30.0


def sphere_volume() -> np.ndarray:
    """Voxelised solid sphere: voxel (d, r, c) occupied iff its centre (c, r, (d+0.5)/F) is inside."""
    d = np.arange(D)[:, None, None]
    r = np.arange(S)[None, :, None]
    c = np.arange(S)[None, None, :]
    return (c - CENTRE[0]) ** 2 + (r - CENTRE[1]) ** 2 + ((d + 0.5) / F - CENTRE[2]) ** 2 < RADIUS**2


def test_sphere_mesh_close_to_surface_and_watertight() -> None:
    verts, faces = volume_to_mesh(sphere_volume().astype(np.float32), level=0.5, depth_factor=F)
    assert verts.dtype == np.float32 and faces.dtype == np.int32 and verts.shape[1] == 3
    dist = np.abs(np.linalg.norm(verts - CENTRE, axis=1) - RADIUS)
    assert dist.max() <= 1.0  # within one voxel (1 px in x, y; 0.5 px in z)
    m = trimesh.Trimesh(verts, faces, process=False)
    assert m.is_watertight and m.is_winding_consistent
    # outward: positive volume close to the sphere's, normals away from the centre
    assert m.volume == pytest.approx(4 / 3 * np.pi * RADIUS**3, rel=0.03)
    radial = ((m.triangles_center - CENTRE) * m.face_normals).sum(1)
    assert (radial > 0).all()
    top = m.triangles_center[:, 2] > CENTRE[2] + 0.9 * RADIUS  # front surface: normals toward +z
    assert top.sum() > 50 and (m.face_normals[top, 2] > 0).all()


def test_bool_input_and_border_touching_solid_is_closed() -> None:
    vol = np.zeros((20, 16, 16), bool)
    vol[:, 4:12, 0:10] = True  # touches d = 0, d = D-1 and c = 0 borders
    verts, faces = volume_to_mesh(vol, depth_factor=F)
    m = trimesh.Trimesh(verts, faces, process=False)
    assert m.is_watertight and m.volume > 0
    # the box spans x in [-0.5, 9.5], y in [3.5, 11.5], z in [0, 10] (padding = empty voxel)
    np.testing.assert_allclose(verts.min(0), [-0.5, 3.5, 0.0], atol=1e-5)
    np.testing.assert_allclose(verts.max(0), [9.5, 11.5, 10.0], atol=1e-5)


def test_empty_volume() -> None:
    v, f = volume_to_mesh(np.zeros((10, 8, 8), np.float32))
    assert v.shape == (0, 3) and f.shape == (0, 3)


def test_voxelised_cap_mesh_is_watertight() -> None:
    # a small open surface (flat disk + bump) -> VRN solid -> closed mesh
    ang = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    ring = np.stack([96 + 25 * np.cos(ang), 96 + 25 * np.sin(ang), np.full(48, 45.0)], 1)
    v = np.concatenate([[[96, 96, 60.0]], ring]).astype(np.float32)
    t = np.array([[0, 1 + (i + 1) % 48, 1 + i] for i in range(48)], np.int32)
    vol = decode(voxelize_face(v, t, np.eye(3)))
    verts, faces = volume_to_mesh(vol)
    m = trimesh.Trimesh(verts, faces, process=False)
    assert m.is_watertight and m.volume > 0
    assert verts[:, 2].max() == pytest.approx(60.0, abs=0.6)


@pytest.mark.parametrize("ext", [".ply", ".obj", ".glb"])
def test_export_round_trip_keeps_colours(tmp_path: Path, ext: str) -> None:
    verts, faces = volume_to_mesh(sphere_volume()[80:120, 70:110, 76:116])
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (len(verts), 3), dtype=np.uint8)
    out = export_mesh(tmp_path / f"sub/face{ext}", verts, faces, colours)
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == [out.name]  # no temp left
    m = trimesh.load(out, process=False, force="mesh")
    assert len(m.vertices) == len(verts) and len(m.faces) == len(faces)
    np.testing.assert_allclose(m.vertices, verts, atol=1e-5)
    vc = np.asarray(m.visual.vertex_colors)
    assert vc.dtype == np.uint8
    np.testing.assert_array_equal(vc[:, :3], colours)


def test_ply_has_uint8_rgb_properties(tmp_path: Path) -> None:
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    out = export_mesh(tmp_path / "t.ply", verts, np.array([[0, 1, 2]]), np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]))
    header = out.read_bytes().split(b"end_header")[0].decode()
    for ch in ("red", "green", "blue"):
        assert f"property uchar {ch}" in header
    m = trimesh.load(out, process=False)
    np.testing.assert_array_equal(np.asarray(m.visual.vertex_colors)[:, :3], np.eye(3, dtype=np.uint8) * 255)


def test_export_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        export_mesh(tmp_path / "x.stl", np.zeros((3, 3)), np.array([[0, 1, 2]]))
    assert list(tmp_path.iterdir()) == []

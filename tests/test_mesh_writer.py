"""The numpy .obj / .ply writers of vrn.volume.mesh: trimesh reads back what they write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh

from vrn.volume.mesh import OBJ_DECIMALS, export_mesh, obj_text

#: a face mesh of the size the demo writes (62k vertices, 124k triangles)
N_VERTS, N_FACES = 62_000, 124_000


def _mesh(n_verts: int = N_VERTS, n_faces: int = N_FACES, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    verts = rng.uniform(-50.0, 1500.0, (n_verts, 3)).astype(np.float32)
    # the hard cases of the digit code: zero, signs that round away, carries, integers, widths
    verts[:8] = [
        [0.0, -0.0, 1e-9],
        [-1e-9, -0.4999999e-6, 0.5e-6],
        [9.9999999, -9.9999999, 99.99999951],
        [1.0, -1.0, 1000.0],
        [-0.25, 0.125, 123456.0],
        [-123.456789, 7.0, -7.0],
        [0.1, 0.01, 0.001],
        [-0.000001, 0.000001, 5e-7],
    ]
    faces = rng.integers(0, n_verts, (n_faces, 3), dtype=np.int64)
    faces.ravel()[3 : 3 + n_verts] = rng.permutation(n_verts)  # every vertex used (trimesh drops unused ones)
    faces[0] = [0, 9, 10]  # 1-based indices 1, 10, 11: digit widths change
    colours = rng.integers(0, 256, (n_verts, 3), dtype=np.uint8)
    colours[:2] = [[0, 1, 254], [255, 128, 127]]
    return verts, faces, colours


@pytest.mark.parametrize("ext", [".obj", ".ply"])
def test_writer_round_trip_through_trimesh(tmp_path: Path, ext: str) -> None:
    verts, faces, colours = _mesh()
    out = export_mesh(tmp_path / f"face{ext}", verts, faces, colours)
    m = trimesh.load(out, process=False, force="mesh")
    assert m.vertices.shape == verts.shape and m.faces.shape == faces.shape
    np.testing.assert_array_equal(m.faces, faces)
    # .obj: OBJ_DECIMALS decimals of the float32 value; .ply: float32 bits as they are
    atol = 0.5 * 10.0**-OBJ_DECIMALS + 1e-9 if ext == ".obj" else 0.0
    np.testing.assert_allclose(m.vertices, verts.astype(np.float64), rtol=0, atol=atol)
    vc = np.asarray(m.visual.vertex_colors)
    assert vc.dtype == np.uint8
    np.testing.assert_array_equal(vc[:, :3], colours)


def test_obj_text_matches_python_formatting() -> None:
    verts, faces, colours = _mesh(200, 300, seed=1)
    rgba = np.concatenate([colours, np.full((200, 1), 255, np.uint8)], axis=1)
    text = obj_text(verts, faces, rgba).decode("ascii")
    v64 = verts.astype(np.float64)
    want = "".join(
        "v "
        + " ".join(f"{x:.{OBJ_DECIMALS}f}".replace("-0.000000", "0.000000") for x in p)
        + "".join(f" {c / 255.0:.6f}" for c in col)
        + "\n"
        for p, col in zip(v64, colours)
    ) + "".join(f"f {a + 1} {b + 1} {c + 1}\n" for a, b, c in faces)
    assert text.split("\n", 1)[1] == want


def test_obj_without_colours_and_the_slow_path(tmp_path: Path) -> None:
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float64)
    out = export_mesh(tmp_path / "plain.obj", verts, np.array([[0, 1, 2]]))
    assert "v 1.000000 0.000000 0.000000\n" in out.read_text()
    m = trimesh.load(out, process=False, force="mesh")
    np.testing.assert_allclose(m.vertices, verts)
    # |x| beyond the fast path's range: Python's formatting, same file layout
    verts[1, 0] = 3e10
    out = export_mesh(tmp_path / "big.obj", verts, np.array([[0, 1, 2]]), np.full((3, 3), 9, np.uint8))
    m = trimesh.load(out, process=False, force="mesh")
    np.testing.assert_allclose(m.vertices, verts)
    np.testing.assert_array_equal(np.asarray(m.visual.vertex_colors)[:, :3], 9)


def test_writer_rejects_bad_faces(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only 3 vertices"):
        export_mesh(tmp_path / "x.obj", np.zeros((3, 3)), np.array([[0, 1, 3]]))
    assert list(tmp_path.iterdir()) == []

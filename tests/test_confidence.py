"""Per-vertex confidence (vrn.volume.confidence): a synthetic volume whose surface is a sharp
step on one half and a smeared ramp on the other must score high on the sharp half and low
on the smeared one, through the bare function and through Reconstructor.postprocess (crop px
-> image px); the .ply keeps it as ``float quality``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from torch import nn

from tests.helpers import compose_demo, slab_checkpoint
from vrn.conventions import DEFAULT_LAYOUT
from vrn.demo import run_demo
from vrn.geometry.transforms import CropTransform
from vrn.inference import FaceResult, Reconstructor
from vrn.volume.confidence import confidence_colors, vertex_confidence
from vrn.volume.mesh import export_mesh, volume_to_mesh

#: the plane z of the surface (depth bin), the column splitting sharp (c < SPLIT) from smeared
PLANE_D = 100.3
SPLIT = 96
SHARP_W, SMEAR_W = 0.02, 3.0


def _half_sharp_volume(shape: tuple[int, int, int]) -> np.ndarray:
    """(D, H, W) float32: solid behind the plane d = PLANE_D; a logistic ramp of width
    SHARP_W voxels for columns c < SPLIT, SMEAR_W voxels for c >= SPLIT."""
    D, H, W = shape
    d = np.arange(D, dtype=np.float64)[:, None, None]
    w = np.where(np.arange(W) < SPLIT, SHARP_W, SMEAR_W)[None, None, :]
    return (1.0 / (1.0 + np.exp(-np.clip((PLANE_D - d) / w, -60, 60)))).astype(np.float32) * np.ones(
        (1, H, 1), np.float32
    )


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return _half_sharp_volume((DEFAULT_LAYOUT.depth_bins, DEFAULT_LAYOUT.crop_size, DEFAULT_LAYOUT.crop_size))


def _plane_sides(verts_crop: np.ndarray, depth_factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the plane's vertices (not the walls that close the solid at the volume's
    border) on the sharp and the smeared side, 3 voxels away from the seam and the border."""
    d = verts_crop[:, 2] * depth_factor - 0.5
    on_plane = np.abs(d - PLANE_D) < 0.6
    inner = (verts_crop[:, 1] > 3) & (verts_crop[:, 1] < DEFAULT_LAYOUT.crop_size - 4)
    x = verts_crop[:, 0]
    sharp = on_plane & inner & (x > 3) & (x < SPLIT - 3)
    smear = on_plane & inner & (x > SPLIT + 3) & (x < DEFAULT_LAYOUT.crop_size - 4)
    return sharp, smear


def test_sharp_step_confident_smeared_ramp_not(volume: np.ndarray) -> None:
    df = DEFAULT_LAYOUT.depth_factor
    verts, _faces = volume_to_mesh(volume, 0.5, df)
    conf = vertex_confidence(volume, verts, df)
    assert conf.shape == (len(verts),) and conf.dtype == np.float32
    assert conf.min() >= 0.0 and conf.max() <= 1.0
    sharp, smear = _plane_sides(verts, df)
    assert sharp.sum() > 1000 and smear.sum() > 1000
    assert conf[sharp].min() > 0.95  # a step within one voxel
    # the ramp changes by tanh(1 / (4 w)) across the voxel at the 0.5 level; half a point per decade
    np.testing.assert_allclose(conf[smear], 1 + np.log10(np.tanh(1 / (4 * SMEAR_W))) / 2, atol=0.01)


def test_flat_and_empty_inputs() -> None:
    flat = np.full((8, 8, 8), 0.5, np.float32)
    assert np.all(vertex_confidence(flat, np.array([[3.0, 3.0, 3.0]])) == 0.0)
    assert vertex_confidence(flat, np.zeros((0, 3))).shape == (0,)
    with pytest.raises(ValueError, match="prob must be"):
        vertex_confidence(np.zeros((8, 8)), np.zeros((1, 3)))


class _NoNet(nn.Module):
    """A stand-in network of the default layout (postprocess never runs it)."""

    depth_bins = DEFAULT_LAYOUT.depth_bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not called
        raise AssertionError


def test_postprocess_confidence_in_image_px(volume: np.ndarray, tmp_path: Path) -> None:
    rec = Reconstructor(_NoNet(), detector=None)
    T = CropTransform.from_center_scale((300.0, 200.0), 2.0)  # 2 crop px per image px
    verts, faces, colors, conf, tm = rec.postprocess(volume, T)
    assert "confidence" in tm and conf.shape == (len(verts),)
    sharp, smear = _plane_sides(T.apply(verts), rec.depth_factor)
    assert conf[sharp].min() > 0.95 and conf[smear].max() < 0.5
    # the sharp half is the image's left (x < 300): the crop px -> image px mapping is applied
    assert verts[sharp, 0].max() < 300.0 < verts[smear, 0].min()

    face = FaceResult(verts, faces, colors, T, np.zeros((68, 2)), np.zeros(4), 1.0, confidence=conf)
    path = face.export(tmp_path / "face.ply")
    raw = trimesh.load(path, process=False).metadata["_ply_raw"]["vertex"]["data"]
    np.testing.assert_array_equal(raw["quality"], conf)
    np.testing.assert_allclose(np.stack([raw["x"], raw["y"], raw["z"]], 1), verts)


def _read_ply_vertices(path: Path) -> tuple[list[str], np.ndarray]:
    """Our own parse of a binary little-endian .ply: vertex property names and records."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:end].decode("ascii").splitlines()
    assert "format binary_little_endian 1.0" in lines
    n = int(next(ln for ln in lines if ln.startswith("element vertex")).split()[-1])
    props = []
    for ln in lines[lines.index(f"element vertex {n}") + 1 :]:
        if not ln.startswith("property"):
            break
        _, typ, name = ln.split()
        props.append((name, {"float": "<f4", "uchar": "u1"}[typ]))
    rec = np.frombuffer(data, dtype=np.dtype(props), count=n, offset=end)
    return [p for p, _ in props], rec


def test_ply_quality_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 3)).astype(np.float32)
    f = rng.integers(0, 50, (30, 3))
    q = rng.random(50).astype(np.float32)
    names, rec = _read_ply_vertices(export_mesh(tmp_path / "m.ply", v, f, np.zeros((50, 3), np.uint8), q))
    assert names == ["x", "y", "z", "red", "green", "blue", "alpha", "quality"]
    np.testing.assert_array_equal(rec["quality"], q)
    names, rec = _read_ply_vertices(export_mesh(tmp_path / "n.ply", v, f, None, q))
    assert names == ["x", "y", "z", "quality"]
    np.testing.assert_array_equal(rec["quality"], q)
    assert _read_ply_vertices(export_mesh(tmp_path / "o.ply", v, f))[0] == ["x", "y", "z"]
    with pytest.raises(ValueError, match="vertex_quality"):
        export_mesh(tmp_path / "p.ply", v, f, None, q[:10])


def test_confidence_colour_map() -> None:
    rgb = confidence_colors(np.array([-1.0, 0.0, 0.5, 1.0, 2.0]))
    assert rgb.dtype == np.uint8 and rgb.shape == (5, 3)
    assert (rgb[0] == rgb[1]).all() and (rgb[3] == rgb[4]).all()  # clipped to [0, 1]
    assert rgb[1, 0] > rgb[1, 1]  # low: red
    assert rgb[3, 1] > rgb[3, 0]  # high: green
    assert rgb[2, 0] > 200 and rgb[2, 1] > 200  # middle: yellow


def test_demo_confidence_outputs(tmp_path: Path) -> None:
    """The photo demo with ``confidence_map`` and ``confidence_colors``: a confidence PNG per
    face, .ply colours = the colour map of its ``quality``, the mean in summary.json."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "shared" / "data" / "images" / "trump_hillary.jpg", photos)
    ckpt = slab_checkpoint(tmp_path / "slab.ckpt")
    out = tmp_path / "out"
    cfg = compose_demo(
        photos,
        ckpt,
        out,
        "formats=[ply]",
        "turntable=false",
        "depth=false",
        "num_workers=0",
        "confidence_map=true",
        "confidence_colors=true",
        set_output=True,
    )
    (rep,) = run_demo(cfg)
    assert len(rep.faces) == 2
    summary = json.loads((out / "summary.json").read_text())
    for k, face in enumerate(summary["images"][0]["faces"]):
        assert "mesh" not in face  # in-memory meshes never reach the JSON
        assert (out / f"trump_hillary_face{k}_confidence.png").is_file()
        names, rec = _read_ply_vertices(out / f"trump_hillary_face{k}.ply")
        assert "quality" in names and len(rec) == face["n_verts"]
        assert face["confidence_mean"] == pytest.approx(float(rec["quality"].mean()), rel=1e-5)
        rgb = np.stack([rec["red"], rec["green"], rec["blue"]], 1)
        np.testing.assert_array_equal(rgb, confidence_colors(rec["quality"]))

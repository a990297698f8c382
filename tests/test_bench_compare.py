"""scripts/bench_compare.py in its quick mode: each compared pair agrees (correctness, not timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_compare.py"


@pytest.fixture(scope="module")
def bc():
    return load_script("bench_compare")


@pytest.fixture(scope="module")
def quick(bc):
    torch.set_num_threads(1)
    return bc.Sizes.make(quick=True, repeats=1)


def _one(results):
    assert len(results) >= 1
    for r in results:
        assert "error" not in r.checks, r.checks
    return results[0]


def test_zbuffer_fill_matches_ours_on_a_frontal_face(bc):
    from vrn.volume.codec import decode
    from vrn.volume.voxelize import voxelize_face

    v, t, R = bc.posed_bfm_face(48, (0.0, 0.0, 0.0))
    ours = decode(voxelize_face(v, t, R, size=48))
    zb = bc.zbuffer_fill(v, t, R, 48)
    assert zb.shape == ours.shape == (200, 48, 48)
    assert ours.sum() > 10_000
    assert bc.iou(ours, zb) > 0.99


def test_voxelise_pair_agrees(bc, quick):
    r = _one(bc.bench_voxelise(quick))
    assert r.checks["vertices"] == 38365
    assert r.checks["iou_zbuffer"] > 0.98
    assert r.checks["ours_inside_trimesh"] > 0.99
    assert r.checks["trimesh_inside_ours_plus_1_voxel"] > 0.99
    assert r.ok
    assert set(r.alternatives) == {"numpy z-buffer fill", "trimesh voxelized(1).fill()"}


def test_bytes_pair_decodes_back(bc, quick):
    sizes, reads = bc.bench_bytes(quick)
    assert all(v is True for k, v in sizes.checks.items() if k.startswith("decodes_equal"))
    assert sizes.ok and reads.ok
    # uint8 .npy holds one byte per voxel (+ header); ours is far smaller than every alternative
    assert sizes.alternatives["uint8 .npy"] >= 200 * 48 * 48
    assert sizes.alternatives["np.packbits .npy"] >= 200 * 48 * 48 / 8
    assert all(ratio > 1 for ratio in sizes.ratios().values())


def test_train_step_losses_agree(bc, quick):
    r = _one(bc.bench_train_step(quick))
    assert r.checks["loss_abs_diff_step1"] < 1e-5
    assert r.checks["loss_abs_diff_step2"] < 1e-5
    assert 0.0 < r.checks["loss_ours"] < 5.0
    assert r.ok


def test_plain_network_same_output(bc):
    from vrn.models import create_model

    torch.manual_seed(1)
    net = create_model("vrn_tiny").eval()
    plain = bc.plain_network(net).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), plain(x), atol=1e-5)
    assert type(plain.upsample).__name__ == "_InterpolateUpsample"


def test_forward_pair_onnx_close(bc, quick):
    pytest.importorskip("onnxruntime")
    res = bc.bench_forward(quick)
    assert len(res) == 2
    for r in res:
        assert r.checks["max_abs_prob_diff"] < 1e-4
        assert r.checks["occupancy_flip_fraction"] < 1e-4
        assert r.ok


def test_mesh_pair_same_surface(bc, quick):
    r = _one(bc.bench_mesh(quick))
    assert r.checks["verts_ours"] > 1000
    assert r.checks["verts_rel_diff"] < 0.01
    assert r.checks["area_rel_diff"] < 0.01
    assert r.ok


def test_image_to_mesh_both_over_the_face(bc, quick, shared_dir):
    image = shared_dir / "data" / "images" / "AFLW_image00046.jpg"
    r = _one(bc.bench_image_to_mesh(quick, image))
    assert r.checks["faces_found"] == 1
    assert r.checks["verts_ours"] > 1000 and r.checks["verts_3ddfa"] == 38365
    assert r.checks["ours_in_face_box"] > 0.95 and r.checks["3ddfa_in_face_box"] > 0.95
    assert r.checks["xy_bbox_iou"] > 0.5
    assert r.ok


def test_cli_quick_writes_table_and_json(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--only", "bytes,mesh", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "command: python" in proc.stdout and "--only bytes,mesh" in proc.stdout
    assert "machine: " in proc.stdout and "torch_threads=1" in proc.stdout
    assert "| pair | ours | alternative |" in proc.stdout
    data = json.loads(out.read_text())
    assert data["quick"] is True
    pairs = [r["pair"] for r in data["results"]]
    assert any(p.startswith("bytes per training target") for p in pairs)
    assert any(p.startswith("marching cubes") for p in pairs)
    assert all(r["ok"] for r in data["results"])
    assert all(np.isfinite(list(r["ratios"].values())).all() for r in data["results"])


def test_cli_rejects_unknown_pair():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "nope"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 2
    assert "unknown pair(s) nope" in proc.stderr


def test_mesh_pair_leaves_out_the_border_cap(bc):
    # at full size the pitched face's solid is clipped at the volume's back: ours closes it there
    sz = bc.Sizes(crop=192, model="vrn_tiny", batch=1, repeats=1, trimesh_repeats=1)
    r = _one(bc.bench_mesh(sz))
    assert r.checks["ours_border_cap_verts"] > 0
    assert r.checks["verts_ours"] > r.checks["verts_plain"]
    assert r.checks["verts_rel_diff"] < 0.01 and r.checks["area_rel_diff"] < 0.01
    assert r.ok

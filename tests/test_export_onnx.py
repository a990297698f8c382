"""ONNX export (vrn.export) and the onnxruntime backend of Reconstructor and the demo.

Tolerances (random-weight networks, random crops; float32 on the CPU): the onnxruntime
probabilities differ from torch's by at most :data:`MAX_ABS` per voxel, and the occupancy at
0.5 differs at no more than :data:`MAX_FLIP` of the voxels (measured: ~1e-7 and 0).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from vrn.conventions import DEFAULT_LAYOUT
from vrn.export import META_LAYOUT, OnnxNetwork, export_checkpoint
from vrn.inference import Reconstructor
from vrn.models import create_model

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "images"
#: max |p_torch - p_ort| over all voxels
MAX_ABS = 1e-4
#: max fraction of voxels whose occupancy (p > 0.5) differs
MAX_FLIP = 1e-4


@pytest.fixture
def onnx_extra() -> None:
    """Skip where the ``onnx`` extra (onnx, onnxruntime) is not installed."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")


def _saved(tmp_path: Path, name: str, layout=DEFAULT_LAYOUT, **spec) -> tuple[Path, Reconstructor]:
    torch.manual_seed(0)
    net = create_model(name, **spec)
    rec = Reconstructor(net, detector=None, layout=layout, model_spec={"name": name, **spec})
    return rec.save(tmp_path / f"{name}.ckpt"), rec


def _crops(n: int, size: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "name, layout",
    [
        ("vrn_tiny", replace(DEFAULT_LAYOUT, crop_size=128, depth_bins=40, face_size=60, source_roi_px=120)),
        ("vrn_small", replace(DEFAULT_LAYOUT, depth_bins=40)),
    ],
)
def test_onnx_matches_torch(onnx_extra: None, tmp_path: Path, name: str, layout) -> None:
    ckpt, rec_torch = _saved(tmp_path, name, layout, depth_bins=layout.depth_bins)
    onnx_path = export_checkpoint(ckpt, tmp_path / f"{name}.onnx")
    rec_ort = Reconstructor.from_checkpoint(onnx_path, detector=None, batch_size=2)
    assert rec_ort.backend == "onnxruntime" and rec_ort.layout == layout
    assert rec_ort.model_spec == {"name": name, "depth_bins": layout.depth_bins}
    x = _crops(3, layout.crop_size)  # batches of 2 and 1: the batch axis is dynamic
    p_torch = rec_torch.reconstruct_crops(x).numpy()
    p_ort = rec_ort.reconstruct_crops(x).numpy()
    assert p_ort.shape == p_torch.shape == (3, layout.depth_bins, layout.crop_size, layout.crop_size)
    max_abs = float(np.abs(p_torch - p_ort).max())
    flips = float(np.mean((p_torch > 0.5) != (p_ort > 0.5)))
    assert max_abs <= MAX_ABS, f"max |p_torch - p_ort| = {max_abs:.2e}"
    assert flips <= MAX_FLIP, f"occupancy differs at {flips:.2e} of the voxels"
    assert p_torch.std() > 1e-3  # the comparison is not of two constants


def test_guided_onnx_takes_the_landmarks(onnx_extra: None, tmp_path: Path, capsys) -> None:
    """A guided network exports with a second input, the landmarks; onnxruntime matches torch,
    the landmarks change the output (the heatmaps are in the graph), and a missing one fails."""
    layout = replace(DEFAULT_LAYOUT, crop_size=64, depth_bins=16, face_size=30)
    ckpt, rec_torch = _saved(tmp_path, "vrn_tiny_guided", layout, depth_bins=16)
    with torch.no_grad():  # the heatmap inputs of a fresh guided net are random: make them count
        rec_torch.net.vrn.stem[0].weight[:, 3:] *= 20.0
    ckpt = rec_torch.save(tmp_path / "guided.ckpt")
    onnx_path = export_checkpoint(ckpt, tmp_path / "guided.onnx")
    rec_ort = Reconstructor.from_checkpoint(onnx_path, detector=None, batch_size=2)
    assert rec_ort.needs_landmarks and rec_ort.backend == "onnxruntime"
    x = _crops(3, 64)
    marks = 16.0 + 32.0 * torch.rand(3, 68, 2, generator=torch.Generator().manual_seed(2))
    marks[1, 7] = float("nan")  # a missing point renders no heatmap, in both runtimes
    p_torch = rec_torch.reconstruct_crops(x, marks).numpy()
    p_ort = rec_ort.reconstruct_crops(x, marks).numpy()
    assert float(np.abs(p_torch - p_ort).max()) <= MAX_ABS
    assert float(np.mean((p_torch > 0.5) != (p_ort > 0.5))) <= MAX_FLIP
    moved = rec_ort.reconstruct_crops(x, marks + 6.0).numpy()
    assert float(np.abs(moved - p_ort).max()) > 1e-3  # the graph reads the landmarks
    rec_ort.flip_tta = rec_torch.flip_tta = True  # mirrored landmarks go through the graph too
    np.testing.assert_allclose(
        rec_ort.reconstruct_crops(x, marks).numpy(), rec_torch.reconstruct_crops(x, marks).numpy(), atol=MAX_ABS
    )
    with pytest.raises(ValueError, match="guided by each crop's 68 landmarks"):
        rec_ort.reconstruct_crops(x)
    with pytest.raises(ValueError, match="is guided: pass each crop's 68"):
        OnnxNetwork(onnx_path)(x.numpy())
    from omegaconf import OmegaConf

    from vrn.export import run_export

    run_export(OmegaConf.create({"ckpt": str(ckpt), "out": str(tmp_path / "cli.onnx"), "check": True}))
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "max |p_torch - p_ort|" in ln)
    assert float(line.split("= ")[1].split(",")[0]) <= MAX_ABS


def test_torch_net_with_onnxruntime_backend(onnx_extra: None) -> None:
    torch.manual_seed(0)
    layout = replace(DEFAULT_LAYOUT, crop_size=64, depth_bins=16, face_size=30)
    net = create_model("vrn_tiny", depth_bins=16)
    rec = Reconstructor(
        net, detector=None, layout=layout, backend="onnxruntime", model_spec={"name": "vrn_tiny"}, flip_tta=False
    )
    assert "backend=onnxruntime" in repr(rec)
    x = _crops(2, 64)
    with torch.no_grad():
        want = torch.sigmoid(net.eval()(x)).numpy()
    np.testing.assert_allclose(rec.reconstruct_crops(x).numpy(), want, atol=MAX_ABS)
    assert net.training is False  # the exporter leaves the caller's mode alone
    with pytest.raises(ValueError, match="no torch weights"):
        rec.save("x.ckpt")
    with pytest.raises(ValueError, match="float32 only"):
        Reconstructor(net, detector=None, layout=layout, backend="onnxruntime", precision="bf16")


def _export_cli(*overrides: str) -> subprocess.CompletedProcess:
    """``python -m vrn.export <overrides>`` from the repo root."""
    return subprocess.run(
        [sys.executable, "-m", "vrn.export", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_export_cli_and_errors(onnx_extra: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = replace(DEFAULT_LAYOUT, crop_size=64, depth_bins=16, face_size=30)
    ckpt, _ = _saved(tmp_path, "vrn_tiny", layout, depth_bins=16)
    out = tmp_path / "m.onnx"
    r = _export_cli(f"ckpt={ckpt}", "format=onnx", f"out={out}")
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "max |p_torch - p_ort|" in r.stdout
    net = OnnxNetwork(out)
    assert net.layout == layout and net.model_spec["name"] == "vrn_tiny"
    # the wrong backend for an .onnx, an .onnx without vrn metadata, onnxruntime missing
    with pytest.raises(ValueError, match="backend=onnxruntime"):
        Reconstructor.from_checkpoint(out, detector=None, backend="torch")
    import onnx

    model = onnx.load(str(out))
    kept = [p for p in model.metadata_props if p.key != META_LAYOUT]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(ValueError, match="no vrn layout metadata"):
        OnnxNetwork(bare)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r'pip install "vrn\[onnx\]"'):
        OnnxNetwork(out)
    r = _export_cli(f"ckpt={ckpt}", "format=tflite", f"out={out}")
    assert r.returncode == 2 and "format=tflite is not supported" in r.stderr


# --------------------------------------------------------------------------------------
# the demo: per-image timings, and backend=onnxruntime
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slab_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vrn_tiny whose head predicts a slab (bins 90..109 occupied) for any crop (cf. tests/test_demo.py)."""
    torch.manual_seed(0)
    net = create_model("vrn_tiny")
    with torch.no_grad():
        net.head[1].weight.zero_()
        net.head[1].bias.fill_(-8.0)
        net.head[1].bias[90:110] = 8.0
    rec = Reconstructor(net, detector=None, model_spec={"name": "vrn_tiny"})
    return rec.save(tmp_path_factory.mktemp("slab") / "slab.ckpt")


@pytest.fixture(scope="module")
def two_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not IMAGES.is_dir():
        pytest.fail(f"shared images not found at {IMAGES}")
    d = tmp_path_factory.mktemp("two_photos")
    for name in ("trump_hillary.jpg", "emma.jpg"):
        (d / name).write_bytes((IMAGES / name).read_bytes())
    return d


def _demo(photos: Path, ckpt: Path, out: Path, *extra: str):
    from tests.helpers import compose_config
    from vrn.demo import run_demo

    cfg = compose_config(
        "demo",
        [
            f"input={photos}",
            f"ckpt={ckpt}",
            f"output_dir={out}",
            "detector=tddfa",
            "depth=false",
            "overlay=false",
            "turntable=false",
            *extra,
        ],
        output_dir=out,
    )
    return run_demo(cfg)


def test_demo_reports_each_images_own_time(two_photos: Path, slab_model: Path, tmp_path: Path, capsys) -> None:
    import json

    from vrn.demo import STAGES

    # nothing beside the main thread: the images' own times add up to at most the run's
    reports = _demo(two_photos, slab_model, tmp_path, "num_workers=0", "post_threads=0", "batch_size=2")
    assert [r.status for r in reports] == ["ok", "ok"]
    totals = [r.seconds for r in reports]
    for r in reports:
        assert set(r.timings) == {*STAGES, "total"} and r.timings["total"] == r.seconds
        assert all(r.timings[k] > 0 for k in STAGES), r.timings
        assert sum(r.timings[k] for k in STAGES) == pytest.approx(r.seconds)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert totals[0] != totals[1]
    assert sum(totals) <= summary["seconds"]
    assert [im["timings"]["total"] for im in summary["images"]] == totals
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(("emma.jpg:", "trump_hillary.jpg:"))]
    assert len(lines) == 2 and all(
        "detect" in ln and "network" in ln and "post" in ln and "write" in ln for ln in lines
    )
    assert f"{totals[0]:.2f} s" in lines[0] and f"{totals[1]:.2f} s" in lines[1]
    assert "s total" in out.splitlines()[-1]


def test_demo_with_onnxruntime(onnx_extra: None, two_photos: Path, slab_model: Path, tmp_path: Path) -> None:
    import trimesh

    onnx_path = export_checkpoint(slab_model, tmp_path / "slab.onnx")
    ref = _demo(two_photos, slab_model, tmp_path / "torch", "num_workers=0")
    got = _demo(two_photos, onnx_path, tmp_path / "ort", "num_workers=0")
    summary = (tmp_path / "ort" / "summary.json").read_text()
    assert '"backend": "onnxruntime"' in summary
    for a, b in zip(ref, got):
        assert [f.n_verts for f in a.faces] == [f.n_verts for f in b.faces]
        for fa, fb in zip(a.faces, b.faces):
            ma = trimesh.load(fa.files["ply"], process=False, force="mesh")
            mb = trimesh.load(fb.files["ply"], process=False, force="mesh")
            np.testing.assert_allclose(ma.vertices, mb.vertices, atol=1e-3)
    # backend=onnxruntime with a .ckpt: exported in memory
    again = _demo(two_photos, slab_model, tmp_path / "ort2", "num_workers=0", "backend=onnxruntime")
    assert [f.n_verts for r in again for f in r.faces] == [f.n_verts for r in ref for f in r.faces]


def test_export_the_shipped_model_by_name(onnx_extra: None, tmp_path: Path) -> None:
    """``ckpt=pretrained`` exports the default (guided) model, as the demo and evaluation accept it."""
    from vrn.checkpoint import DEFAULT_PRETRAINED, PRETRAINED_NETWORKS

    out = export_checkpoint("pretrained", tmp_path / "shipped.onnx")
    net = OnnxNetwork(out)
    assert net.model_spec["name"] == PRETRAINED_NETWORKS[DEFAULT_PRETRAINED]
    assert net.needs_landmarks == net.model_spec["name"].endswith("_guided")

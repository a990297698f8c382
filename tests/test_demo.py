"""The demo on the real photos of ../shared/data/images with a checkpoint trained in this
session (vrn_tiny, 2 steps on synthetic faces through the real training entry point).

A 2-step model predicts (almost) nothing, so for the file checks its checkpoint is copied
with the last convolution biased: weights 0, bias +8 on depth bins [90, 110) and -8
elsewhere. Every face then gets a slab (crop z in [45, 55]) whatever the photo, which also
gives an exact check of the z scaling; a copy biased -8 everywhere checks the "no surface"
path. The detector is tddfa (offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh

from tests.helpers import compose_config, compose_demo, tiny_train_overrides
from vrn.geometry.transforms import CropTransform

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"


@pytest.fixture(scope="module")
def trained_ckpt(synthetic_packed: Path, tmp_path_factory) -> Path:
    from vrn.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = compose_config(
        "train",
        [
            *tiny_train_overrides(synthetic_packed, "csv"),
            "callbacks=default",
            "~callbacks.volume_preview",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "test=false",
        ],
        output_dir=out,
    )
    train(cfg)
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


def _biased(src: Path, dst: Path, slab: tuple[int, int] | None) -> Path:
    state = torch.load(src, map_location="cpu", weights_only=True)
    sd = state["state_dict"]
    sd["net.head.1.weight"].zero_()
    sd["net.head.1.bias"].fill_(-8.0)
    if slab is not None:
        sd["net.head.1.bias"][slab[0] : slab[1]] = 8.0
    torch.save(state, dst)
    return dst


@pytest.fixture(scope="module")
def slab_ckpt(trained_ckpt: Path) -> Path:
    return _biased(trained_ckpt, trained_ckpt.with_name("slab.ckpt"), (90, 110))


@pytest.fixture(scope="module")
def empty_ckpt(trained_ckpt: Path) -> Path:
    return _biased(trained_ckpt, trained_ckpt.with_name("empty.ckpt"), None)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    if not IMAGES.is_dir():
        pytest.fail(f"shared images not found at {IMAGES}")
    d = tmp_path_factory.mktemp("photos")
    for name in ("trump_hillary.jpg", "grass.jpg"):
        shutil.copy(IMAGES / name, d / name)
    (d / "broken.jpg").write_text("not a jpeg")
    return d


def _demo_cfg(input_dir: Path, ckpt: Path, out: Path, *extra: str):
    return compose_demo(input_dir, ckpt, out, "turntable_frames=4", "turntable_size=96", *extra, set_output=True)


@pytest.fixture(scope="module")
def demo_run(photos: Path, slab_ckpt: Path, tmp_path_factory):
    from vrn.demo import run_demo

    out = tmp_path_factory.mktemp("demo_out")
    cfg = _demo_cfg(photos, slab_ckpt, out, "glb=true", "num_workers=1", "batch_size=1")
    return out, run_demo(cfg)


def test_demo_reports_every_image(demo_run) -> None:
    out, reports = demo_run
    by = {r.path: r for r in reports}
    assert [r.path for r in reports] == ["broken.jpg", "grass.jpg", "trump_hillary.jpg"]  # input order
    assert by["trump_hillary.jpg"].status == "ok" and len(by["trump_hillary.jpg"].faces) == 2
    assert by["grass.jpg"].status == "no_face" and by["grass.jpg"].faces == []
    assert "no face found" in by["grass.jpg"].line() and "skipped" in by["grass.jpg"].line()
    assert by["broken.jpg"].status == "unreadable" and "unreadable" in by["broken.jpg"].line()
    assert not list(out.glob("grass*")) and not list(out.glob("broken*"))
    summary = json.loads((out / "summary.json").read_text())
    assert [im["status"] for im in summary["images"]] == ["unreadable", "no_face", "ok"]


def test_demo_files_exist_and_parse(demo_run) -> None:
    from vrn.image_io import read_image_rgb

    out, reports = demo_run
    photo = read_image_rgb(IMAGES / "trump_hillary.jpg")
    (rep,) = [r for r in reports if r.path == "trump_hillary.jpg"]
    for k, face in enumerate(rep.faces):
        base = out / f"trump_hillary_face{k}"
        names = {
            "obj": ".obj",
            "ply": ".ply",
            "glb": ".glb",
            "depth": "_depth.png",
            "overlay": "_overlay.png",
            "turntable": "_turntable.gif",
        }
        for key, suffix in names.items():
            p = Path(f"{base}{suffix}")
            assert p.is_file() and face.files[key] == str(p), key
        assert face.has_surface and face.n_verts > 1000
        obj = trimesh.load(f"{base}.obj", process=False, force="mesh")
        assert len(obj.vertices) == face.n_verts and len(obj.faces) == face.n_faces
        for ext in (".ply", ".glb"):
            m = trimesh.load(f"{base}{ext}", process=False, force="mesh")
            assert len(m.vertices) == face.n_verts
            vc = np.asarray(m.visual.vertex_colors)
            assert vc.shape == (face.n_verts, 4) and vc[:, :3].std() > 5  # real photo colours, not one flat value
        ply = trimesh.load(f"{base}.ply", process=False, force="mesh")
        assert ply.is_watertight
        overlay = iio.imread(f"{base}_overlay.png")
        assert overlay.shape == photo.shape and not np.array_equal(overlay, photo)
        depth = iio.imread(f"{base}_depth.png")
        assert depth.ndim == 2 and depth.max() == 255
        gif = iio.imread(f"{base}_turntable.gif")
        assert gif.shape == (4, 96, 96, 3)
        assert not np.array_equal(gif[0], gif[1])  # it turns


def test_demo_mesh_is_in_photo_px(demo_run) -> None:
    """The slab of bins [90, 110) -> crop z in [45, 55]; x, y inside the face's crop window."""
    out, reports = demo_run
    (rep,) = [r for r in reports if r.path == "trump_hillary.jpg"]
    centres = []
    for face in rep.faces:
        m = trimesh.load(face.files["ply"], process=False, force="mesh")
        v = np.asarray(m.vertices)
        # recover the crop transform from the slab itself: x, y span the crop's footprint
        x0, y0, z0 = v.min(0)
        x1, y1, z1 = v.max(0)
        scale = 192.0 / (x1 - x0)  # the slab spans crop x in [-0.5, 191.5]
        assert (y1 - y0) == pytest.approx(x1 - x0, rel=1e-4)
        np.testing.assert_allclose([z0 * scale, z1 * scale], [45.0, 55.0], atol=1e-3)
        centres.append(((x0 + x1) / 2, (y0 + y1) / 2))
    # two faces, left (Trump) and right (Clinton) halves of the 1536 px wide photo
    assert centres[0][0] < 768 < centres[1][0]


def test_demo_no_surface(photos: Path, empty_ckpt: Path, tmp_path: Path, capsys) -> None:
    from vrn.demo import run_demo

    single = tmp_path / "in"
    single.mkdir()
    shutil.copy(photos / "trump_hillary.jpg", single)
    reports = run_demo(
        _demo_cfg(single / "trump_hillary.jpg", empty_ckpt, tmp_path / "out", "num_workers=0", "save_volume=true")
    )
    (rep,) = reports
    assert rep.status == "ok" and len(rep.faces) == 2
    assert all(not f.has_surface for f in rep.faces)
    line = capsys.readouterr().out
    assert "no surface (empty volume), nothing written" in line
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix not in (".json", ".log")) == [
        "trump_hillary_face0.vrnc",
        "trump_hillary_face1.vrnc",
    ]


def test_reconstructor_api_on_a_photo(slab_ckpt: Path) -> None:
    from vrn import Reconstructor

    rec = Reconstructor.from_checkpoint(slab_ckpt, detector="tddfa")
    faces = rec(IMAGES / "trump_hillary.jpg", keep="prob")
    assert len(faces) == 2 and faces[0].box[0] < faces[1].box[0]
    f = faces[0]
    assert f.prob.shape == (200, 192, 192) and f.crop.shape == (192, 192, 3)
    assert isinstance(f.transform, CropTransform) and f.landmarks.shape == (68, 2)
    assert 0.5 <= f.score <= 1.0 and f.colors.shape == (len(f.verts), 3)
    assert set(rec.timings) >= {"read", "detect", "crop", "network", "marching_cubes"}
    assert rec(IMAGES / "grass.jpg") == []


def test_demo_logs_meshes_to_wandb(photos: Path, slab_ckpt: Path, tmp_path: Path) -> None:
    import wandb

    from vrn.demo import run_demo

    run = wandb.init(mode="offline", dir=str(tmp_path), project="vrn-test")
    try:
        run_demo(
            _demo_cfg(
                photos / "trump_hillary.jpg",
                slab_ckpt,
                tmp_path / "out",
                "num_workers=0",
                "formats=[ply]",
                "turntable=false",
                "depth=false",
            )
        )
        run_dir = Path(run.dir)
    finally:
        wandb.finish()
    objs = list(run_dir.rglob("media/object3D/**/*.glb"))
    assert len(objs) == 2, list(run_dir.rglob("*"))
    assert not list((tmp_path / "out").glob(".wandb_meshes_*"))  # temporary y-up copies removed


@pytest.mark.slow
def test_demo_whole_image_folder(slab_ckpt: Path, tmp_path: Path) -> None:
    from vrn.demo import run_demo

    reports = run_demo(
        _demo_cfg(IMAGES, slab_ckpt, tmp_path / "out", "num_workers=2", "batch_size=4", "turntable=false")
    )
    by = {r.path: r for r in reports}
    assert len(reports) == len(list(IMAGES.glob("*.jpg")))
    assert by["grass.jpg"].status == "no_face" and len(by["trump_hillary.jpg"].faces) == 2
    assert len(by["aflw-test-grid3x3.jpg"].faces) == 9
    for r in reports:
        if r.path != "grass.jpg":
            assert r.status == "ok" and all(Path(f.files["ply"]).is_file() for f in r.faces), r.line()


def test_demo_wandb_true_starts_and_finishes_its_own_run(
    photos: Path, slab_ckpt: Path, tmp_path: Path, monkeypatch
) -> None:
    import wandb

    from vrn.demo import run_demo

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "out"
    run_demo(
        _demo_cfg(
            photos / "trump_hillary.jpg",
            slab_ckpt,
            out,
            "num_workers=0",
            "formats=[ply]",
            "turntable=false",
            "depth=false",
            "wandb=true",
        )
    )
    assert wandb.run is None  # the demo finished the run it started
    (run_dir,) = list((out / "wandb").glob("offline-run-*"))
    assert len(list(run_dir.rglob("media/object3D/**/*.glb"))) == 2
    assert not list(out.glob(".wandb_meshes_*"))

"""The shipped pretrained model: found in the package, checked by sha256, reconstructs real photos."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import compose_config
from vrn import assets
from vrn.assets import REGISTRY, AssetNotFoundError, resolve, sha256_of
from vrn.conventions import TDDFA_ROI_PX
from vrn.inference import DEFAULT_PRETRAINED, PRETRAINED_MODELS, Reconstructor

NAME = PRETRAINED_MODELS[DEFAULT_PRETRAINED]


@pytest.mark.parametrize("name", sorted(PRETRAINED_MODELS.values()))
def test_shipped_checkpoint_is_registered_small_and_matches_its_sha256(name: str) -> None:
    asset = REGISTRY[name]
    assert asset.bundled and asset.sha256 is not None
    p = resolve(name)
    assert p == assets.BUNDLED_DIR / name and p.is_file()
    assert sha256_of(p) == asset.sha256
    assert p.stat().st_size <= 10 * 1024 * 1024  # the repo ships at most 10 MB of weights


def test_from_checkpoint_takes_the_shipped_models_name() -> None:
    rec = Reconstructor.from_checkpoint("pretrained", detector=None)
    assert rec.model_spec["name"] == Reconstructor.from_pretrained(detector=None).model_spec["name"]
    assert Reconstructor.from_checkpoint("vrn_medium_aflw", detector=None).model_spec["name"] == "vrn_medium"


@pytest.fixture(scope="module")
def pretrained() -> Reconstructor:
    return Reconstructor.from_pretrained(detector="tddfa")


def test_pretrained_cuts_faces_as_its_training_crops(pretrained: Reconstructor) -> None:
    # trained on 3DDFA's 120 px AFLW crops: inference resamples each face through that ROI
    assert pretrained.layout.source_roi_px == TDDFA_ROI_PX


@pytest.mark.parametrize(("image", "n_faces"), [("emma.jpg", 3), ("trump_hillary.jpg", 2)])
def test_pretrained_reconstructs_every_face(pretrained: Reconstructor, shared_dir: Path, image: str, n_faces: int):
    faces = pretrained(shared_dir / "data" / "images" / image)
    assert len(faces) == n_faces
    for f in faces:
        assert f.has_surface and len(f.faces) > 1000
        assert np.isfinite(f.verts).all()
        # the mesh lies on its face: its vertices inside the detector's box grown by half its size,
        # and it covers the landmarks' centre
        box, xy = f.box, f.verts[:, :2]
        w, h = box[2] - box[0], box[3] - box[1]
        inside = (xy[:, 0] > box[0] - w / 2) & (xy[:, 0] < box[2] + w / 2)
        inside &= (xy[:, 1] > box[1] - h / 2) & (xy[:, 1] < box[3] + h / 2)
        assert inside.mean() > 0.95
        c = f.landmarks.mean(0)
        assert xy[:, 0].min() < c[0] < xy[:, 0].max() and xy[:, 1].min() < c[1] < xy[:, 1].max()


def test_damaged_copy_is_refused(tmp_path: Path, monkeypatch) -> None:
    bad = tmp_path / NAME
    bad.parent.mkdir(parents=True)
    shutil.copy(resolve(NAME), bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(assets, "BUNDLED_DIR", tmp_path)
    with pytest.raises(AssetNotFoundError, match="sha256"):
        resolve(NAME)


def test_demo_without_ckpt_uses_the_pretrained_model(tmp_path: Path) -> None:
    cfg = compose_config("demo", ["input=x", "detector=tddfa"], output_dir=tmp_path)
    assert cfg.ckpt is None
    rec = Reconstructor.from_run_config(cfg)
    # the default is the guided model, the best on the AFLW val split (docs/benchmarks.md)
    assert rec.model_spec["name"] == "vrn_medium_guided" and rec.needs_landmarks

"""One source of truth for the crop / volume layout (:class:`vrn.conventions.VolumeLayout`):
recorded by packed datasets and checkpoints, checked when a dataset meets a model, and used
by the Reconstructor's crop."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from vrn.checkpoint import load_network
from vrn.conventions import DEFAULT_LAYOUT, TDDFA_ROI_PX, LayoutMismatchError, VolumeLayout
from vrn.data.datamodule import PackedDataModule
from vrn.data.packed import PackedReader, PackedWriter
from vrn.detectors.base import Detection
from vrn.geometry.crop import crop_face, crop_for_layout, roi_transform
from vrn.inference import Reconstructor
from vrn.lit_module import VRNLitModule
from vrn.models import create_model
from vrn.volume.codec import encode

FACE_100 = VolumeLayout(face_size=100.0)


def _write_packed(root: Path, layout: VolumeLayout) -> Path:
    """A packed folder of one blank sample per split, written with ``layout``."""
    S, D = layout.crop_size, layout.depth_bins
    with PackedWriter(root, layout=layout) as w:
        for split in ("train", "val", "test"):
            w.add(np.zeros((S, S, 3), np.uint8), encode(np.zeros((D, S, S), bool)), {"id": split, "split": split})
    return root


def _tiny_checkpoint(path: Path, layout: VolumeLayout) -> Path:
    torch.manual_seed(0)
    rec = Reconstructor(create_model("vrn_tiny"), detector=None, model_spec={"name": "vrn_tiny"}, layout=layout)
    return rec.save(path)


def test_layout_round_trip_packed_and_checkpoint(tmp_path: Path) -> None:
    root = _write_packed(tmp_path / "packed", FACE_100)
    assert PackedReader(root).layout == FACE_100
    assert PackedDataModule(str(root)).layout == FACE_100
    path = _tiny_checkpoint(tmp_path / "face100.ckpt", FACE_100)
    _net, _spec, layout = load_network(path)
    assert layout == FACE_100
    assert Reconstructor.from_checkpoint(path, detector=None).layout == FACE_100
    # a checkpoint written before layouts were recorded loads with the default
    ckpt = torch.load(path, weights_only=True)
    del ckpt["hyper_parameters"]["layout"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert load_network(tmp_path / "old.ckpt")[2] == DEFAULT_LAYOUT
    # the training module saves it as a plain dict
    module = VRNLitModule({"name": "vrn_tiny"}, functools.partial(torch.optim.Adam), layout=FACE_100.to_dict())
    assert module.layout == FACE_100 and module.hparams["layout"] == FACE_100.to_dict()


def test_dataset_meets_model_with_another_layout(tmp_path: Path) -> None:
    root = _write_packed(tmp_path / "packed", FACE_100)
    dm = PackedDataModule(str(root), batch_size=1)
    model = VRNLitModule({"name": "vrn_tiny"}, functools.partial(torch.optim.Adam))
    assert model.layout == DEFAULT_LAYOUT
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(LayoutMismatchError, match="face_size") as e:
        trainer.fit(model, datamodule=dm)
    assert str(root) in str(e.value) and "vrn_tiny" in str(e.value)


def test_network_depth_bins_must_match_the_layout() -> None:
    with pytest.raises(LayoutMismatchError, match="depth bins"):
        VRNLitModule(
            {"name": "vrn_tiny"},
            functools.partial(torch.optim.Adam),
            layout=VolumeLayout(depth_bins=DEFAULT_LAYOUT.depth_bins // 2),
        )


class _BoxDetector:
    """One face whose 68 landmarks span a known box."""

    name = "box"

    def __init__(self, box: tuple[float, float, float, float]) -> None:
        x0, y0, x1, y1 = box
        t = np.linspace(0.0, 1.0, 68)
        self.landmarks = np.c_[x0 + (x1 - x0) * t, y0 + (y1 - y0) * t[::-1] ** 2]
        self.box = np.asarray(box, np.float64)

    def detect(self, image: np.ndarray, path: str | None = None) -> list[Detection]:
        return [Detection(self.box, 1.0, self.landmarks)]


def test_reconstructor_crops_with_the_checkpoint_layout(tmp_path: Path) -> None:
    box = (100.0, 80.0, 260.0, 300.0)
    det = _BoxDetector(box)
    image = np.zeros((400, 400, 3), np.uint8)
    for layout in (FACE_100, DEFAULT_LAYOUT):
        path = _tiny_checkpoint(tmp_path / f"{layout.face_size}.ckpt", layout)
        rec = Reconstructor.from_checkpoint(path, detector=det)
        prep = rec.detect(image)
        scale = prep.transforms[0].scale
        assert scale * math.sqrt((box[2] - box[0]) * (box[3] - box[1])) == pytest.approx(layout.face_size)
        assert prep.crops.shape == (1, layout.crop_size, layout.crop_size, 3)


# ---- source_roi_px: models trained on tight 3DDFA crops see photos the same way -----------------

ROI_120 = VolumeLayout(source_roi_px=TDDFA_ROI_PX)


def test_source_roi_px_is_recorded_but_not_a_volume_mismatch() -> None:
    assert VolumeLayout.from_dict(DEFAULT_LAYOUT.to_dict() | {"source_roi_px": 120}) == ROI_120
    # dicts written before the field existed: crops straight from the photo
    assert VolumeLayout.from_dict({"crop_size": 192}).source_roi_px == 0
    ROI_120.check_matches(DEFAULT_LAYOUT, "a", "b")  # not a volume value: no error
    with pytest.raises(LayoutMismatchError, match="face_size"):
        ROI_120.check_matches(FACE_100, "a", "b")
    with pytest.raises(ValueError, match="source_roi_px"):
        VolumeLayout(source_roi_px=-1)


def _two_colour_photo() -> tuple[np.ndarray, np.ndarray]:
    """A 600 x 600 photo: green on 3DDFA's ROI of the landmarks (and 2 px around), red beyond; landmarks."""
    lm = _BoxDetector((240.0, 230.0, 360.0, 370.0)).landmarks
    roi = roi_transform(lm, TDDFA_ROI_PX)
    image = np.zeros((600, 600, 3), np.uint8)
    image[..., 0] = 255
    x0, y0 = roi.apply_inverse(np.array([[-0.5, -0.5]]))[0]
    x1, y1 = roi.apply_inverse(np.array([[TDDFA_ROI_PX - 0.5] * 2]))[0]
    image[int(y0) - 2 : int(np.ceil(y1)) + 2, int(x0) - 2 : int(np.ceil(x1)) + 2] = (0, 255, 0)
    return image, lm


def test_crop_through_the_roi_keeps_the_crop_rule_and_hides_the_context() -> None:
    image, lm = _two_colour_photo()
    direct, t_direct = crop_face(image, lm)
    assert np.array_equal(crop_for_layout(image, lm, DEFAULT_LAYOUT)[0], direct)
    crop, t = crop_for_layout(image, lm, ROI_120)
    # the same VRN crop rule (landmark box -> face_size, centred): the transforms agree
    np.testing.assert_allclose(t.matrix, t_direct.matrix, atol=1e-9)
    assert t.apply(lm).min(0) == pytest.approx(t_direct.apply(lm).min(0))
    # the direct crop shows the red context beyond the ROI; through the ROI, the margin is the
    # small photo mirrored and blurred (green), never the context
    red = (crop[..., 0] > 128) & (crop[..., 1] < 64)
    assert (direct[..., 0] > 128).mean() > 0.3
    assert red.mean() < 0.01
    centre = crop[80:112, 80:112].reshape(-1, 3)
    assert (centre[:, 1] > 200).all() and (centre[:, 0] < 40).all()


def test_reconstructor_and_evaluation_cut_through_the_roi_for_such_a_checkpoint(tmp_path: Path) -> None:
    image, lm = _two_colour_photo()
    path = _tiny_checkpoint(tmp_path / "roi.ckpt", ROI_120)
    rec = Reconstructor.from_checkpoint(path, detector=_BoxDetector((240.0, 230.0, 360.0, 370.0)))
    assert rec.layout.source_roi_px == TDDFA_ROI_PX
    prep = rec.detect(image)
    assert np.array_equal(prep.crops[0], crop_for_layout(image, lm, ROI_120)[0])


def test_training_takes_source_roi_px_from_the_data(tmp_path: Path) -> None:
    root = _write_packed(tmp_path / "packed", ROI_120)
    model = VRNLitModule({"name": "vrn_tiny"}, functools.partial(torch.optim.Adam))
    assert model.layout.source_roi_px == 0
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=PackedDataModule(str(root), batch_size=1))
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    assert load_network(tmp_path / "fit.ckpt")[2] == ROI_120

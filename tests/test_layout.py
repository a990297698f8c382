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
from vrn.conventions import DEFAULT_LAYOUT, LayoutMismatchError, VolumeLayout
from vrn.data.datamodule import PackedDataModule
from vrn.data.packed import PackedReader, PackedWriter
from vrn.detectors.base import Detection
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

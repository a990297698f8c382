"""The AFLW preset (``--config-name aflw``) on a few real AFLW crops (../shared/data/aflw_crops,
120 x 120, 3DDFA's own regressor inputs): the whole crop is the 3DDFA_V2 ROI (``detector=tddfa_roi``),
margins filled (``crop.border=blur_reflect``), split train/val by image, AFLW2000-3D refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_pipeline.fit import load_fit_mesh
from data_pipeline.run import build_stage, run_pipeline
from data_pipeline.stage import PipelineInputError
from tests.helpers import compose_pipeline, target_surface_at_landmarks
from vrn.conventions import TDDFA_ROI_PX
from vrn.data.packed import PackedReader
from vrn.detectors.base import get_detector
from vrn.geometry.crop import crop_face, outside_mask, warp_crop
from vrn.geometry.transforms import CropTransform
from vrn.image_io import read_image_rgb

ROOT = Path(__file__).resolve().parents[1]
# frontal, ~30 deg yaw and two ~90 deg profiles (both sides), with textured backgrounds
IMAGES = ["image04378", "image04379", "image04389", "image18095", "image47504", "image58003"]


def _cfg(inp: Path, out: Path, *extra: str):
    return compose_pipeline("aflw", [f"input_dir={inp}", f"output_dir={out}", "progress=false", "n_jobs=1", *extra])


@pytest.fixture(scope="module")
def aflw(tmp_path_factory, shared_dir) -> Path:
    tmp = tmp_path_factory.mktemp("aflw")
    inp = tmp / "aflw_crops"
    inp.mkdir()
    for n in IMAGES:
        shutil.copy(shared_dir / "data" / "aflw_crops" / f"{n}.jpg", inp)
    out = tmp / "out"
    run_pipeline(_cfg(inp, out))
    return out


def _samples(out: Path, stage: str) -> list[dict]:
    return json.loads((out / stage / "manifest.json").read_text())["samples"]


def test_every_face_is_packed(aflw):
    crop = json.loads((aflw / "crop" / "manifest.json").read_text())
    assert crop["failures"] == [] and len(crop["samples"]) == len(IMAGES)  # no no_face
    assert crop["params"]["border"] == "blur_reflect" and crop["params"]["detector"]["name"] == "tddfa_roi"
    summary = json.loads((aflw / "reap" / "summary.json").read_text())
    assert summary == {"kept": len(IMAGES), "dropped": {}, "dropped_total": 0}  # no outside_image (padding)
    pads = [s["pad_fraction"] for s in crop["samples"]]
    assert max(pads) > 0.3  # the margins really are there (and filled, below)
    rec = json.loads((aflw / "crop" / crop["samples"][0]["files"]["crop_record"]).read_text())
    assert rec["border"] == "blur_reflect" and rec["score"] == 1.0


def test_split_train_val_by_image(aflw):
    reader = PackedReader(aflw / "packed")
    assert len(reader) == len(IMAGES)
    assert {r["split"] for r in reader.rows} == {"train", "val"}
    assert sum(r["split"] == "val" for r in reader.rows) == 1  # 5% of 6, at least one
    for r in reader.rows:
        assert r["subject"] == Path(r["source_image"]).stem  # one subject per image
        assert r["detector"] == "tddfa_roi"
    assert reader.meta["layout"]["crop_size"] == 192 and reader.meta["layout"]["face_size"] == 90.0
    # the photos were 3DDFA's 120 px crops: recorded, so a model trained here crops photos that way
    assert reader.layout.source_roi_px == TDDFA_ROI_PX == 120


def test_margins_are_filled(aflw, shared_dir):
    """No large constant-colour region where the crop lies outside the 120 px photo; the fill is
    blur_reflect's, the photo's own pixels unchanged."""
    reader = PackedReader(aflw / "packed")
    for i in range(len(reader)):
        s = reader[i]
        t = CropTransform.from_dict(s.row["transform"])
        out = outside_mask(t, (120, 120))
        assert out.mean() > 0.2, s.row["id"]
        px = s.image[out].astype(np.float64)
        flat = (np.abs(px - np.median(px, 0)).max(1) <= 6).mean()  # share of the modal colour
        assert flat < 0.5 and px.std(0).max() > 5.0, (s.row["id"], flat)
        src = read_image_rgb(shared_dir / "data" / "aflw_crops" / s.row["source_image"])
        again = warp_crop(src, t, border="blur_reflect")
        assert np.abs(again.astype(int) - s.image.astype(int)).mean() < 3.0  # JPEG q95 of the same crop


def test_fit_landmarks_are_the_ports(aflw):
    """The fit (3DDFA_V2 on the 192 crop) lands on the detector's (3DDFA_V2 on the 120 photo) landmarks."""
    for s in _samples(aflw, "fit"):
        rec = json.loads((aflw / "fit" / s["files"]["crop_record"]).read_text())
        mesh = load_fit_mesh(aflw / "fit", s)
        err = np.linalg.norm(mesh["landmarks"][:, :2] - np.asarray(rec["landmarks_crop"]), axis=1)
        assert err.mean() < 4.0, (s["id"], err.mean())


def test_target_front_surface_at_the_landmarks(aflw):
    """As tests/test_pipeline_e2e.py: front_depth at each landmark's pixel vs its depth d = 2 z,
    landmarks hidden by the mesh itself (far-side jaw in profile) excluded by the mesh's z-buffer."""
    # a 90 deg profile hides about half of the 68
    fracs, all_d = target_surface_at_landmarks(aflw / "voxelize", _samples(aflw, "voxelize"), min_visible=20)
    print("visible landmarks within 2 bins:", np.round(fracs, 3), "median", np.median(all_d))
    assert min(fracs) >= 0.9, fracs
    assert np.median(all_d) <= 1.0 and np.mean(all_d <= 2.0) >= 0.95


def test_tddfa_roi_detector_is_the_whole_crop(shared_dir):
    img = read_image_rgb(shared_dir / "data" / "aflw_crops" / "image18095.jpg")
    det = get_detector("tddfa_roi")
    (d,) = det(img)
    ref = det._m_tddfa.from_roi_boxes(img, [np.array([0.0, 0.0, 120.0, 120.0])])[0]
    np.testing.assert_allclose(d.landmarks, ref.pts68[:2].T, atol=1e-4)
    np.testing.assert_allclose(d.box, [*d.landmarks.min(0), *d.landmarks.max(0)])
    assert d.score == 1.0 and det.describe()["roi"] == "whole_image"
    assert get_detector("tddfa_roi", refine=True)(img)[0].landmarks.shape == (68, 2)


def test_border_modes():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (0, 0), 3)
    lm = np.array([[100.0, 120.0], [240.0, 290.0]])  # box runs off the right / bottom edges
    c0, t = crop_face(img, lm)
    assert np.array_equal(c0, crop_face(img, lm, border="constant", border_value=0)[0])  # default unchanged
    out = outside_mask(t, img.shape[:2])
    deep = cv2.erode(out.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)  # bilinear edge excluded
    assert deep.any() and (c0[deep] == 0).all()
    # shrinking path (scale < 0.75): reflect = the photo mirrored at its own edges, also on the far side
    assert t.scale < 0.75
    pad = 400
    big = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    ref = warp_crop(
        big, CropTransform.from_box(np.array([100.0 + pad, 120.0 + pad, 240.0 + pad, 290.0 + pad]), 90.0, (192, 192))
    )
    c1, _ = crop_face(img, lm, border="reflect")
    assert np.abs(c1.astype(int) - ref.astype(int)).mean() < 2.0
    c2, _ = crop_face(img, lm, border="blur_reflect")
    assert np.array_equal(c2[~out], c1[~out])  # the photo's own pixels unchanged
    assert c2[out].astype(float).std() < c1[out].astype(float).std()  # blurred outside
    c3, _ = crop_face(img, lm, border="replicate")
    assert not (c3[out] == 0).all()
    with pytest.raises(ValueError, match="border"):
        crop_face(img, lm, border="wrap")


def test_aflw2000_3d_is_refused(tmp_path, shared_dir):
    """AFLW2000-3D is for evaluation only: the aflw preset refuses its folder and its images."""
    sample = shared_dir / "data" / "aflw2000_3d_sample"
    with pytest.raises(PipelineInputError, match="evaluation only"):
        run_pipeline(_cfg(sample, tmp_path / "o1", "stages=[crop]"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(shared_dir / "data" / "aflw_crops" / "image04378.jpg", mixed)
    name = min(sample.glob("*.jpg")).stem
    for ext in (".jpg", ".mat"):
        shutil.copy(sample / f"{name}{ext}", mixed)
    with pytest.raises(PipelineInputError, match="pt3d_68"):
        run_pipeline(_cfg(mixed, tmp_path / "o2", "stages=[crop]"))
    assert not (tmp_path / "o2" / "crop" / "items").exists() or not any((tmp_path / "o2" / "crop" / "items").iterdir())
    # the default crop config does not check (300W-LP / evaluation runs use .mat folders)
    assert build_stage(_cfg(mixed, tmp_path / "o3", "crop.refuse_eval_sets=false"), "crop").refuse_eval_sets is False


def test_a_photo_of_another_size_is_skipped_with_a_reason(tmp_path, shared_dir):
    """crop.source_roi_px=120 says the photos are 120 px 3DDFA crops: a larger photo is skipped."""
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(shared_dir / "data" / "aflw_crops" / "image04378.jpg", inp)
    shutil.copy(shared_dir / "data" / "images" / "emma.jpg", inp)
    out = tmp_path / "out"
    run_pipeline(_cfg(inp, out, "stages=[crop]"))
    crop = json.loads((out / "crop" / "manifest.json").read_text())
    assert [s["source_image"] for s in crop["samples"]] == ["image04378.jpg"]
    (fail,) = crop["failures"]
    assert fail["reason"] == "not_source_roi_size" and "emma" in json.dumps(fail)
    assert crop["params"]["source_roi_px"] == 120


def test_packed_eval_through_the_detector(aflw, shared_dir):
    """``data=folder data.crop=detector``: the packed rows' source photos through the detector and
    the crop rule, ground truth mapped back to photo px through each row's transform."""
    from vrn.eval_datasets import PackedEvalDataset

    inp = aflw.parent / "aflw_crops"
    packed = PackedEvalDataset(aflw / "packed", split="all")
    ds = PackedEvalDataset(
        aflw / "packed", split="all", crop="detector", detector="tddfa", source_root=inp, source_margin=0.5
    )
    assert ds.cuts_crops and not packed.cuts_crops and len(ds) == len(IMAGES)
    port_roi = get_detector("tddfa_roi")
    n_detected = 0
    for i in range(len(ds)):
        s, p = ds[i], packed[i]
        assert s.error is None and s.id == p.id and s.gt_code is None
        m = s.info["source_margin_px"]
        assert m == 60  # 0.5 x the 120 px photo
        # the GT landmarks in photo px sit where the port put them on the 120 px source (+ the margin)
        src = read_image_rgb(inp / s.info["image"])
        (d,) = port_roi(src)
        err = np.linalg.norm(s.gt_landmarks[:, :2] - (d.landmarks + m), axis=1)
        assert err.mean() < 5.0, (s.id, err.mean())
        # depth scales with the crop: photo-px z = packed z / the row transform's scale
        scale = CropTransform.from_dict(packed.reader[i].row["transform"]).scale
        np.testing.assert_allclose(np.ptp(s.gt_verts[:, 2]), np.ptp(p.gt_verts[:, 2]) / scale, rtol=1e-9)
        assert s.crop.shape == p.crop.shape
        xy_crop = s.transform.apply(s.pred_landmarks_xy)
        assert (xy_crop > 0).all() and (xy_crop < s.crop.shape[0]).all()
        if s.landmarks_xy_from == "detector":
            n_detected += 1
            box = np.sqrt(np.prod(np.ptp(s.gt_landmarks[:, :2], axis=0)))
            assert np.linalg.norm(s.pred_landmarks_xy - s.gt_landmarks[:, :2], axis=1).mean() / box < 0.08, s.id
        else:
            assert s.info["crop"] == "gt (no face detected)"
    assert n_detected >= len(IMAGES) // 2
    with pytest.raises(ValueError, match="source_root"):
        PackedEvalDataset(aflw / "packed", split="all", crop="detector", detector="tddfa")
    with pytest.raises(ValueError, match="packed' or 'detector"):
        PackedEvalDataset(aflw / "packed", split="all", crop="gt")

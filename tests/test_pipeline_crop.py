"""Crop rule, crop resampling, detector registry and config errors of the data pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.run import STAGES, build_stage
from tests.helpers import compose_pipeline
from vrn.conventions import CROP_FACE_SIZE, CROP_SIZE
from vrn.detectors import Detection, available_detectors, get_detector
from vrn.geometry.crop import crop_face, crop_transform_for_landmarks, padding_fraction, warp_crop
from vrn.geometry.transforms import CropTransform

ROOT = Path(__file__).resolve().parents[1]


def _landmarks(rng: np.random.Generator, x0: float, y0: float, w: float, h: float) -> np.ndarray:
    p = rng.uniform([x0, y0], [x0 + w, y0 + h], size=(68, 2))
    p[0], p[1] = [x0, y0], [x0 + w, y0 + h]  # the box is exactly (x0, y0, x0 + w, y0 + h)
    return p


@pytest.mark.parametrize("w,h", [(60.0, 40.0), (300.0, 420.0), (91.0, 89.0)])
def test_crop_rule_box_is_90px_and_centred(w, h):
    rng = np.random.default_rng(0)
    lm = _landmarks(rng, 123.4, 56.7, w, h)
    t = crop_transform_for_landmarks(lm)
    c = t.apply(lm)
    bw, bh = np.ptp(c[:, 0]), np.ptp(c[:, 1])
    assert np.sqrt(bw * bh) == pytest.approx(CROP_FACE_SIZE, abs=1e-9)
    centre = (c.min(0) + c.max(0)) / 2
    np.testing.assert_allclose(centre, [(CROP_SIZE - 1) / 2] * 2, atol=1e-9)
    assert bw / bh == pytest.approx(w / h)  # no anisotropic scaling
    # round trips: points, and the serialised transform (exact)
    np.testing.assert_allclose(t.apply_inverse(c), lm, atol=1e-9)
    assert CropTransform.from_dict(t.to_dict()) == t
    p3 = np.hstack([lm, rng.normal(size=(68, 1))])
    np.testing.assert_allclose(t.apply_inverse(t.apply(p3)), p3, atol=1e-9)


def _ramp_image(H: int, W: int, xa: float, xb: float, ya: float, yb: float) -> np.ndarray:
    """R = x ramp over [xa, xb], G = y ramp over [ya, yb] (clamped outside). Linear, so
    bilinear and area resampling reproduce it exactly up to rounding."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = np.round(20 + 200 * np.clip((xx - xa) / (xb - xa), 0, 1))
    img[..., 1] = np.round(20 + 200 * np.clip((yy - ya) / (yb - ya), 0, 1))
    img[..., 2] = 128
    return img


@pytest.mark.parametrize(
    "box",
    [
        (250, 250, 274, 270),  # small face: upscaled crop
        (300, 300, 600, 700),
    ],
)  # large face: area-averaged path
def test_crop_pixels_sample_the_photo_at_the_transform(box):
    H, W = 1000, 1000
    x0, y0, x1, y1 = box
    lm = _landmarks(np.random.default_rng(1), x0, y0, x1 - x0, y1 - y0)
    t = crop_transform_for_landmarks(lm)
    # the ramps span the crop's footprint: about one grey level per crop px
    fp = t.apply_inverse(np.array([[0.0, 0.0], [CROP_SIZE - 1.0, CROP_SIZE - 1.0]]))
    (xa, ya), (xb, yb) = fp
    img = _ramp_image(H, W, xa, xb, ya, yb)
    crop, t2 = crop_face(img, lm)
    assert t2 == t
    assert crop.shape == (CROP_SIZE, CROP_SIZE, 3) and crop.dtype == np.uint8
    yy, xx = np.mgrid[0:CROP_SIZE, 0:CROP_SIZE]
    p = t.apply_inverse(np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float64))
    m = 1.5  # image px: bilinear neighbours stay on the unclamped ramp
    inside = (p[:, 0] > xa + m) & (p[:, 0] < xb - m) & (p[:, 1] > ya + m) & (p[:, 1] < yb - m)
    exp_r = 20 + 200 * (p[:, 0] - xa) / (xb - xa)
    exp_g = 20 + 200 * (p[:, 1] - ya) / (yb - ya)
    got = crop.reshape(-1, 3).astype(np.float64)
    assert inside.mean() > 0.7
    for ch, exp in ((0, exp_r), (1, exp_g)):
        err = got[inside, ch] - exp[inside]
        assert np.abs(err).max() <= 1.01
        # a systematic shift of 0.15 crop px would bias the mean by ~0.15 levels
        assert abs(err.mean()) < 0.15, err.mean()


def test_padding_fraction_and_black_border():
    img = np.full((400, 400, 3), 200, np.uint8)
    # face box centred on the photo's top-left pixel: three quarters of the crop are padding
    t = CropTransform.from_center_scale((-0.5, -0.5), 1.0)
    assert padding_fraction(t, (400, 400)) == pytest.approx(0.75, abs=0.01)
    crop = warp_crop(img, t)
    assert (crop[:90, :90] == 0).all() and (crop[100:, 100:] == 200).all()
    centred = CropTransform.from_center_scale((200, 200), 1.0)
    assert padding_fraction(centred, (400, 400)) == 0.0


def test_crop_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8 RGB"):
        crop_face(np.zeros((10, 10), np.uint8), np.zeros((68, 2)))
    with pytest.raises(ValueError, match="degenerate"):
        crop_transform_for_landmarks(np.zeros((68, 2)))


def test_detector_registry():
    assert {"tddfa", "fan", "dlib", "mat"} <= set(available_detectors())
    with pytest.raises(ValueError, match=r"Unknown detector 'nope'.*tddfa"):
        get_detector("nope")
    det = get_detector("tddfa", min_score=0.6)
    assert det.name == "tddfa" and det.min_score == 0.6 and det._m_tddfa is None  # lazy
    assert det.flip and det.refine  # the shipped guided model's input (flip-averaged, refined)
    with pytest.raises(ValueError):
        Detection(box=[0, 0, 1, 1], score=1.0, landmarks=np.zeros((5, 2)))


def test_tddfa_refines_by_default(shared_dir):
    """``tddfa`` runs the port a second time from the ROI of its first landmarks (chosen on the
    AFLW val photos, docs/benchmarks.md); ``refine=false`` keeps the one-pass landmarks."""
    from vrn.image_io import read_image_rgb

    img = read_image_rgb(shared_dir / "data" / "images" / "emma.jpg")
    det = get_detector("tddfa", flip=False)
    assert det.refine and det.describe()["refine"] is True
    one = get_detector("tddfa", refine=False, flip=False)(img)
    two = det(img)
    assert len(one) == len(two) == 3  # emma.jpg: 3 faces, the same boxes
    port = det._m_tddfa
    for a, b in zip(one, two):
        np.testing.assert_allclose(a.box, b.box)
        again = port.from_landmarks(img, a.landmarks.T)[0].pts68[:2].T
        np.testing.assert_allclose(b.landmarks, again, atol=1e-3)
        assert np.abs(b.landmarks - a.landmarks).max() > 0.5  # the second pass moved them


def test_tddfa_flip_averages_with_the_mirrored_photo(shared_dir):
    """``flip=true`` is the mean of the port's landmarks on the photo and, mirrored back, on the
    mirrored photo; on a whole-image ROI that makes them exactly mirror-equivariant."""
    from vrn.face_models.landmarks68 import mirror_landmarks
    from vrn.image_io import read_image_rgb

    img = read_image_rgb(shared_dir / "data" / "aflw_crops" / "image04378.jpg")  # a 120 px 3DDFA ROI crop
    w = img.shape[1]
    plain = get_detector("tddfa_roi")(img)[0].landmarks
    det = get_detector("tddfa_roi", flip=True)
    assert det.describe()["flip"] is True and "flip" not in get_detector("tddfa_roi").describe()
    both = det(img)[0].landmarks
    mirrored_img = np.ascontiguousarray(img[:, ::-1])
    other = get_detector("tddfa_roi")(mirrored_img)[0].landmarks
    np.testing.assert_allclose(both, (plain + mirror_landmarks(other, w)) / 2, atol=1e-4)
    assert 0.05 < np.abs(both - plain).max() < 5.0  # a small correction, not a no-op
    np.testing.assert_allclose(det(mirrored_img)[0].landmarks, mirror_landmarks(both, w), atol=1e-3)
    # tddfa (FaceBoxes): the boxes are mirrored too, each face keeps its box
    photo = read_image_rgb(shared_dir / "data" / "images" / "emma.jpg")
    one, two = get_detector("tddfa", flip=False)(photo), get_detector("tddfa")(photo)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        np.testing.assert_allclose(a.box, b.box)
        assert np.abs(b.landmarks - a.landmarks).mean() < 3.0


def test_port_landmarks_reuses_a_given_unflipped_pass(shared_dir):
    """``unflipped=``: the caller's own unmirrored pass is used as is (the port runs once, on the
    mirrored photo) and the result equals the full two-pass average; a count mismatch is named."""
    from vrn.detectors.tddfa import port_landmarks
    from vrn.face_models.tddfa_models import load_tddfa
    from vrn.image_io import read_image_rgb

    img = read_image_rgb(shared_dir / "data" / "aflw_crops" / "image04378.jpg")
    port = load_tddfa()
    box = np.array([[0.0, 0.0, img.shape[1], img.shape[0]]])
    both = port_landmarks(port, img, box, refine=False, flip=True, roi=True)
    one = port_landmarks(port, img, box, refine=False, flip=False, roi=True)

    calls = []

    class Counting:
        def from_roi_boxes(self, image, boxes):
            calls.append(image.ctypes.data)
            return port.from_roi_boxes(image, boxes)

    reused = port_landmarks(Counting(), img, box, refine=False, flip=True, roi=True, unflipped=one)
    assert len(calls) == 1 and calls[0] != img.ctypes.data  # only the mirrored photo was run
    np.testing.assert_allclose(reused[0], both[0], atol=1e-6)
    with pytest.raises(ValueError, match=r"2 unflipped landmark sets for 1 boxes"):
        port_landmarks(port, img, box, refine=False, flip=True, roi=True, unflipped=one * 2)


def test_dlib_backend_says_how_to_install():
    try:
        import dlib  # noqa: F401
        import face_recognition_models  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r'pip install "vrn\[dlib\]"'):
            get_detector("dlib")
    else:  # pragma: no cover - dlib present
        assert get_detector("dlib").name == "dlib"


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_config_errors_name_the_key(tmp_path):
    r = _run(["data_pipeline.crop", f"output_dir={tmp_path / 'o'}"], tmp_path)
    assert r.returncode == 2
    assert "input_dir is required" in r.stderr and "input_dir=" in r.stderr
    r = _run(["data_pipeline.crop", f"input_dir={tmp_path}", f"output_dir={tmp_path / 'o'}", "detector=nope"], tmp_path)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "detector/nope" in out and "tddfa" in out and "fan" in out  # Hydra lists the options
    r = _run(["data_pipeline.fit", f"input_dir={tmp_path}", f"output_dir={tmp_path / 'o2'}"], tmp_path)
    assert r.returncode == 2 and "no manifest.json" in r.stderr and "crop" in r.stderr


@pytest.mark.parametrize("name", ["crop", "fit", "voxelize", "reap", "pack", "run", "300w_lp", "aflw"])
def test_pipeline_configs_compose_and_build(name, tmp_path):
    cfg = compose_pipeline(config_name=name, overrides=[f"input_dir={tmp_path}", f"output_dir={tmp_path / 'o'}"])
    for st in STAGES:
        if st in cfg:
            stage = build_stage(cfg, st)
            assert stage.name == st
            stage.params()  # JSON-able parameters for stage.json
    if name in ("run", "300w_lp", "aflw"):
        assert list(cfg.stages) == list(STAGES)


@pytest.mark.parametrize("det", ["tddfa", "tddfa_roi", "fan", "mat"])
def test_detector_configs_build_lazily(det, tmp_path):
    cfg = compose_pipeline(
        config_name="crop", overrides=[f"detector={det}", f"input_dir={tmp_path}", f"output_dir={tmp_path / 'o'}"]
    )
    stage = build_stage(cfg, "crop")
    assert stage.detector.name == det and stage.params()["detector"]["name"] == det

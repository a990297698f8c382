"""The Surrey Face Model fit to 68 3D landmarks (vrn.face_models.sfm_fit) and fitter=sfm."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from data_pipeline.fit import SFMFitter, TDDFAFitter
from data_pipeline.run import run_pipeline
from tests.helpers import compose_pipeline
from vrn.face_models.landmarks68 import mirror_landmarks
from vrn.face_models.mat_fit import load_mat_fit
from vrn.face_models.sfm import load_sfm, load_sfm_contours
from vrn.face_models.sfm_fit import (
    fit_sfm_to_landmarks,
    sfm_landmark_vertices,
)
from vrn.geometry.crop import crop_face
from vrn.geometry.transforms import euler_to_matrix
from vrn.image_io import read_image_rgb
from vrn.volume.voxelize import solid_depth_shift, voxelize_face

ROOT = Path(__file__).resolve().parents[1]
_F = np.diag([1.0, -1.0, 1.0])


def _synthetic_targets(seed: int):
    """A random SFM face posed by a known similarity into crop px; its 50 mapped landmarks and
    16 contour targets taken at every second model-contour vertex (inner mouth corners NaN)."""
    m = load_sfm()
    rng = np.random.default_rng(seed)
    alpha = rng.standard_normal(63).astype(np.float32)
    beta = rng.uniform(0.0, 0.6, 6).astype(np.float32)
    R = euler_to_matrix(*rng.uniform(-35, 35, 3))
    s, t = 0.57, np.array([95.0, 97.0, 40.0])
    posed = s * (m.vertices(alpha, beta).astype(np.float64) @ (R @ _F).T) + t
    lv = sfm_landmark_vertices(m)
    y = np.full((68, 3), np.nan)
    y[lv >= 0] = posed[lv[lv >= 0]]
    right, left = load_sfm_contours()
    y[0:8] = posed[list(right[1:16:2])]
    y[9:17] = posed[list(left[1:16:2])]
    return m, y, posed, R, s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_a_known_synthetic_face(seed):
    m, y, posed, R, s = _synthetic_targets(seed)
    f = fit_sfm_to_landmarks(y, m, lambda_shape=1.0, lambda_expression=1.0)
    angle = np.degrees(np.arccos(np.clip((np.trace(f.R.T @ R) - 1) / 2, -1, 1)))
    assert np.linalg.det(f.R) == pytest.approx(1.0, abs=1e-9) and np.allclose(f.R @ f.R.T, np.eye(3), atol=1e-9)
    # identity and pose trade off a little (the shape basis holds scale- and tilt-like modes)
    assert angle < 1.5, angle
    assert abs(f.scale / s - 1) < 0.06, f.scale
    err = np.linalg.norm(f.verts - posed, axis=1)
    mean_face = fit_sfm_to_landmarks(y, m, lambda_shape=np.inf, lambda_expression=np.inf)
    err0 = np.linalg.norm(mean_face.verts - posed, axis=1)
    # face ~85 crop px wide: measured 0.5-1.3 px mean for the fit, 2.4-4.2 px for the posed mean face
    assert err.mean() < 1.6 and err.mean() < 0.6 * err0.mean(), (err.mean(), err0.mean())
    assert f.residual < 1.0
    # landmarks: 50 mapped + 16 contour points, inner mouth corners (61, 65 1-based) undefined
    assert f.used.sum() == 66 and not f.used[[60, 64]].any()
    assert np.isnan(f.landmarks[[60, 64]]).all() and np.isfinite(f.landmarks[f.used]).all()
    assert f.verts.dtype == np.float32 and f.tris.dtype == np.int32 and f.verts.shape == m.mean.shape


def test_fit_is_exact_for_a_posed_mean_face():
    m = load_sfm()
    R = euler_to_matrix(30.0, -10.0, 5.0)
    posed = 0.6 * (m.mean.astype(np.float64) @ (R @ _F).T) + [90.0, 100.0, 30.0]
    lv = sfm_landmark_vertices(m)
    y = np.full((68, 3), np.nan)
    y[lv >= 0] = posed[lv[lv >= 0]]
    f = fit_sfm_to_landmarks(y, m, lambda_shape=np.inf, lambda_expression=np.inf, contour=False)
    np.testing.assert_allclose(f.R, R, atol=1e-6)
    assert f.scale == pytest.approx(0.6, rel=1e-6)
    np.testing.assert_allclose(f.verts, posed, atol=1e-3)


def test_degenerate_landmarks_raise():
    m = load_sfm()
    with pytest.raises(ValueError, match="finite landmarks"):
        fit_sfm_to_landmarks(np.full((68, 3), np.nan), m)
    y = _synthetic_targets(0)[1]
    y[17:50] = np.nan  # too few left
    with pytest.raises(ValueError, match="finite landmarks"):
        fit_sfm_to_landmarks(y, m)
    with pytest.raises(ValueError, match="degenerate"):
        fit_sfm_to_landmarks(np.ones((68, 3)), m)
    with pytest.raises(ValueError, match=r"\(68, 3\)"):
        fit_sfm_to_landmarks(np.zeros((68, 2)), m)


def test_sfm_fitter_on_a_real_aflw2000_face(shared_dir):
    img = shared_dir / "data" / "aflw2000_3d_sample" / "image00050.jpg"
    gt = np.asarray(load_mat_fit(img.with_suffix(".mat"))["pt3d_68"], np.float64)[:2].T - 1.0
    crop, T = crop_face(read_image_rgb(img), gt)
    fitter = SFMFitter()
    r = fitter.fit(crop, T.apply(gt), {}, None)
    assert r.bfm_source == "sfm_3448" and r.dense_model == "sfm_fit_to_tddfa_landmarks"
    m = load_sfm()
    lv = sfm_landmark_vertices(m)
    ok = lv >= 0
    d = np.linalg.norm(r.verts[lv[ok]] - r.landmarks[ok], axis=1)  # 3D, same frame (the port's z)
    assert d.mean() < 3.0 and np.median(d) < 3.0, (d.mean(), np.median(d))
    assert np.linalg.det(r.R) == pytest.approx(1.0, abs=1e-6)
    # the port's landmarks are the ones TDDFAFitter gives on the same crop
    base = super(SFMFitter, fitter).fit(crop, T.apply(gt), {}, None)
    np.testing.assert_allclose(r.landmarks, base.landmarks, atol=1e-4)
    # voxelises like the BFM targets: a solid, the visible surface inside the volume
    verts = r.verts.astype(np.float64)
    verts[:, 2] += solid_depth_shift(verts, r.tris, r.R)
    code = voxelize_face(verts.astype(np.float32), r.tris, r.R)
    occupied = int((code.hi > code.lo).sum())
    assert occupied > 3000, occupied
    assert int((code.hi == code.depth_bins).sum()) < 0.01 * occupied  # the front is not clipped


def test_sfm_fitter_flip_fits_the_mirror_averaged_landmarks(shared_dir):
    img = shared_dir / "data" / "aflw2000_3d_sample" / "image00050.jpg"
    gt = np.asarray(load_mat_fit(img.with_suffix(".mat"))["pt3d_68"], np.float64)[:2].T - 1.0
    crop, T = crop_face(read_image_rgb(img), gt)
    lm = T.apply(gt)
    flipped = SFMFitter(flip=True)
    r = flipped.fit(crop, lm, {}, None)
    assert flipped.params()["flip"] is True and "flip" not in SFMFitter().params()
    assert r.dense_model == "sfm_fit_to_tddfa_landmarks+flip_mean"
    # the landmarks the SFM took are the port's flip average (fitter=tddfa flip=true's), not one pass
    np.testing.assert_allclose(
        r.landmarks, TDDFAFitter(flip=True, smooth_standin=False).fit(crop, lm, {}, None).landmarks, atol=1e-4
    )
    one = SFMFitter().fit(crop, lm, {}, None)
    assert np.abs(r.landmarks[:, :2] - one.landmarks[:, :2]).mean() > 0.05
    # a flip average is mirror-symmetric: the mirrored crop gives the mirrored landmarks (x, y)
    w = crop.shape[1]
    m = flipped.fit(np.ascontiguousarray(crop[:, ::-1]), mirror_landmarks(lm[:, :2], w), {}, None)
    np.testing.assert_allclose(mirror_landmarks(m.landmarks, w)[:, :2], r.landmarks[:, :2], atol=1e-3)
    # and the SFM mesh follows them as closely as the one-pass fit follows its own
    lv = sfm_landmark_vertices(load_sfm())
    ok = lv >= 0
    d = np.linalg.norm(r.verts[lv[ok]] - r.landmarks[ok], axis=1)
    assert d.mean() < 3.0, d.mean()


def test_fitter_config_and_pickling():
    cfg = compose_pipeline(config_name="fit", overrides=["fitter=sfm"])
    f = instantiate(cfg.fitter)
    assert isinstance(f, SFMFitter) and f.params()["name"] == "sfm" and "smooth_standin" not in f.params()
    assert f.params()["lambda_shape"] == 30.0
    f.setup()
    g = pickle.loads(pickle.dumps(f))
    assert g._tddfa is None and g._sfm is None and g.params() == f.params()


def test_pipeline_with_fitter_sfm(tmp_path, shared_dir):
    inp = tmp_path / "in"
    inp.mkdir()
    for p in (shared_dir / "data" / "aflw2000_3d_sample").glob("image00050*"):
        os.symlink(p, inp / p.name)
    cfg = compose_pipeline(
        config_name="run",
        overrides=[
            f"input_dir={inp}",
            f"output_dir={tmp_path / 'out'}",
            "n_jobs=1",
            "progress=false",
            "detector=mat",
            "fitter=sfm",
            "stages=[crop,fit,voxelize]",
        ],
    )
    run_pipeline(cfg)
    man = json.loads((tmp_path / "out" / "voxelize" / "manifest.json").read_text())
    assert len(man["samples"]) == 1, man["failures"]
    s = man["samples"][0]
    assert s["fit_source"] == "sfm" and s["bfm_source"] == "sfm_3448"
    assert s["dense_model"] == "sfm_fit_to_tddfa_landmarks"
    assert s["occupied_columns"] > 3000 and s["clip_front"] < 0.01

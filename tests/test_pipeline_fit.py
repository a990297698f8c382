"""fit fitter=300wlp on the real AFLW2000-3D / 300W-LP samples, and the dense-model helpers."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from data_pipeline.fit import load_fit_mesh, topology_file
from data_pipeline.run import run_pipeline
from data_pipeline.stage import npz_bytes
from vrn.face_models.bfm import load_dense_bfm, rotation_to_crop_frame, spread_landmark_displacement
from vrn.face_models.mat_fit import angles_to_matrix_3ddfa, mat_annotation, mat_landmarks
from vrn.geometry.transforms import CropTransform
from vrn.volume.voxelize import solid_depth_shift

ROOT = Path(__file__).resolve().parents[1]
PIPE_CONF = ROOT / "conf" / "pipeline"
_F = np.diag([1.0, -1.0, 1.0])


def compose_pipeline(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(PIPE_CONF)):
        return compose(config_name=name, overrides=overrides)


def _mats(shared_dir: Path) -> list[Path]:
    return sorted((shared_dir / "data" / "aflw2000_3d_sample").glob("*.mat")) + sorted(
        (shared_dir / "data" / "300w_lp_sample").glob("*.mat")
    )


def test_mat_fit_reproduces_the_mat_landmarks(shared_dir):
    errs = {}
    for p in _mats(shared_dir):
        mat = sio.loadmat(str(p))
        H = 450
        fit = mat_landmarks(mat, H)[:, :2]
        ann = mat_annotation(mat)
        d = np.linalg.norm(fit - ann, axis=1)
        errs[p.stem] = (d.mean(), d[17:].mean())
    aflw = {k: v for k, v in errs.items() if k.startswith("image")}
    assert len(aflw) == 6
    for k, (all68, _) in aflw.items():
        assert all68 < 2.0, (k, all68)  # pt3d_68: measured 0.86 .. 1.74 px
    assert np.mean([v[0] for v in aflw.values()]) < 1.5
    # 300W-LP's pt2d follows the VISIBLE jaw contour (44 deg yaw here) while the model's
    # contour landmarks are fixed vertices: 8.6 px over 68 points, 4.0 px over the 51 inner ones
    all68, inner = errs["IBUG_image_008_1_0"]
    assert inner < 5.0 and all68 < 10.0


def test_rotation_from_pose_para_poses_the_frontal_face(shared_dir):
    """posed landmarks (image frame, y down) = s * R_crop @ (F @ model) + t, exactly."""
    bfm = load_dense_bfm(None, "offline_standin")
    for p in _mats(shared_dir):
        mat = sio.loadmat(str(p))
        a_s, a_e = mat["Shape_Para"].ravel()[:40], mat["Exp_Para"].ravel()[:10]
        model = bfm.shape(a_s, a_e, dense=False).astype(np.float64)  # (3, 68)
        posed = mat_landmarks(mat, 450)  # (68, 3) image px
        pose = mat["Pose_Para"].ravel()
        R = rotation_to_crop_frame(angles_to_matrix_3ddfa(*pose[:3]))
        assert np.linalg.det(R) == pytest.approx(1.0, abs=1e-6) and np.allclose(R @ R.T, np.eye(3), atol=1e-6)
        pred = pose[6] * (R @ (_F @ model)).T
        np.testing.assert_allclose(posed - posed.mean(0), pred - pred.mean(0), atol=1e-3)


def test_spread_standin_is_smooth_and_exact_at_landmarks():
    bfm = load_dense_bfm(None, "offline_standin")
    rng = np.random.default_rng(0)
    a_s, a_e = rng.normal(size=40) * 2e5, rng.normal(size=10) * 2
    dense = spread_landmark_displacement(bfm, a_s, a_e)
    lms = bfm.shape(a_s, a_e, dense=False)
    np.testing.assert_allclose(dense[:, bfm.landmark_vertices], lms, atol=1e-2 * np.abs(lms).max() * 1e-3)
    # no spikes: neighbours of a landmark vertex move nearly as much as it does
    naive = bfm.shape(a_s, a_e, dense=True)
    mean = bfm.u.reshape(-1, 3).T
    tri = bfm.tri
    lv = int(bfm.landmark_vertices[30])  # nose tip
    nb = np.unique(tri[(tri == lv).any(1)])
    nb = nb[nb != lv]
    move_lm = np.linalg.norm(lms[:, 30] - mean[:, lv])
    assert move_lm > 0
    assert np.linalg.norm(naive[:, nb] - mean[:, nb], axis=0).max() == 0  # the stand-in's spikes
    assert np.linalg.norm(dense[:, nb] - mean[:, nb], axis=0).min() > 0.5 * move_lm


def test_user_supplied_bfm_pkl_is_loaded(tmp_path, shared_dir):
    with np.load(shared_dir / "assets" / "3ddfa_v2" / "bfm_noneck_v3_offline.npz") as z:
        d = {k: z[k] for k in z.files}
    p = tmp_path / "bfm_noneck_v3.pkl"
    with open(p, "wb") as f:
        pickle.dump(d, f)
    bfm = load_dense_bfm(p)
    assert bfm.source == "bfm_noneck_v3" and bfm.n_vertices == 38365 and bfm.tri.shape[1] == 3
    with pytest.raises(FileNotFoundError, match="bfm_path"):
        load_dense_bfm(tmp_path / "missing.pkl")


@pytest.fixture(scope="module")
def lp_run(tmp_path_factory, shared_dir):
    """The 300w_lp preset (detector=mat, fitter=300wlp) on the 6 AFLW2000-3D + 1 300W-LP samples."""
    root = tmp_path_factory.mktemp("lp")
    inp = root / "in"
    (inp / "AFLW2000").mkdir(parents=True)
    (inp / "IBUG").mkdir()
    for p in (shared_dir / "data" / "aflw2000_3d_sample").glob("image*"):
        os.symlink(p, inp / "AFLW2000" / p.name)
    for p in (shared_dir / "data" / "300w_lp_sample").glob("*"):
        os.symlink(p, inp / "IBUG" / p.name)
    cfg = compose_pipeline("300w_lp", [f"input_dir={inp}", f"output_dir={root / 'out'}", "n_jobs=1", "progress=false"])
    assert cfg.detector._target_.endswith("MatLandmarks") and cfg.fitter._target_.endswith("MatFitter")
    run_pipeline(cfg)
    return inp, root / "out"


def test_300wlp_fit_stage_lands_on_the_mat_landmarks(lp_run):
    inp, out = lp_run
    man = json.loads((out / "fit" / "manifest.json").read_text())
    assert man["counts"]["samples"] == 7 and not man["failures"]
    for s in man["samples"]:
        assert s["fit_source"] == "300wlp" and s["bfm_source"] == "offline_standin"
        mesh = load_fit_mesh(out / "fit", s)
        t = CropTransform.from_dict(s["transform"])
        back = t.apply_inverse(mesh["landmarks"].astype(np.float64))[:, :2]
        ann = mat_annotation(sio.loadmat(str((inp / s["source_image"]).with_suffix(".mat"))))
        err = np.linalg.norm(back - ann, axis=1)
        if s["source_image"].startswith("AFLW2000"):
            assert err.mean() < 2.0, (s["id"], err.mean())
        else:
            assert err[17:].mean() < 5.0
        lm = mesh["landmarks"]
        # z toward the camera: the nose tip is in front of the eye corners
        assert lm[30, 2] > lm[[36, 39, 42, 45], 2].mean() + 5
        v = mesh["verts"]
        # placed per the convention (solid centred, visible surface kept inside): idempotent
        assert abs(solid_depth_shift(v, mesh["tris"], mesh["R"])) < 1e-3
        assert v[:, 2].max() <= 99.75 + 1e-3


def test_fit_items_share_one_topology_file(lp_run, tmp_path):
    _, out = lp_run
    man = json.loads((out / "fit" / "manifest.json").read_text())
    names = {s["files"]["topology"] for s in man["samples"]}
    assert len(names) == 1 and sorted(p.name for p in (out / "fit" / "topology").iterdir()) == [Path(*names).name]
    s = man["samples"][0]
    with np.load(out / "fit" / s["files"]["mesh"]) as z:
        assert "tris" not in z.files  # the triangles are not repeated per item
    mesh = load_fit_mesh(out / "fit", s)
    assert mesh["tris"].dtype == np.int32 and mesh["tris"].shape[1] == 3
    assert mesh["tris"].max() == len(mesh["verts"]) - 1
    # the name is the content's: the same triangles name the same file, others another
    assert topology_file(mesh["tris"])[0] == s["files"]["topology"]
    assert topology_file(mesh["tris"][::-1])[0] != s["files"]["topology"]
    # the done-record lists the shared file, so a resume checks it is there
    rec = json.loads((out / "fit" / "done" / f"{s['id']}.json").read_text())
    assert s["files"]["topology"] in rec["files"]
    # items written before shared topology files (tris inside the .npz) still load
    (tmp_path / "items").mkdir()
    (tmp_path / "items" / "old.npz").write_bytes(npz_bytes(**mesh))
    old = load_fit_mesh(tmp_path, {"files": {"mesh": "items/old.npz"}})
    assert np.array_equal(old["tris"], mesh["tris"]) and np.array_equal(old["verts"], mesh["verts"])
    (tmp_path / "items" / "bad.npz").write_bytes(npz_bytes(verts=mesh["verts"]))
    with pytest.raises(FileNotFoundError, match="no triangles"):
        load_fit_mesh(tmp_path, {"files": {"mesh": "items/bad.npz"}})


def test_300wlp_preset_packs(lp_run):
    _, out = lp_run
    meta = json.loads((out / "packed" / "meta.json").read_text())
    summary = json.loads((out / "reap" / "summary.json").read_text())
    assert meta["num_samples"] == summary["kept"] >= 4
    rows = [json.loads(x) for x in (out / "packed" / "manifest.jsonl").read_text().splitlines()]
    ibug = [r for r in rows if "IBUG" in r["id"]]
    assert all(r["detector"] == "mat" and r["fit_source"] == "300wlp" for r in rows)
    assert all(r["subject"] == "IBUG_image_008" for r in ibug)


def test_user_supplied_face3d_bfm_mat_is_reduced_to_the_no_neck_mesh(tmp_path, shared_dir):
    """A face3d-style BFM.mat (53,215 vertices, 1-based kpt_ind) built from the v1 files:
    its landmarks must come out exactly where the offline model puts them."""
    a = shared_dir / "assets"
    mu_s = np.load(a / "3ddfa_v1" / "u_shp.npy").astype(np.float32)
    mu_e = np.load(a / "3ddfa_v1" / "u_exp.npy").astype(np.float32)
    kp_rows = np.load(a / "3ddfa_v1" / "keypoints_sim.npy").astype(np.int64)
    off = load_dense_bfm(None, "offline_standin")
    n = mu_s.shape[0]
    shape_pc = np.zeros((n, 40), np.float32)
    exp_pc = np.zeros((n, 10), np.float32)
    shape_pc[kp_rows] = off.w_shp_base
    exp_pc[kp_rows] = off.w_exp_base
    p = tmp_path / "BFM.mat"
    sio.savemat(
        str(p),
        {
            "model": {
                "shapeMU": mu_s,
                "expMU": mu_e,
                "shapePC": shape_pc,
                "expPC": exp_pc,
                "kpt_ind": (kp_rows[0::3] // 3 + 1).reshape(1, -1).astype(np.float64),
            }
        },
        do_compression=True,
    )
    bfm = load_dense_bfm(p)
    assert bfm.source == "bfm_full_mat" and bfm.n_vertices == 38365
    np.testing.assert_array_equal(bfm.landmark_vertices, off.landmark_vertices)
    rng = np.random.default_rng(0)
    a_s, a_e = rng.normal(size=40) * 1e5, rng.normal(size=10)
    np.testing.assert_allclose(bfm.shape(a_s, a_e, dense=False), off.shape(a_s, a_e, dense=False), rtol=1e-4, atol=1.0)
    np.testing.assert_allclose(bfm.u, off.u, rtol=1e-5, atol=1e-2)  # v1 mean + expression mean = v2 mean


def test_tddfa_fitter_flip_is_the_mean_with_the_mirrored_crop(shared_dir):
    """``fitter.flip=true``: the fit of the crop averaged with the fit of the mirrored crop,
    mirrored back (landmarks by the 68-point mirror order, vertices by the mean face's mirror
    vertex, z onto the fit's, rotations mirrored and averaged); mirror-equivariant as a result."""
    from data_pipeline.fit import TDDFAFitter
    from vrn.face_models.bfm import mirror_vertex_order
    from vrn.face_models.landmarks68 import LANDMARK_MIRROR, mirror_landmarks
    from vrn.geometry.crop import crop_face
    from vrn.image_io import read_image_rgb

    img = shared_dir / "data" / "aflw2000_3d_sample" / "image00050.jpg"
    gt = np.asarray(sio.loadmat(str(img.with_suffix(".mat")))["pt3d_68"], np.float64)[:2].T - 1.0
    crop, T = crop_face(read_image_rgb(img), gt)
    lm = T.apply(gt)
    w = crop.shape[1]
    plain = TDDFAFitter()
    flipped = TDDFAFitter(flip=True)
    assert flipped.params()["flip"] is True and "flip" not in plain.params()
    one = plain.fit(crop, lm, {}, None)
    both = flipped.fit(crop, lm, {}, None)
    assert both.dense_model == one.dense_model + "+flip_mean"
    assert both.verts.shape == one.verts.shape and np.array_equal(both.tris, one.tris)
    # by hand: the mirrored crop's landmarks mirrored back, z onto the fit's, averaged
    mirrored_crop = np.ascontiguousarray(crop[:, ::-1])
    other = plain.fit(mirrored_crop, mirror_landmarks(lm, w), {}, None)
    back = np.asarray(other.landmarks, np.float64)[LANDMARK_MIRROR].copy()
    back[:, 0] = (w - 1) - back[:, 0]
    back[:, 2] += np.mean(one.landmarks[:, 2] - back[:, 2])
    np.testing.assert_allclose(both.landmarks, (one.landmarks + back) / 2, atol=1e-4)
    assert 0.05 < np.abs(both.landmarks - one.landmarks)[:, :2].max() < 5.0  # a small correction
    # the dense mesh follows: its landmark vertices sit at the averaged landmarks
    lv = plain._tddfa.bfm.landmark_vertices
    assert np.abs(both.verts[lv] - both.landmarks).max() < 1e-3
    np.testing.assert_allclose(both.R @ both.R.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(both.R) == pytest.approx(1.0)
    # mirror equivariance: the flip fit of the mirrored crop is the mirror of this one
    m = flipped.fit(mirrored_crop, mirror_landmarks(lm, w), {}, None)
    expect = np.asarray(both.landmarks, np.float64)[LANDMARK_MIRROR].copy()
    expect[:, 0] = (w - 1) - expect[:, 0]
    d = np.asarray(m.landmarks, np.float64) - expect
    np.testing.assert_allclose(d[:, :2], 0.0, atol=1e-3)
    np.testing.assert_allclose(d[:, 2], d[:, 2].mean(), atol=1e-3)  # up to the depth origin
    F = np.diag([-1.0, 1.0, 1.0])
    np.testing.assert_allclose(m.R, F @ both.R @ F, atol=1e-6)
    # the mirror vertex map: the landmark vertices exactly, almost everywhere an involution
    order = mirror_vertex_order(plain._tddfa.bfm)
    np.testing.assert_array_equal(order[lv], lv[LANDMARK_MIRROR])
    assert np.mean(order[order] == np.arange(len(order))) > 0.95

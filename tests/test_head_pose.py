"""Head pose and 68 3D landmarks (vrn.geometry.head_pose, vrn.face_models.template,
vrn.pose_landmarks) and where they surface (FaceResult, the demo's summary.json and overlay,
the evaluation's pose rows).

The computation alone is checked on ground-truth volumes: Surrey Face Model faces with a
random identity and expression (the synthetic generator's distribution), posed with a known
rotation and voxelised exactly as the generator does; the fit uses the SFM mean face (the
generator's frame) and the faces' own 2D landmarks. Real data: the 3DDFA_V2 port's pose vs
AFLW2000-3D's ``Pose_Para`` (the Euler convention), and the fit on the ground-truth volume of
AFLW2000-3D faces (the crop transform and the BFM template)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import GroundTruthNet
from vrn import inference
from vrn.aflw_benchmark import pose_errors
from vrn.assets import AssetNotFoundError
from vrn.demo_writer import face_outputs, write_face
from vrn.detectors.base import Detection
from vrn.eval_datasets import AFLW2000Dataset
from vrn.evaluate import score_sample
from vrn.face_models.bfm import rotation_to_crop_frame
from vrn.face_models.mat_fit import angles_to_matrix_3ddfa, load_mat_fit
from vrn.face_models.sfm import load_sfm
from vrn.face_models.tddfa_models import load_tddfa
from vrn.face_models.template import load_template
from vrn.geometry.head_pose import (
    pose_angles_from_rotation,
    rotation_angle_deg,
    rotation_from_pose_angles,
    similarity_fit,
)
from vrn.geometry.transforms import CropTransform, euler_to_matrix
from vrn.image_io import read_image_rgb
from vrn.inference import PreparedImage, Reconstructor
from vrn.pose_landmarks import estimate_pose_landmarks, surface_depth_from_map
from vrn.render import draw_pose_landmarks
from vrn.volume.codec import decode
from vrn.volume.voxelize import solid_depth_shift, voxelize_face

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE = SHARED / "aflw2000_3d_sample"
IDENTITY = CropTransform(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))


def _wrap(d: np.ndarray) -> np.ndarray:
    return np.abs((np.asarray(d) + 180.0) % 360.0 - 180.0)


def _gt_face(yaw: float, pitch: float, roll: float, seed: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An SFM face (random identity N(0,1) clipped at 3, each of the 6 expressions at
    U(0, 0.8) with probability 0.35: the generator's settings) posed with
    ``euler_to_matrix(yaw, pitch, roll)`` and voxelised as in vrn.data.synthetic.

    Returns:
        (D, H, W) bool GT volume, (3, 3) crop-frame rotation, (68, 3) crop px landmarks (NaN unmapped).
    """
    m = load_sfm()
    rng = np.random.default_rng(seed)
    alpha = np.clip(rng.standard_normal(m.shape_basis.shape[1]), -3, 3).astype(np.float32)
    e = m.expression_basis.shape[1]
    beta = (rng.uniform(0, 0.8, e) * (rng.random(e) < 0.35)).astype(np.float32)
    v = m.vertices(alpha, beta)
    s = 0.55
    R = euler_to_matrix(yaw, pitch, roll)
    posed = ((v - v.mean(0)) * np.array([s, -s, s], np.float32)) @ R.T
    ids = np.array([m.landmarks.get(i, -1) for i in range(1, 69)])
    lm = posed[ids[ids >= 0]]
    c = (lm[:, :2].min(0) + lm[:, :2].max(0)) / 2
    posed = (posed + np.array([95.5 - c[0], 95.5 - c[1], solid_depth_shift(posed, m.tris, R)])).astype(np.float32)
    lms = np.full((68, 3), np.nan)
    lms[ids >= 0] = posed[ids[ids >= 0]]
    return decode(voxelize_face(posed, m.tris, R)), R, lms


def _synthetic_set(yaws: tuple[int, ...], per_yaw: int) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for yaw in yaws:
        for k in range(per_yaw):
            rng = np.random.default_rng([7, yaw, k])
            sign = 1 if k % 2 else -1
            vol, R, lms = _gt_face(sign * yaw, rng.uniform(-20, 20), rng.uniform(-15, 15), [yaw, k])
            out.append((yaw, vol, R, lms))
    return out


# --------------------------------------------------------------------------------------
# conventions and the fit's building blocks
# --------------------------------------------------------------------------------------


def test_euler_round_trip_and_pose_para_convention() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        p, y, r = rng.uniform(-170, 170), rng.uniform(-89, 89), rng.uniform(-170, 170)
        R = rotation_from_pose_angles(p, y, r)
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(R), 1.0)
        assert np.allclose(pose_angles_from_rotation(R), (p, y, r), atol=1e-9)
        # the same rotation as the .mat code path (3DDFA's angle2matrix, radians, y up) in the crop frame
        Rm = angles_to_matrix_3ddfa(*np.radians([p, y, r]))
        assert np.allclose(R, rotation_to_crop_frame(Rm), atol=1e-12)
        assert np.allclose(pose_angles_from_rotation(Rm, model_frame=True), (p, y, r), atol=1e-9)
    # signs as documented: yaw + turns the nose to -x, pitch + to -y (up), roll + turns x toward +y
    assert rotation_from_pose_angles(0, 30, 0)[0, 2] < -0.4
    assert rotation_from_pose_angles(30, 0, 0)[1, 2] < -0.4
    assert rotation_from_pose_angles(0, 0, 30)[1, 0] > 0.4
    # gimbal lock: the rotation is kept even though the split into pitch / roll is not unique
    R = rotation_from_pose_angles(20, 90, 10)
    assert np.allclose(rotation_from_pose_angles(*pose_angles_from_rotation(R)), R, atol=1e-9)


def test_similarity_fit_recovers_a_similarity() -> None:
    rng = np.random.default_rng(1)
    src = rng.normal(size=(40, 3))
    R = rotation_from_pose_angles(12, -40, 7)
    dst = 2.5 * src @ R.T + np.array([3.0, -1.0, 8.0])
    fit = similarity_fit(src, dst)
    assert np.isclose(fit.scale, 2.5) and np.allclose(fit.R, R) and np.allclose(fit.apply(src), dst)
    # weights: a wrong pair with weight 0 changes nothing
    bad = dst.copy()
    bad[0] += 50
    w = np.ones(40)
    w[0] = 0
    assert np.allclose(similarity_fit(src, bad, w).R, R)
    assert rotation_angle_deg(similarity_fit(src, bad).R, R) > 0.1


def test_surface_depth_from_map_bilinear_nearest_and_empty() -> None:
    fd = np.full((5, 5), -1.0, np.float32)
    fd[1:4, 1:3] = [[9, 19], [9, 19], [9, 19]]  # z = 5 in column 1, 10 in column 2 (depth_factor 2)
    z = surface_depth_from_map(fd, np.array([[1.5, 2.0], [1.0, 1.0], [2.5, 2.0], [4.0, 4.0], [np.nan, 1.0]]), 2.0)
    assert np.isclose(z[0], 7.5) and np.isclose(z[1], 5.0)  # bilinear; exactly on a column centre
    assert np.isclose(z[2], 10.0)  # only the left columns are occupied: the nearest one
    assert np.isnan(z[3]) and np.isnan(z[4])


def test_templates_face_the_camera() -> None:
    for name in ("bfm", "sfm"):
        t = load_template(name)
        nose = t.landmarks[30]
        assert nose[2] == pytest.approx(np.nanmax(t.landmarks[:, 2]), abs=1e-6)  # the nose tip is the front
        assert (t.normals[:, 2] > 0).mean() > 0.8
        assert t.landmarks[8, 1] > t.landmarks[27, 1]  # the chin below the nose bridge (y down)
    assert np.isnan(load_template("sfm").landmarks[:8]).all()


def test_pose_errors_canonicalise_and_wrap() -> None:
    gt = np.array(pose_angles_from_rotation(rotation_from_pose_angles(10, 30, -5)))
    same = np.array([10 - 180, 180 - 30, -5 - 180])  # the other Euler triple of the same rotation
    e = pose_errors(same, gt, "x")
    assert e["bench_pose_mean_x"] == pytest.approx(0.0, abs=1e-9) and e["bench_pose_rotation_x"] < 1e-5
    e = pose_errors(np.array([12.0, 27.0, -5.0]), gt, "x")
    assert e["bench_pose_yaw_x"] == pytest.approx(3.0) and e["bench_pose_pitch_x"] == pytest.approx(2.0)
    assert 2.0 < e["bench_pose_rotation_x"] < 5.0
    assert pose_errors(None, gt, "x")["bench_pose_yaw_x"] is None


# --------------------------------------------------------------------------------------
# the computation on ground-truth volumes of synthetic faces
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_faces() -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    return _synthetic_set((0, 15, 30, 45, 60, 75, 90), 4)


def _fit_errors(face: tuple[int, np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, float, object]:
    _yaw, vol, R, lms = face
    res = estimate_pose_landmarks(vol, IDENTITY, lms[:, :2], load_template("sfm"))
    assert res is not None
    err = _wrap(np.array([res.pose.pitch, res.pose.yaw, res.pose.roll]) - np.array(pose_angles_from_rotation(R)))
    return err, rotation_angle_deg(R, res.pose.rotation), res


def test_pose_from_gt_volume_within_5_degrees_up_to_60_yaw(synthetic_faces) -> None:
    """Measured (4 faces per yaw; pitch U(-20, 20), roll U(-15, 15) in the generator's order):
    per-angle mean absolute error <= 2.6 deg up to 60 yaw (worst single angle 5.3 deg, one face
    at 60; worst rotation error 4.0 deg); beyond, stated: 75 yaw MAE pitch / yaw / roll 6.8 /
    1.1 / 5.6 deg (rotation error <= 5.3 deg: near |yaw| 90 pitch and roll trade off), 90 yaw
    rotation error up to 25 deg (gimbal lock: the Euler angles say nothing there)."""
    lines = []
    for yaw in sorted({f[0] for f in synthetic_faces}):
        errs = [_fit_errors(f) for f in synthetic_faces if f[0] == yaw]
        e = np.array([x[0] for x in errs])  # (n, 3) pitch, yaw, roll
        geo = np.array([x[1] for x in errs])
        lines.append(
            f"yaw {yaw:2d}: MAE pitch/yaw/roll {e.mean(0).round(2)}, worst angle {e.max():.2f}, "
            f"worst geodesic {geo.max():.2f}"
        )
        if yaw <= 60:
            assert (e.mean(0) < 5.0).all(), lines[-1]  # the criterion: mean absolute error per angle
            assert e.max() < 7.0 and geo.max() < 6.0, lines[-1]  # and no face far off
        elif yaw <= 75:
            assert geo.max() < 15.0, lines[-1]
        else:
            assert geo.max() < 40.0, lines[-1]
    print("\n".join(lines))


def test_landmarks_on_the_surface_and_hidden_from_the_template(synthetic_faces) -> None:
    """x, y are the detector's exactly; visible landmarks take z from the surface: |z - true z|
    / landmark box size, measured up to 60 yaw: median <= 0.003, 95th percentile <= 0.031, max
    0.081 (points on steep slopes); hidden ones the fitted mean face's z: max 0.17. At 60 yaw
    some landmark is hidden."""
    for face in synthetic_faces:
        yaw, _vol, _R, lms = face
        if yaw > 60:
            continue
        _, _, res = _fit_errors(face)
        ok = np.isfinite(lms[:, 0])
        assert np.array_equal(res.landmarks_3d[ok, :2], lms[ok, :2])
        size = float(np.sqrt(np.prod(np.ptp(lms[ok, :2], axis=0))))
        vis = ok & res.visible
        assert vis.sum() >= 20  # of the 50 the SFM maps
        dz = np.abs(res.landmarks_3d[vis, 2] - lms[vis, 2]) / size
        assert np.median(dz) < 0.01 and np.percentile(dz, 95) < 0.05 and dz.max() < 0.12, dz.round(3)
        hid = ok & ~res.visible
        if hid.any():  # hidden: the fitted mean face's z, a coarser estimate
            assert np.abs(res.landmarks_3d[hid, 2] - lms[hid, 2]).max() < 0.25 * size
        if yaw == 60:  # something of the far side is hidden
            assert hid.any()


def test_empty_volume_gives_none() -> None:
    vol = np.zeros((200, 192, 192), bool)
    assert estimate_pose_landmarks(vol, IDENTITY, np.full((68, 2), 96.0)) is None
    with pytest.raises(ValueError, match="68, 2"):
        estimate_pose_landmarks(vol, IDENTITY, np.zeros((5, 2)))


# --------------------------------------------------------------------------------------
# real data: the Euler convention against Pose_Para, and the fit on AFLW2000-3D GT volumes
# --------------------------------------------------------------------------------------


def test_port_pose_matches_pose_para_on_aflw2000_sample() -> None:
    """The 3DDFA_V2 port's camera, decomposed with our convention, against the .mat Pose_Para
    (crops from the GT landmarks). Measured on the 6 faces: MAE yaw 3.1, pitch 3.4, roll 2.2
    deg (the port's own error; image00251 at -55 yaw is the worst, ~11 deg). The transposed
    rotation (the other convention one might pick) is off by tens of degrees."""
    port = load_tddfa()
    errs, errs_t = [], []
    for jpg in sorted(SAMPLE.glob("*.jpg")):
        mat = load_mat_fit(jpg.with_suffix(".mat"))
        gt = np.degrees(np.asarray(mat["Pose_Para"], np.float64).ravel()[:3])
        res = port.from_landmarks(read_image_rgb(jpg), np.asarray(mat["pt3d_68"])[:2] - 1.0)[0]
        R = res.R.astype(np.float64)
        errs.append(_wrap(np.array(pose_angles_from_rotation(R, model_frame=True)) - gt))
        errs_t.append(_wrap(np.array(pose_angles_from_rotation(R.T, model_frame=True)) - gt))
    e, et = np.array(errs), np.array(errs_t)
    assert len(e) == 6
    assert (e.mean(0) < 5.0).all() and e.max() < 15.0, e.round(1)
    assert et.mean() > 3 * e.mean(), (e.mean(), et.mean())


def test_fit_on_aflw2000_gt_volumes_matches_pose_para() -> None:
    """The whole image-px path on real faces, through the evaluation's scoring: the GT volume
    of each .mat fit (offline stand-in mesh, posed by Pose_Para, voxelised in the VRN crop from
    the GT landmarks) as the prediction, the BFM mean face fitted with the GT landmarks' x, y.
    Measured on the 6 faces: MAE pitch / yaw / roll 0.86 / 0.58 / 0.57 deg, worst 2.3; the
    fit's hidden-point handling lowers the 68-landmark 3D NME (jaw points hidden at 66 yaw)."""
    ds = AFLW2000Dataset(SAMPLE, bfm_path="standin", crop="gt", benchmark=False)
    errs, nme, nme_fit = [], [], []
    for i in range(len(ds)):
        s = ds[i]
        s.gt_verts = None  # skip the dense surface NME: not checked here, and the slow part
        row = score_sample(s, decode(s.gt_code).astype(np.float32))
        assert row["pose_gt_deg"] == pytest.approx(list(s.pose_deg), abs=0.01) and row["bench_pose_yaw_port"] is None
        assert row["bench_pose_mean_gtvol"] == pytest.approx(row["bench_pose_mean_vrn"])  # prediction = GT volume
        errs.append([row["bench_pose_pitch_vrn"], row["bench_pose_yaw_vrn"], row["bench_pose_roll_vrn"]])
        nme.append(row["nme_lmk_3d"])
        nme_fit.append(row["nme_lmk_3d_fit"])
    e = np.array(errs)
    print("AFLW2000-3D sample, GT volumes: MAE pitch/yaw/roll", e.mean(0).round(2), "max", e.max().round(2))
    print("68-lmk NME 3D: surface z", np.round(nme, 4), "fit", np.round(nme_fit, 4))
    assert (e.mean(0) < 3.0).all() and e.max() < 8.0, e.round(2)
    assert np.mean(nme_fit) < np.mean(nme)


# --------------------------------------------------------------------------------------
# FaceResult, the demo's summary.json and overlay
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def posed_face_in_photo() -> tuple[Reconstructor, PreparedImage, np.ndarray, np.ndarray]:
    """A GT face volume behind a rotated, scaled crop of a 300x400 photo (image px != crop px)."""
    vol, R, lms = _gt_face(35.0, 10.0, 5.0, [3, 1])
    T = CropTransform.from_center_scale((210.0, 140.0), 0.8, 15.0)
    lm_img = T.apply_inverse(np.nan_to_num(lms[:, :2], nan=95.5))
    lm_img[~np.isfinite(lms[:, 0])] = np.nan
    photo = np.full((300, 400, 3), 90, np.uint8)
    det = Detection(box=np.r_[np.nanmin(lm_img, 0), np.nanmax(lm_img, 0)], score=1.0, landmarks=lm_img)
    prep = PreparedImage(photo, [det], np.zeros((1, 192, 192, 3), np.uint8), [T])
    rec = Reconstructor(GroundTruthNet(vol), detector=None)
    rec.pose_template = "sfm"
    # the image-frame rotation: the crop's in-plane rotation Q undone, R_image = Q^T R_crop
    A = T.matrix[:, :2] / T.scale
    Q = np.eye(3)
    Q[:2, :2] = A
    return rec, prep, Q.T @ R, vol


def test_face_result_carries_pose_and_landmarks(posed_face_in_photo) -> None:
    rec, prep, R_image, _vol = posed_face_in_photo
    (face,) = rec.reconstruct_prepared(prep, keep=None)
    assert face.pose is not None and face.landmarks_3d.shape == (68, 3) and face.landmarks_visible.dtype == bool
    assert rotation_angle_deg(face.pose.rotation, R_image) < 4.0
    gt = np.array(pose_angles_from_rotation(R_image))
    assert (_wrap(np.array([face.pose.pitch, face.pose.yaw, face.pose.roll]) - gt) < 5.0).all()
    ok = np.isfinite(prep.detections[0].landmarks[:, 0])
    assert np.allclose(face.landmarks_3d[ok, :2], prep.detections[0].landmarks[ok])
    assert "pose" in face.timings
    rec.pose_template = None  # switched off: no fit, no fields
    (plain,) = rec.reconstruct_prepared(prep, keep=None)
    rec.pose_template = "sfm"
    assert plain.pose is None and plain.landmarks_3d is None


def test_missing_template_file_switches_the_fit_off(posed_face_in_photo, monkeypatch, caplog) -> None:
    rec, prep, _R, _vol = posed_face_in_photo

    def missing(*args: object, **kwargs: object) -> None:
        raise AssetNotFoundError("3ddfa_v2/bfm_noneck_v3_offline.npz: not found")

    monkeypatch.setattr(inference, "estimate_pose_landmarks", missing)
    try:
        (face,) = rec.reconstruct_prepared(prep, keep=None)
        assert face.has_surface and face.pose is None and rec.pose_template is None
        assert "switched off" in caplog.text
    finally:
        rec.pose_template = "sfm"


def test_demo_writer_json_and_overlay(posed_face_in_photo, tmp_path: Path) -> None:
    rec, prep, R_image, vol = posed_face_in_photo
    prob = vol.astype(np.float32)
    cfg = {"formats": [], "depth": False, "overlay": True, "turntable": False, "draw_landmarks": True}
    out = write_face(rec, prep, 0, prob, face_outputs(tmp_path, "p", 0, cfg), cfg)
    row = json.loads(json.dumps(asdict(out, dict_factory=lambda kv: {k: v for k, v in kv if k != "mesh"})))
    assert set(row["pose"]) >= {"yaw", "pitch", "roll", "rotation"}
    assert abs(row["pose"]["yaw"] - pose_angles_from_rotation(R_image)[1]) < 5.0
    assert len(row["landmarks_3d"]) == 68 and len(row["landmarks_visible"]) == 68
    drawn = read_image_rgb(out.files["overlay"])
    cfg_plain = {**cfg, "draw_landmarks": False}
    plain_out = write_face(rec, prep, 0, prob, face_outputs(tmp_path / "plain", "p", 0, cfg_plain), cfg_plain)
    plain = read_image_rgb(plain_out.files["overlay"])
    assert drawn.shape == plain.shape and (drawn != plain).any(1).sum() > 30  # dots and axes drawn
    off = write_face(rec, prep, 0, prob, {}, {"pose_landmarks": False})
    assert off.pose is None and off.landmarks_3d is None


def test_draw_pose_landmarks_marks_the_landmarks() -> None:
    img = np.zeros((300, 300, 3), np.uint8)
    i = np.arange(68)
    lm = np.c_[20.0 + 30 * (i % 9), 20.0 + 30 * (i // 9), np.zeros(68)]  # nose tip (30) at (110, 110)
    vis = i % 2 == 0
    out = draw_pose_landmarks(img, lm, vis, rotation_from_pose_angles(0, 0, 0))
    assert tuple(out[20, 20]) == (60, 255, 60)  # landmark 0 visible: green
    assert tuple(out[20, 50]) == (255, 60, 60)  # landmark 1 hidden: red
    assert out[110, 170, 0] > 200 and out[110, 170, 1] < 100  # the face's x axis (red) toward +x
    assert out[170, 110, 1] > 200 and out[170, 110, 0] < 100  # its y axis (green) toward +y
    assert img.sum() == 0  # the input is not modified

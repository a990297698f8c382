"""Tests of our 3DDFA_V2 port (tddfa_v2): detector counts, parity with upstream
reference outputs, landmark accuracy on AFLW2000-3D samples, dense reconstruction.

Needs the shared assets (``VRN_ASSETS_DIR``, e.g. ``../shared/assets``) and the shared
data folder next to them; skipped when the data folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io as sio

from tddfa_v2 import (
    TDDFA,
    FaceBoxesDetector,
    build_regressor,
    decompose_camera,
    load_landmark_basis_v1,
    load_param_stats,
    nms,
    prior_boxes,
    roi_box_from_landmarks,
    similar_transform,
)
from vrn.assets import AssetNotFoundError, available, resolve
from vrn.face_models.bfm import load_bfm
from vrn.face_models.tddfa_models import load_faceboxes, load_tddfa

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    assets = os.environ.get("VRN_ASSETS_DIR")
    if assets:
        return Path(assets).expanduser().resolve().parent
    return (REPO.parent / "shared").resolve()


SHARED = _shared_dir()
IMAGES = SHARED / "data" / "images"
AFLW = SHARED / "data" / "aflw2000_3d_sample"
REFERENCE = AFLW / "reference_3ddfa_v2_mb05.npz"
SAMPLES = ("image00050", "image00081", "image00251", "image00430", "image00475", "image00514")

pytestmark = pytest.mark.skipif(
    not (REFERENCE.is_file() and IMAGES.is_dir() and available("3ddfa_v2/mb05_120x120.pth")),
    reason="shared 3DDFA_V2 data/assets not available (set VRN_ASSETS_DIR=../shared/assets)",
)

EXPECTED_FACES = {"trump_hillary.jpg": 2, "aflw-test-grid3x3.jpg": 9, "emma.jpg": 3, "grass.jpg": 0}


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return np.ascontiguousarray(bgr[..., ::-1])


def _nme(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean 2D point-to-point error / sqrt(w * h) of the GT landmark bounding box."""
    w = gt[0].max() - gt[0].min()
    h = gt[1].max() - gt[1].min()
    return float(np.linalg.norm(pred[:2] - gt[:2], axis=0).mean() / np.sqrt(w * h))


# --------------------------------------------------------------------------------------
# fixtures: models and data loaded once per module
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector() -> FaceBoxesDetector:
    return FaceBoxesDetector(resolve("3ddfa_v2/FaceBoxesProd.pth"), device="cpu")


@pytest.fixture(scope="module")
def tddfa() -> TDDFA:
    return TDDFA(
        resolve("3ddfa_v2/mb05_120x120.pth"),
        resolve("3ddfa_v2/param_mean_std_62d_120x120.pkl"),
        load_bfm("auto"),
        arch="mb05",
        device="cpu",
    )


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def param_std() -> np.ndarray:
    return load_param_stats(resolve("3ddfa_v2/param_mean_std_62d_120x120.pkl"))[1]


@pytest.fixture(scope="module")
def samples(detector, tddfa) -> dict[str, dict]:
    """Per AFLW2000-3D sample: image, GT landmarks, detector box, results from both crops."""
    out = {}
    for name in SAMPLES:
        img = _read_rgb(AFLW / f"{name}.jpg")
        gt = sio.loadmat(str(AFLW / f"{name}.mat"))["pt3d_68"].astype(np.float32)
        boxes = detector(img)
        fb = tddfa(img, boxes[:1, :4])
        gtc = tddfa.from_landmarks(img, gt[:2])
        out[name] = {"img": img, "gt": gt, "boxes": boxes, "fb": fb, "gtc": gtc}
    return out


# --------------------------------------------------------------------------------------
# 1. detector
# --------------------------------------------------------------------------------------


def test_faceboxes_face_counts(detector):
    files = sorted(IMAGES.glob("*.jpg"))
    assert len(files) >= 5
    got = {}
    for f in files:
        dets = detector(_read_rgb(f))
        assert dets.dtype == np.float32 and dets.ndim == 2 and dets.shape[1] == 5
        assert np.all(dets[:, 4] > 0.5)
        assert np.all(np.diff(dets[:, 4]) <= 0), "detections must be sorted by score"
        got[f.name] = len(dets)
    print("\nFaceBoxes counts:", got)
    expected = {f.name: EXPECTED_FACES.get(f.name, 1) for f in files}
    assert got == expected


def test_faceboxes_threshold_is_configurable():
    img = _read_rgb(IMAGES / "trump_hillary.jpg")
    strict = FaceBoxesDetector(resolve("3ddfa_v2/FaceBoxesProd.pth"), score_threshold=0.99999)
    assert len(strict(img)) < 2


def test_prior_boxes_layout():
    pri = prior_boxes((64, 96))
    # level 1: 2x3 cells x 21 anchors, levels 2 and 3: one cell-row x (2 or 1) cells
    assert pri.shape == (2 * 3 * 21 + 1 * 2 + 1 * 1, 4)
    # first cell: 16 densified 32-px anchors (y outer, x inner) at quarter-step offsets
    np.testing.assert_allclose(pri[:4, 0] * 96, [0, 8, 16, 24], atol=1e-4)
    np.testing.assert_allclose(pri[4, :2] * [96, 64], [0, 8], atol=1e-4)
    np.testing.assert_allclose(pri[:16, 2] * 96, 32, atol=1e-4)
    np.testing.assert_allclose(pri[20, :4] * [96, 64, 96, 64], [16, 16, 128, 128], atol=1e-4)


def test_nms_inclusive_iou():
    dets = np.array(
        [[0, 0, 9, 9, 0.9], [1, 1, 10, 10, 0.8], [20, 20, 29, 29, 0.7], [0, 0, 9, 9, 0.95]],
        dtype=np.float32,
    )
    keep = nms(dets, 0.3)
    assert keep.tolist() == [3, 2]
    assert nms(np.zeros((0, 5), np.float32), 0.3).shape == (0,)


# --------------------------------------------------------------------------------------
# 2. parity with upstream
# --------------------------------------------------------------------------------------


def test_parity_with_upstream(samples, reference, param_std):
    errs = {"box": 0.0, "fb_roi": 0.0, "fb_param": 0.0, "fb_pts": 0.0, "gt_roi": 0.0, "gt_param": 0.0, "gt_pts": 0.0}
    for name, s in samples.items():
        assert len(s["boxes"]) == 1, name
        box_err = np.abs(s["boxes"][0, :4] - reference[f"{name}_fb_box"][:4]).max()
        errs["box"] = max(errs["box"], box_err)
        assert abs(s["boxes"][0, 4] - reference[f"{name}_fb_box"][4]) < 1e-3
        for tag, res in (("fb", s["fb"][0]), ("gt", s["gtc"][0])):
            errs[f"{tag}_roi"] = max(errs[f"{tag}_roi"], np.abs(res.roi_box - reference[f"{name}_{tag}_roi"]).max())
            errs[f"{tag}_param"] = max(
                errs[f"{tag}_param"],
                np.abs((res.param - reference[f"{name}_{tag}_param"]) / param_std).max(),
            )
            errs[f"{tag}_pts"] = max(errs[f"{tag}_pts"], np.abs(res.pts68 - reference[f"{name}_{tag}_pts68"]).max())
    print("\nparity max abs errors:", {k: f"{float(v):.2e}" for k, v in errs.items()})
    assert errs["box"] <= 1.0
    assert errs["fb_roi"] <= 1.0 and errs["gt_roi"] <= 1e-3
    assert errs["fb_param"] <= 1e-3 and errs["gt_param"] <= 1e-3
    assert errs["fb_pts"] <= 0.1 and errs["gt_pts"] <= 0.1


def test_gt_roi_matches_upstream_landmark_rule(reference):
    for name in SAMPLES:
        gt = sio.loadmat(str(AFLW / f"{name}.mat"))["pt3d_68"]
        np.testing.assert_allclose(roi_box_from_landmarks(gt[:2]), reference[f"{name}_gt_roi"], atol=1e-3)


# --------------------------------------------------------------------------------------
# 3. accuracy against ground truth
# --------------------------------------------------------------------------------------


def test_nme_against_ground_truth(samples, reference):
    nme_fb, nme_gt, ref_fb, ref_gt = [], [], [], []
    print("\n68-pt 2D NME (/sqrt(w*h) of GT box):  image    FaceBoxes crop   GT crop")
    for name, s in samples.items():
        a = _nme(s["fb"][0].pts68, s["gt"])
        b = _nme(s["gtc"][0].pts68, s["gt"])
        nme_fb.append(a)
        nme_gt.append(b)
        ref_fb.append(_nme(reference[f"{name}_fb_pts68"], s["gt"]))
        ref_gt.append(_nme(reference[f"{name}_gt_pts68"], s["gt"]))
        print(f"  {name}   {100 * a:6.3f}%   {100 * b:6.3f}%")
    m_fb, m_gt = float(np.mean(nme_fb)), float(np.mean(nme_gt))
    print(
        f"  mean         {100 * m_fb:6.3f}%   {100 * m_gt:6.3f}%   "
        f"(upstream reference: {100 * np.mean(ref_fb):.3f}% / {100 * np.mean(ref_gt):.3f}%)"
    )
    assert m_fb <= 0.034
    assert m_gt <= 0.031
    # the port and the upstream reference agree on the metric itself
    assert abs(m_fb - np.mean(ref_fb)) < 1e-4 and abs(m_gt - np.mean(ref_gt)) < 1e-4


# --------------------------------------------------------------------------------------
# 4. dense reconstruction, pose
# --------------------------------------------------------------------------------------


def test_dense_reconstruction(samples, tddfa):
    res = samples["image00050"]["fb"][0]
    dense = res.dense()
    assert dense.shape == (3, 38365) and dense.dtype == np.float32
    tri = res.tri
    assert tri.shape == (76073, 3) and tri.dtype == np.int32
    assert tri.min() == 0 and tri.max() == dense.shape[1] - 1
    assert res.bfm_source in ("bfm_noneck_v3", "offline_standin")
    assert res.bfm_source == tddfa.bfm_source
    expected_src = "bfm_noneck_v3" if available("3ddfa_v2/bfm_noneck_v3.pkl") else "offline_standin"
    assert res.bfm_source == expected_src

    lm = dense[:, tddfa.bfm.landmark_vertices]
    # x, y identical; z is shifted to a zero minimum per point set, so equal up to a constant
    np.testing.assert_allclose(lm[:2], res.pts68[:2], atol=1e-3)
    dz = lm[2] - res.pts68[2]
    assert np.ptp(dz) < 1e-3 and dz[0] >= -1e-3  # dense min z <= landmark min z
    # the dense mesh lies inside the image-sized neighbourhood of the landmarks
    assert dense[0].min() > res.roi_box[0] - 50 and dense[0].max() < res.roi_box[2] + 50

    if res.bfm_source == "offline_standin":
        # away from the landmarks the stand-in is the posed mean face
        mean_only = res.param.copy()
        mean_only[12:] = 0.0
        sr = mean_only[:12].reshape(3, 4)
        mean_face = tddfa.bfm.u.reshape(-1, 3).T
        posed = sr[:, :3] @ mean_face + sr[:, 3:]
        ref = similar_transform(posed, res.roi_box)
        mask = np.ones(dense.shape[1], bool)
        mask[tddfa.bfm.landmark_vertices] = False
        np.testing.assert_allclose(dense[:2, mask], ref[:2, mask], atol=1e-3)


def test_landmark_basis_matches_v1_files(tddfa):
    u, ws, we = load_landmark_basis_v1(
        resolve("3ddfa_v1/u_base.txt"), resolve("3ddfa_v1/w_shp_base.txt"), resolve("3ddfa_v1/w_exp_base.txt")
    )
    bfm = tddfa.bfm
    np.testing.assert_allclose(u, bfm.u_base, atol=1e-5 * np.abs(bfm.u_base).max())
    np.testing.assert_allclose(ws, bfm.w_shp_base, atol=1e-6)
    np.testing.assert_allclose(we, bfm.w_exp_base, atol=1e-6)
    assert load_bfm("auto") is bfm  # cached: one copy of the bases per process


def test_adapter_builds_the_same_model(samples, tddfa):
    """vrn's adapter (registry paths) gives the same regressor, stats and cached BFM."""
    adapted = load_tddfa(arch="mb05", device="cpu")
    assert adapted.bfm is tddfa.bfm
    np.testing.assert_array_equal(adapted.param_mean, tddfa.param_mean)
    np.testing.assert_array_equal(adapted.param_std, tddfa.param_std)
    s = samples["image00050"]
    res = adapted(s["img"], s["boxes"][:1, :4])[0]
    np.testing.assert_array_equal(res.param, s["fb"][0].param)


def test_rotation_and_scale(samples):
    for _name, s in samples.items():
        res = s["fb"][0]
        R = res.R
        assert R.shape == (3, 3) and R.dtype == np.float32
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-4)
        assert abs(np.linalg.det(R) - 1.0) < 1e-4
        cam = res.param[:12].reshape(3, 4)
        # upstream's P2sRt matrix: rows 0, 1 are the normalised camera rows
        s_up, R_up = decompose_camera(cam, orthonormal=False)
        assert s_up == res.scale
        np.testing.assert_allclose(
            R_up[:2] * np.linalg.norm(cam[:2, :3], axis=1, keepdims=True), cam[:2, :3], rtol=1e-5, atol=1e-9
        )
        np.testing.assert_allclose(R, R_up, atol=2e-2)  # ours: its nearest rotation
        np.testing.assert_allclose(res.offset, cam[:, 3])
        assert res.param.shape == (62,) and res.param.dtype == np.float32
        assert res.pts68.shape == (3, 68) and res.pts68.dtype == np.float32
        assert res.roi_box.shape == (4,)
    # frontal-ish AFLW sample: small rotation about the optical axis
    R = samples["image00050"]["fb"][0].R
    assert R[2, 2] > 0.8


# --------------------------------------------------------------------------------------
# errors and edge cases
# --------------------------------------------------------------------------------------


def test_bad_images_raise_value_error(detector, tddfa):
    gray = np.zeros((32, 48), np.uint8)
    rgba = np.zeros((32, 48, 4), np.uint8)
    floaty = np.zeros((32, 48, 3), np.float32)
    box = np.array([[0, 0, 20, 20]], np.float32)
    for bad in (gray, rgba, floaty):
        with pytest.raises(ValueError, match=r"\(32, 48"):
            detector(bad)
        with pytest.raises(ValueError, match=r"\(32, 48"):
            tddfa(bad, box)


def test_no_faces_gives_empty_list(detector, tddfa):
    img = _read_rgb(IMAGES / "grass.jpg")
    boxes = detector(img)
    assert boxes.shape == (0, 5)
    assert tddfa(img, boxes[:, :4]) == []


def test_box_partly_outside_image_is_padded(tddfa):
    img = _read_rgb(AFLW / "image00050.jpg")
    res = tddfa(img, np.array([[-100.0, -80.0, 150.0, 200.0]]))[0]
    assert np.isfinite(res.pts68).all()


def test_missing_asset_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("VRN_OFFLINE", "1")
    # the adapters: registry errors
    with pytest.raises(AssetNotFoundError):
        load_tddfa(arch="mb05", checkpoint=tmp_path / "nope.pth")
    with pytest.raises(AssetNotFoundError):
        load_faceboxes(weights=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="unknown arch"):
        load_tddfa(arch="mb3")
    if not available("3ddfa_v2/mb1_120x120.pth"):
        monkeypatch.setenv("VRN_CACHE_DIR", str(tmp_path))
        with pytest.raises(AssetNotFoundError):
            load_tddfa(arch="mb1")
    # the port itself: plain paths, plain FileNotFoundError
    stats = resolve("3ddfa_v2/param_mean_std_62d_120x120.pkl")
    with pytest.raises(FileNotFoundError):
        TDDFA(tmp_path / "nope.pth", stats, load_bfm("auto"))
    with pytest.raises(FileNotFoundError):
        FaceBoxesDetector(tmp_path / "nope.pth")


def test_mobilenet_architectures():
    import torch

    for arch, width_params in (("mb05", 0.5), ("mb1", 1.0)):
        net = build_regressor(arch).eval()
        assert net.fc.in_features == int(1024 * width_params)
        with torch.no_grad():
            assert net(torch.zeros(2, 3, 120, 120)).shape == (2, 62)
    # mb05 architecture matches the upstream checkpoint exactly (fc_param -> fc, fc_lm unused)
    ckpt = torch.load(resolve("3ddfa_v2/mb05_120x120.pth"), map_location="cpu", weights_only=True)
    keys = {k.replace("module.", "").replace("fc_param.", "fc.") for k in ckpt["state_dict"]}
    keys = {k for k in keys if not k.startswith("fc_lm.")}
    assert keys == set(build_regressor("mb05").state_dict())

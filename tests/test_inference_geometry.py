"""The inference post-processing alone, exactly: the network is replaced by the ground-truth
volume of synthetic faces (vrn.data.synthetic.render_sample) pasted into bigger photos with
a known crop transform; the mesh that comes out in photo px must sit on the true surface.
Also: the Reconstructor API around it (batches, precision, checkpoints, empty volumes)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from tests.helpers import GroundTruthNet
from vrn.checkpoint import load_network, resolve_checkpoint
from vrn.conventions import DEFAULT_LAYOUT, DEPTH_BINS, VolumeLayout
from vrn.data.synthetic import SyntheticFaceConfig, render_sample
from vrn.detectors.base import Detection
from vrn.geometry.transforms import CropTransform
from vrn.inference import (
    PreparedImage,
    Reconstructor,
    sample_vertex_colors,
    volume_to_image_mesh,
)
from vrn.models import create_model
from vrn.volume.codec import decode


def _paste(crop: np.ndarray, T: CropTransform, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A photo of size hw whose pixels inside the crop's footprint come from ``crop`` via T."""
    H, W = hw
    bg = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    return cv2.warpAffine(
        crop, T.matrix, (W, H), dst=bg, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_TRANSPARENT
    )


def _crop_to_photo(p: np.ndarray, centre: tuple[float, float], scale: float, angle_deg: float) -> np.ndarray:
    """Independent of CropTransform: the paste's inverse written out. Crop (x, y, z) ->
    photo: rotate by -angle about the crop centre, divide by scale, move to ``centre``; z / scale."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    q = p[:, :2] - 95.5
    rot = np.stack([c * q[:, 0] + s * q[:, 1], -s * q[:, 0] + c * q[:, 1]], 1)  # Rot(-a)
    return np.c_[rot / scale + np.asarray(centre), p[:, 2] / scale]


def _voxel_boundary_points(vol: np.ndarray, depth_factor: float = 2.0) -> np.ndarray:
    """The true surface of a voxel solid, crop px: the midpoint between every pair of
    face-adjacent voxel centres with different occupancy (outside the volume = empty)."""
    v = np.pad(vol, 1).astype(np.int8)
    pts = []
    for ax in range(3):
        idx = np.argwhere(np.diff(v, axis=ax) != 0).astype(np.float64)  # pair (i, i + 1) along ax
        idx[:, ax] += 0.5
        idx -= 1.0  # padding
        d, r, c = idx.T
        pts.append(np.stack([c, r, (d + 0.5) / depth_factor], 1))
    return np.concatenate(pts)


CASES = [
    # seed, crop px per photo px, rotation (deg), photo (H, W), face centre in the photo (x, y)
    (0, 0.5, 0.0, (480, 640), (300.0, 220.0)),  # face magnified 2x in the photo
    (1, 1.6, 0.0, (300, 420), (150.3, 140.7)),  # face smaller than the crop
    (2, 0.8, 12.0, (420, 520), (260.0, 200.0)),  # rotated crop
]


@pytest.fixture(scope="module")
def faces() -> dict[int, tuple[np.ndarray, object, dict]]:
    return {seed: render_sample(SyntheticFaceConfig(), np.random.default_rng([4, seed])) for seed, *_ in CASES}


@pytest.mark.parametrize("seed,scale,angle,hw,centre", CASES)
def test_gt_volume_mesh_lands_on_the_true_surface_in_the_photo(faces, seed, scale, angle, hw, centre) -> None:
    crop, code, meta = faces[seed]
    vol = decode(code)
    T = CropTransform.from_center_scale(centre, scale, angle)
    rng = np.random.default_rng(seed)
    photo = _paste(crop, T, hw, rng)
    rec = Reconstructor(GroundTruthNet(vol), detector=None, flip_tta=False)
    det = Detection(
        box=np.r_[T.apply_inverse(np.array([[0.0, 0.0], [191.0, 191.0]])).ravel()],
        score=1.0,
        landmarks=np.zeros((68, 2)),
    )
    prep = PreparedImage(photo, [det], crop[None], [T])
    (face,) = rec.reconstruct_prepared(prep, keep="code")
    assert face.has_surface and face.verts.dtype == np.float32 and face.faces.dtype == np.int32
    assert face.code == code  # the occupancy passed through the sigmoid + threshold unchanged
    v = face.verts.astype(np.float64)

    # (1) silhouette: >= 99% of the vertices inside the GT volume's projection along depth,
    # mapped to the photo (nearest), dilated by 1 px
    sil = (code.hi > code.lo).astype(np.uint8)
    sil_photo = cv2.warpAffine(sil, T.matrix, (hw[1], hw[0]), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    sil_photo = cv2.dilate(sil_photo, np.ones((3, 3), np.uint8))
    xi = np.clip(np.rint(v[:, 0]).astype(int), 0, hw[1] - 1)
    yi = np.clip(np.rint(v[:, 1]).astype(int), 0, hw[0] - 1)
    inside = sil_photo[yi, xi] > 0
    assert inside.mean() >= 0.99, f"only {inside.mean():.4f} of the vertices inside the silhouette"

    # (2) distance to the true surface (voxel boundaries mapped with an independent formula),
    # in voxels (crop px): < 1.5 required; exact up to float error in fact
    gt = _crop_to_photo(_voxel_boundary_points(vol), centre, scale, angle)
    dist, _ = cKDTree(gt).query(v)
    mean_vox = float(dist.mean() * scale)
    assert mean_vox < 1.5
    assert mean_vox < 1e-3, f"mean distance {mean_vox:.4f} voxels: the post-processing is not exact"

    # (3) the continuous ground truth: the face's landmarks (on the rendered mesh) lie within a
    # voxel of the extracted surface
    lm = np.asarray(meta["landmarks"], np.float64)
    lm = lm[np.isfinite(lm).all(1)]
    d_lm, _ = cKDTree(v).query(_crop_to_photo(lm, centre, scale, angle))
    assert np.median(d_lm * scale) < 1.0

    # (4) colours: sampled from the photo at the vertex, i.e. from the pasted crop there
    in_crop = face.verts_crop()
    ok = ((in_crop[:, :2] > 1) & (in_crop[:, :2] < 190)).all(1)
    ref = sample_vertex_colors(crop, in_crop[ok])
    err = np.abs(face.colors[ok].astype(int) - ref.astype(int)).mean()
    assert err < 12.0, f"vertex colours differ from the crop by {err:.1f} levels on average"


def test_z_is_scaled_back_to_photo_px() -> None:
    """A slab of depth bins [90, 110) -> crop z in [45, 55] -> photo z in [45/s, 55/s]."""
    vol = np.zeros((200, 192, 192), bool)
    vol[90:110, 60:130, 50:140] = True
    T = CropTransform.from_center_scale((400.0, 300.0), 0.25)
    verts, faces = volume_to_image_mesh(vol.astype(np.float32), T)
    np.testing.assert_allclose([verts[:, 2].min(), verts[:, 2].max()], [45.0 / 0.25, 55.0 / 0.25], atol=1e-3)
    # x: columns 50..139 -> crop x in [49.5, 139.5] -> photo (x - 95.5) / 0.25 + 400
    np.testing.assert_allclose(
        [verts[:, 0].min(), verts[:, 0].max()], [(49.5 - 95.5) / 0.25 + 400, (139.5 - 95.5) / 0.25 + 400], atol=1e-3
    )


def test_empty_volume_gives_no_surface() -> None:
    vol = np.zeros((200, 192, 192), bool)
    rec = Reconstructor(GroundTruthNet(vol), detector=None, flip_tta=False)
    T = CropTransform.from_center_scale((100.0, 100.0), 1.0)
    det = Detection(box=np.array([0, 0, 191, 191.0]), score=0.9, landmarks=np.zeros((68, 2)))
    (face,) = rec.reconstruct_prepared(
        PreparedImage(np.zeros((200, 200, 3), np.uint8), [det], np.zeros((1, 192, 192, 3), np.uint8), [T])
    )
    assert not face.has_surface and face.verts.shape == (0, 3) and face.colors.shape == (0, 3)
    assert face.code is not None and face.code.occupied_voxels() == 0
    with pytest.raises(ValueError, match="no surface"):
        face.export("/tmp/never.obj")


def test_reconstruct_crops_batches_dtypes_and_bf16() -> None:
    torch.manual_seed(0)
    net = create_model("vrn_tiny").eval()
    rec = Reconstructor(net, detector=None, batch_size=2)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, 3, 192, 192), dtype=np.uint8)
    p8 = rec.reconstruct_crops(crops)
    assert p8.shape == (3, 200, 192, 192) and p8.dtype == torch.float32 and p8.device.type == "cpu"
    pf = rec.reconstruct_crops(torch.from_numpy(crops).float() / 255)
    torch.testing.assert_close(p8, pf)
    one = rec.reconstruct_crops(crops[1:2])  # batching does not change a sample's result
    torch.testing.assert_close(one[0], p8[1], atol=1e-5, rtol=0)
    hwc = rec.reconstruct_crops(crops.transpose(0, 2, 3, 1))
    torch.testing.assert_close(hwc, p8)
    bf = Reconstructor(net, detector=None, precision="bf16").reconstruct_crops(crops[:1])
    assert (bf - p8[:1]).abs().max() < 0.05
    with pytest.raises(ValueError, match="precision"):
        Reconstructor(net, detector=None, precision="8")


def test_checkpoint_round_trip_path_and_url(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = create_model("vrn_tiny").eval()
    rec = Reconstructor(net, detector=None, model_spec={"name": "vrn_tiny", "depth_bins": DEPTH_BINS})
    path = rec.save(tmp_path / "slim.ckpt")
    net2, spec, layout = load_network(path)
    assert spec == {"name": "vrn_tiny", "depth_bins": DEPTH_BINS} and layout == DEFAULT_LAYOUT
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        torch.testing.assert_close(a, b)
    # a URL is downloaded once into the cache (file:// stands in for http here)
    cache = tmp_path / "cache"
    url = path.resolve().as_uri()
    local = resolve_checkpoint(url, cache_dir=cache, progress=False)
    assert local.parent == cache and local.is_file() and local.name.endswith("slim.ckpt")
    rec2 = Reconstructor.from_checkpoint(url, detector=None, cache_dir=cache)
    assert rec2.model_spec["name"] == "vrn_tiny" and len(list(cache.iterdir())) == 1
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        resolve_checkpoint(tmp_path / "missing.ckpt")


def test_flip_tta_is_exactly_mirror_symmetric() -> None:
    """flip_tta: p(x) = (f(x) + M f(M x)) / 2, so p(M x) = M p(x) exactly; without it a random
    network is not mirror-symmetric (the check can fail)."""
    torch.manual_seed(0)
    net = create_model("vrn_tiny", depth_bins=8)
    layout = VolumeLayout(crop_size=64, face_size=30.0, depth_bins=8)
    crops = torch.rand(2, 3, 64, 64)
    plain = Reconstructor(net, detector=None, layout=layout, flip_tta=False)
    tta = Reconstructor(net, detector=None, layout=layout)  # on by default
    a, b = tta.reconstruct_crops(crops), tta.reconstruct_crops(crops.flip(-1))
    torch.testing.assert_close(b, a.flip(-1), atol=1e-6, rtol=0)
    pa, pb = plain.reconstruct_crops(crops), plain.reconstruct_crops(crops.flip(-1))
    assert (pb - pa.flip(-1)).abs().max() > 1e-3
    torch.testing.assert_close(a, (pa + pb.flip(-1)) / 2, atol=1e-6, rtol=0)

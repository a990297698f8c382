"""VRN-Guided (vrn/models/guidance.py): landmark heatmaps, the flip order, the augmentation of
landmarks, starting from unguided weights, training and inference with landmarks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import compose_config
from vrn.conventions import DEPTH_BINS
from vrn.data.augment import AugmentConfig, augment_sample
from vrn.face_models.landmarks68 import LANDMARK_MIRROR, mirror_landmarks
from vrn.models import create_model
from vrn.models.guidance import GUIDANCE_GROUPS, LANDMARK_PARTS, LandmarkHeatmaps
from vrn.volume.codec import encode


def _face_landmarks(seed: int = 0) -> np.ndarray:
    """68 plausible landmarks in a 64 px crop, left/right symmetric about x = 31.5 (the crop's
    centre) up to noise: each landmark's mirror partner sits at the mirrored position."""
    rng = np.random.default_rng(seed)
    xy = np.zeros((68, 2))
    left = [k for k in range(68) if LANDMARK_MIRROR[k] > k]
    for k in left:
        xy[k] = [rng.uniform(8, 30), rng.uniform(8, 56)]
        xy[LANDMARK_MIRROR[k]] = [63 - xy[k, 0], xy[k, 1]]
    for k in range(68):
        if LANDMARK_MIRROR[k] == k:  # on the midline
            xy[k] = [31.5, rng.uniform(8, 56)]
    return xy


def test_mirror_order_is_the_ibug_scheme():
    m = LANDMARK_MIRROR
    assert sorted(m) == list(range(68)) and (m[m] == np.arange(68)).all()  # a permutation, an involution
    # the midline points map to themselves, and only they
    assert set(np.nonzero(m == np.arange(68))[0]) == {8, 27, 28, 29, 30, 33, 51, 57, 62, 66}
    # outer eye corners, mouth corners, jaw ends swap
    assert (m[36], m[48], m[0], m[17], m[31], m[60]) == (45, 54, 16, 26, 35, 64)
    # parts swap as their landmarks do: brows 1 <-> 2, eyes 5 <-> 6, the rest stay
    assert (LANDMARK_PARTS[m] == np.array([0, 2, 1, 3, 4, 6, 5, 7, 8])[LANDMARK_PARTS]).all()
    xy = _face_landmarks()
    np.testing.assert_allclose(mirror_landmarks(xy, 64), xy, atol=1e-12)  # a symmetric face is its own mirror
    asym = xy + np.random.default_rng(1).normal(0, 2, xy.shape)
    assert np.abs(mirror_landmarks(asym, 64) - asym).max() > 1
    np.testing.assert_allclose(mirror_landmarks(mirror_landmarks(asym, 64), 64), asym, atol=1e-12)


@pytest.mark.parametrize("groups", ["points", "parts"])
def test_heatmaps_are_gaussians_at_the_landmarks(groups):
    hm = LandmarkHeatmaps(groups, sigma_px=2.0)
    xy = np.full((68, 2), np.nan)
    xy[36] = [10.0, 20.0]  # an eye corner (part 5)
    xy[0] = [40.0, 30.0]  # the jaw (part 0)
    xy[1] = [41.0, 30.0]  # the jaw again, one px away
    h = hm(torch.tensor(xy[None], dtype=torch.float32), (48, 64))[0].numpy()
    assert h.shape == (GUIDANCE_GROUPS[groups], 48, 64)
    eye = 36 if groups == "points" else 5
    assert h[eye, 20, 10] == pytest.approx(1.0) and h[eye].argmax() == 20 * 64 + 10
    assert h[eye, 22, 11] == pytest.approx(np.exp(-(4 + 1) / 8.0), rel=1e-5)  # (dx, dy) = (1, 2)
    if groups == "parts":
        # the two jaw points add up in the jaw channel
        assert h[0, 30, 40] == pytest.approx(1.0 + np.exp(-1 / 8.0), rel=1e-5)
        assert np.count_nonzero(h.reshape(9, -1).max(1) > 1e-3) == 2
    else:
        assert h[0, 30, 40] == pytest.approx(1.0) and h[1, 30, 41] == pytest.approx(1.0)
        assert np.count_nonzero(h.reshape(68, -1).max(1) > 1e-3) == 3  # NaN landmarks draw nothing
    with pytest.raises(ValueError, match="must be \\(B, 68, 2\\)"):
        hm(torch.zeros(1, 5, 2), (8, 8))
    with pytest.raises(ValueError, match="groups must be one of"):
        LandmarkHeatmaps("eyes")


def test_augmented_landmarks_follow_the_image():
    """A blob drawn at landmark 36 lands, after rotation + scale + shift + flip, where the
    augmented landmarks say: at index 45, because the flip turns the face's right eye corner
    into its left one (the mirror order)."""
    s = 64
    xy = _face_landmarks(2)
    yy, xx = np.mgrid[0:s, 0:s]
    image = np.zeros((s, s, 3), np.float32)
    image[..., 0] = np.exp(-((xx - xy[36, 0]) ** 2 + (yy - xy[36, 1]) ** 2) / (2 * 1.5**2))
    code = encode(np.zeros((8, s, s), bool))
    cfg = AugmentConfig(rotation_deg=30, translation_px=5, flip_prob=1.0, colour_min=1.0, colour_max=1.0)
    out, _, moved = augment_sample(image, code, cfg, np.random.default_rng(7), xy)
    assert moved.shape == (68, 2) and moved.dtype == np.float32
    w = out[..., 0] / out[..., 0].sum()
    blob = np.array([(w * xx).sum(), (w * yy).sum()])
    np.testing.assert_allclose(blob, moved[45], atol=0.3)
    assert np.linalg.norm(blob - moved[36]) > 5  # the unpermuted index would be elsewhere
    # no augmentation: the same points (x, y only)
    off = AugmentConfig(enabled=False)
    _, _, same = augment_sample(image, code, off, np.random.default_rng(0), np.c_[xy, xy[:, :1]])
    np.testing.assert_allclose(same, xy, atol=1e-5)


def test_landmark_noise_moves_only_the_guidance():
    """landmark_* noise: the image and target are those of the noise-free draw, the landmarks
    move by the configured amounts (statistically), NaN rows stay NaN; all 0 = exact."""
    s = 64
    xy = _face_landmarks(3)
    image = np.random.default_rng(0).random((s, s, 3)).astype(np.float32)
    code = encode(np.zeros((8, s, s), bool))
    base = dict(rotation_deg=0, translation_px=0, scale_min=1, scale_max=1, flip_prob=0, colour_min=1, colour_max=1)
    img0, _, lm0 = augment_sample(image, code, AugmentConfig(**base), np.random.default_rng(1), xy)
    np.testing.assert_allclose(lm0, xy, atol=1e-4)  # no noise configured: exact
    jit = AugmentConfig(**base, landmark_jitter_px=2.0)
    img1, _, lm1 = augment_sample(image, code, jit, np.random.default_rng(1), xy)
    assert np.array_equal(img0, img1)
    d = lm1 - xy
    assert 1.6 < d.std() < 2.4 and np.abs(d.mean(0)).max() < 0.8  # per point, no common shift
    shifts = np.array(
        [
            augment_sample(image, code, AugmentConfig(**base, landmark_shift_px=3.0), np.random.default_rng(k), xy)[2]
            - xy
            for k in range(200)
        ]
    )
    assert np.allclose(shifts, shifts[:, :1], atol=1e-4)  # one shift for all 68
    assert 2.5 < shifts[:, 0].std() < 3.5
    _, _, lm3 = augment_sample(image, code, AugmentConfig(**base, landmark_scale=0.1), np.random.default_rng(5), xy)
    r = np.linalg.norm(lm3 - xy.mean(0), axis=1) / np.linalg.norm(xy - xy.mean(0), axis=1)
    assert np.allclose(r, r[0], atol=1e-4) and abs(r[0] - 1) > 1e-3  # a uniform scale about the mean
    gap = xy.copy()
    gap[5] = np.nan
    _, _, lm4 = augment_sample(image, code, jit, np.random.default_rng(1), gap)
    assert np.isnan(lm4[5]).all() and np.isfinite(np.delete(lm4, 5, 0)).all()


def test_guided_network_starts_as_the_unguided_one():
    torch.manual_seed(0)
    kw = dict(depth_bins=12, features=16, hourglass_depth=1, stem_channels=(8, 16))
    plain = create_model("vrn_medium", **kw).eval()
    guided = create_model("vrn_medium_guided", **kw).eval()
    guided.load_unguided(plain.state_dict())
    x, marks = torch.rand(2, 3, 32, 32), torch.rand(2, 68, 2) * 32
    with torch.no_grad():
        torch.testing.assert_close(guided(x, marks), plain(x))
        assert guided.vrn.stem[0].weight[:, 3:].abs().sum() == 0
        # once the heatmap weights move, the landmarks matter
        guided.vrn.stem[0].weight[:, 3:].normal_()
        assert not torch.allclose(guided(x, marks), guided(x, marks + 4))
    with pytest.raises(ValueError, match="needs each crop's 68 landmarks"):
        guided(x)
    bigger = create_model("vrn_medium", **{**kw, "features": 32})
    with pytest.raises(ValueError, match="this network needs"):
        guided.load_unguided(bigger.state_dict())


def test_guided_training_from_unguided_weights(synthetic_packed, tmp_path):
    """model.init_weights of an unguided checkpoint starts the guided variant (heatmap inputs
    zero); training reads the rows' landmarks; a run without landmarks is refused."""
    from hydra.utils import instantiate

    from vrn.checkpoint import save_network
    from vrn.train import train

    src = create_model("vrn_tiny")
    saved = save_network(tmp_path / "src.ckpt", src, {"name": "vrn_tiny", "depth_bins": DEPTH_BINS})
    overrides = [
        "data=folder",
        f"data.root={synthetic_packed}",
        "data.num_workers=0",
        "data.batch_size=2",
        "model=vrn_tiny",
        "model.net.name=vrn_tiny_guided",
        f"model.init_weights={saved}",
        "logger=none",
        "callbacks=none",
        "trainer.accelerator=cpu",
        "test=false",
        "trainer.fast_dev_run=true",
    ]
    cfg = compose_config("train", overrides, output_dir=tmp_path / "run")
    module = instantiate(cfg.model)
    assert module.needs_landmarks
    w = module.net.vrn.stem[0].weight
    torch.testing.assert_close(w[:, :3], src.stem[0].weight)
    assert w[:, 3:].abs().sum() == 0
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and 0.0 <= metrics["val/iou"] <= 1.0
    batch = {"image": torch.rand(2, 3, 192, 192), "landmarks": torch.full((2, 68, 2), float("nan")), "id": ["a", "b"]}
    with pytest.raises(ValueError, match="guided by 68 landmarks per face, but samples \\['a', 'b'\\]"):
        module._batch_landmarks(batch)


def test_reconstructor_runs_a_guided_network_with_flip_tta():
    from vrn.inference import Reconstructor

    torch.manual_seed(0)
    net = create_model("vrn_tiny_guided", depth_bins=DEPTH_BINS)
    with torch.no_grad():
        net.vrn.stem[0].weight[:, 3:].normal_()  # the heatmaps matter
    rec = Reconstructor(net, detector=None, flip_tta=True)
    assert rec.needs_landmarks
    s = rec.layout.crop_size
    crops = np.random.default_rng(0).integers(0, 256, (2, s, s, 3), dtype=np.uint8)
    marks = (np.random.default_rng(1).random((2, 68, 2)) * s).astype(np.float32)
    with pytest.raises(ValueError, match="guided by each crop's 68 landmarks"):
        rec.reconstruct_crops(crops)
    with pytest.raises(ValueError, match="landmarks must be \\(2, 68, 2\\)"):
        rec.reconstruct_crops(crops, marks[:1])
    p = rec.reconstruct_crops(crops, marks)
    # flip TTA with landmarks: mirroring the crop and its landmarks mirrors the result
    p_m = rec.reconstruct_crops(crops[:, :, ::-1].copy(), mirror_landmarks(marks, s))
    torch.testing.assert_close(p_m, p.flip(-1), atol=1e-5, rtol=0)
    # the landmarks change the result
    assert (rec.reconstruct_crops(crops, marks + 5) - p).abs().max() > 1e-3
    # (its ONNX export, landmarks as the second input: tests/test_export_onnx.py)


def test_photo_to_mesh_passes_each_faces_landmarks(shared_dir, tmp_path):
    """On a real photo (tddfa detector), the Reconstructor and the demo give a guided network
    each face's detector landmarks in that face's crop px."""
    from tests.helpers import compose_demo
    from vrn.checkpoint import save_network
    from vrn.demo import run_demo
    from vrn.inference import Reconstructor

    torch.manual_seed(0)
    net = create_model("vrn_tiny_guided", depth_bins=DEPTH_BINS)
    seen: list[torch.Tensor] = []
    forward = net.forward
    net.forward = lambda x, marks=None: (seen.append(marks.clone()), forward(x, marks))[1]  # type: ignore[method-assign]
    rec = Reconstructor(net, detector="tddfa", model_spec={"name": "vrn_tiny_guided"})
    photo = shared_dir / "data" / "images" / "trump_hillary.jpg"
    faces = rec(photo)
    # flip_tta (the default): a second call on the mirrored crops with the mirrored landmarks
    assert len(faces) == 2 and len(seen) == 2 and seen[0].shape == seen[1].shape == (2, 68, 2)
    S = rec.layout.crop_size
    np.testing.assert_allclose(seen[1].numpy(), mirror_landmarks(seen[0].numpy(), S), atol=1e-5)
    for k, f in enumerate(faces):
        np.testing.assert_allclose(seen[0][k].numpy(), f.transform.apply(f.landmarks), atol=1e-3)
        # the face's own crop: its landmarks sit inside it, around the crop centre
        assert np.abs(seen[0][k].numpy().mean(0) - rec.layout.crop_size / 2).max() < rec.layout.crop_size / 8
    ckpt = save_network(tmp_path / "guided.ckpt", net, {"name": "vrn_tiny_guided", "depth_bins": DEPTH_BINS})
    cfg = compose_demo(photo, ckpt, tmp_path / "out", "turntable=false", "num_workers=0", set_output=True)
    (rep,) = run_demo(cfg)
    assert rep.status == "ok" and len(rep.faces) == 2


def test_a_guided_model_warns_about_detectors_with_other_landmarks(caplog):
    from vrn.inference import Reconstructor

    net = create_model("vrn_tiny_guided", depth_bins=DEPTH_BINS)
    with caplog.at_level("WARNING", logger="vrn.inference"):
        Reconstructor(net, detector="tddfa")
        assert "guided model" not in caplog.text
        Reconstructor(net, detector="fan")  # face-alignment loads its weights on first use only
        assert "guided model with detector 'fan'" in caplog.text

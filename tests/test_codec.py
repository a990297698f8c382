"""VolumeCode: encode / decode / bytes / torch decode, exact round trips and size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vrn.geometry.transforms import euler_to_matrix
from vrn.volume.codec import CodecError, VolumeCode, decode, decode_torch, encode, from_bytes, to_bytes
from vrn.volume.surface import front_depth_of_code
from vrn.volume.voxelize import voxelize_face


def random_volume(rng: np.random.Generator, D: int = 200, H: int = 24, W: int = 20) -> np.ndarray:
    """Columns with 0..5 random runs (touching runs merge, runs at d = 0 and d = D-1 occur)."""
    vol = np.zeros((D, H, W), bool)
    nruns = rng.integers(0, 6, (H, W))
    for r in range(H):  # test-data construction only
        for c in range(W):
            for _ in range(nruns[r, c]):
                a, b = np.sort(rng.integers(0, D + 1, 2))
                vol[a:b, r, c] = True
    vol[:, 0, 0] = True  # full column
    vol[0, 1, 0] = True  # bottom voxel only
    vol[D - 1, 2, 0] = True  # top voxel only
    vol[::2, 3, 0] = True  # D/2 runs of one voxel
    return vol


def dense_front(vol: np.ndarray) -> np.ndarray:
    D = vol.shape[0]
    top = np.where(vol.any(0), D - 1 - np.argmax(vol[::-1], axis=0), -1).astype(np.float32)
    return top


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_round_trips(seed: int) -> None:
    rng = np.random.default_rng(seed)
    vol = random_volume(rng)
    code = encode(vol)
    assert code.lo.dtype == np.uint8 and code.hi.dtype == np.uint8 and code.extra.dtype == np.int32
    assert len(code.extra) > 100
    ex = code.extra
    assert np.all(np.lexsort((ex[:, 1], ex[:, 0])) == np.arange(len(ex)))  # sorted by pixel, lo
    assert np.array_equal(decode(code), vol)
    assert code.occupied_voxels() == vol.sum()
    b = to_bytes(code)
    back = from_bytes(b)
    assert back == code and np.array_equal(decode(back), vol)
    np.testing.assert_array_equal(front_depth_of_code(code), dense_front(vol))
    # empty columns are canonical (0, 0)
    empty = ~vol.any(0)
    assert empty.any() and (code.lo[empty] == 0).all() and (code.hi[empty] == 0).all()


def test_decode_torch_matches_numpy() -> None:
    rng = np.random.default_rng(5)
    vols = [random_volume(rng), random_volume(rng), np.zeros((200, 24, 20), bool)]
    vols[1][:, :, 3:] = False  # fewer runs
    codes = [encode(v) for v in vols]
    lo = torch.from_numpy(np.stack([c.lo for c in codes]))
    hi = torch.from_numpy(np.stack([c.hi for c in codes]))
    extra = [torch.from_numpy(c.extra.astype(np.int64)) for c in codes]
    extra[2] = None  # type: ignore[call-overload]
    out = decode_torch(lo, hi, extra, 200)
    assert out.dtype == torch.bool and out.shape == (3, 200, 24, 20)
    assert np.array_equal(out.numpy(), np.stack(vols))
    f = decode_torch(lo, hi, extra, 200, dtype=torch.float32)
    assert f.dtype == torch.float32 and torch.equal(f.bool(), out)
    # without extras: the first runs only
    first = decode_torch(lo, hi, None, 200)
    assert np.array_equal(first[0].numpy(), decode(VolumeCode(codes[0].lo, codes[0].hi, codes[0].extra[:0], 200)))
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        g = decode_torch(lo.cuda(), hi.cuda(), extra, 200)
        assert g.is_cuda and torch.equal(g.cpu(), out)


def _sfm_face_code(yaw: float, pitch: float, roll: float) -> VolumeCode:
    eos = pytest.importorskip("eos")
    from vrn import assets

    m = eos.morphablemodel.load_model(str(assets.resolve("sfm/sfm_shape_3448.bin")))
    sm = m.get_shape_model()
    mean = np.array(sm.get_mean()).reshape(-1, 3)
    tris = np.ascontiguousarray(np.array(sm.get_triangle_list())[:, ::-1], dtype=np.int32)
    s = 100.0 / np.ptp(mean[:, 0])
    v = (mean - mean.mean(0)) * np.array([s, -s, s])
    R = euler_to_matrix(yaw, pitch, roll)
    p = v @ R.T
    p[:, :2] += 96.0
    p[:, 2] += 50.0 - (p[:, 2].min() + p[:, 2].max()) / 2
    return voxelize_face(p.astype(np.float32), tris, R)


@pytest.mark.parametrize("ypr", [(0, 0, 0), (45, 20, -10), (-85, -5, 15)])
def test_face_code_round_trip_and_size(ypr: tuple[float, float, float]) -> None:
    code = _sfm_face_code(*ypr)
    vol = decode(code)
    assert vol.sum() > 300_000
    assert encode(vol) == code  # voxelize_face emits the canonical code
    b = to_bytes(code)
    assert from_bytes(b) == code
    ratio = vol.size / len(b)  # vs the uint8 volume: 7,372,800 bytes
    assert ratio >= 50, f"{len(b)} bytes, ratio {ratio:.0f}"
    np.testing.assert_array_equal(front_depth_of_code(code), dense_front(vol))


def test_corrupt_blobs_raise() -> None:
    code = encode(np.zeros((200, 8, 8), bool))
    b = to_bytes(code)
    assert from_bytes(b) == code
    with pytest.raises(CodecError):
        from_bytes(b[:10])
    with pytest.raises(CodecError):
        from_bytes(b"XXXX" + b[4:])
    with pytest.raises(CodecError):
        from_bytes(b[:-3])
    with pytest.raises(CodecError):
        from_bytes(b[:4] + bytes([99]) + b[5:])


def test_code_validation_and_equality() -> None:
    z = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError):
        VolumeCode(z, np.zeros((4, 5), np.uint8), np.zeros((0, 3), np.int32))
    with pytest.raises(ValueError):
        VolumeCode(z, z, np.zeros((0, 3), np.int32), depth_bins=300)
    a = VolumeCode(z, z, np.zeros((0, 3), np.int32), 200)
    assert a == VolumeCode(z.copy(), z.copy(), np.zeros((0, 3), np.int32), 200)
    assert a != VolumeCode(z, z, np.zeros((0, 3), np.int32), 100)

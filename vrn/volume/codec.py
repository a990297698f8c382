"""Compact run-length code of a (D, H, W) occupancy volume and its (de)serialisation.

A VRN target is a solid: almost every pixel column is empty or holds one run of occupied
depth bins (face surface back to the back plane); a few columns (nose overhangs, ears,
strongly posed faces) hold more. The code stores the lowest-d run of every column in two
(H, W) uint8 maps and any further runs in a short (K, 3) list.

Index order follows :mod:`vrn.conventions`: volume ``[d, r, c]``, d grows toward the camera.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

try:  # torch is optional for the numpy half of this module
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]

from vrn.conventions import DEPTH_BINS

__all__ = ["VolumeCode", "encode", "decode", "to_bytes", "from_bytes", "decode_torch", "CodecError"]

_MAGIC = b"VRNC"
_VERSION = 1
# magic, version, flags, depth_bins, H, W, K, payload length (uncompressed)
_HEADER = struct.Struct("<4sBBHHHII")


class CodecError(ValueError):
    """A byte string is not a valid :func:`to_bytes` blob."""


@dataclass(frozen=True, eq=False)
class VolumeCode:
    """Run-length code of a (depth_bins, H, W) bool volume.

    Attributes:
        lo: (H, W) uint8, first bin of the lowest-d run of each column.
        hi: (H, W) uint8, one past its last bin: bins ``d in [lo, hi)`` are occupied;
            ``lo == hi`` means the column is empty (canonically 0, 0).
        extra: (K, 3) int32 further runs ``(flat pixel r*W + c, lo, hi)``, sorted by pixel
            then lo, each above (higher d than) the column's first run and not touching it.
        depth_bins: D (<= 255 so bins fit uint8).
    Equality (``==``) is exact equality of all fields.
    """

    lo: np.ndarray
    hi: np.ndarray
    extra: np.ndarray
    depth_bins: int = DEPTH_BINS

    def __post_init__(self) -> None:
        if self.lo.shape != self.hi.shape or self.lo.ndim != 2:
            raise ValueError(f"lo and hi must be equal (H, W) maps, got {self.lo.shape} and {self.hi.shape}")
        if self.extra.ndim != 2 or self.extra.shape[1] != 3:
            raise ValueError(f"extra must be (K, 3), got {self.extra.shape}")
        if not 0 < int(self.depth_bins) <= 255:
            raise ValueError(f"depth_bins must be in 1..255, got {self.depth_bins}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(D, H, W) of the decoded volume."""
        return (int(self.depth_bins),) + tuple(int(s) for s in self.lo.shape)  # type: ignore[return-value]

    def occupied_voxels(self) -> int:
        """Number of occupied voxels (without decoding)."""
        first = np.clip(self.hi.astype(np.int64) - self.lo.astype(np.int64), 0, None).sum()
        ex = self.extra.astype(np.int64)
        return int(first + np.clip(ex[:, 2] - ex[:, 1], 0, None).sum())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VolumeCode):
            return NotImplemented
        return (
            int(self.depth_bins) == int(other.depth_bins)
            and np.array_equal(self.lo, other.lo)
            and np.array_equal(self.hi, other.hi)
            and np.array_equal(self.extra, other.extra)
        )

    __hash__ = None  # type: ignore[assignment]


def encode(volume: np.ndarray) -> VolumeCode:
    """Run-length encode a volume (vectorised).

    Args:
        volume: (D, H, W) bool (any dtype: non-zero = occupied), index ``[d, r, c]``.
    Returns:
        the canonical :class:`VolumeCode` (empty columns 0, 0; maximal runs).
    """
    v = np.asarray(volume)
    if v.ndim != 3:
        raise ValueError(f"volume must be (D, H, W), got {v.shape}")
    D, H, W = v.shape
    P = H * W
    # pixel-major (P, D+2) with an empty voxel either side of every column
    col = np.zeros((P, D + 2), dtype=bool)
    col[:, 1:-1] = v.reshape(D, P).T.astype(bool, copy=False)
    pix, d = np.nonzero(col[:, 1:] != col[:, :-1])  # sorted by pixel then d; alternating start / end
    starts, ends, rp = d[0::2], d[1::2], pix[0::2]
    first = np.ones(len(rp), dtype=bool)
    first[1:] = rp[1:] != rp[:-1]
    lo = np.zeros(P, np.uint8)
    hi = np.zeros(P, np.uint8)
    lo[rp[first]] = starts[first]
    hi[rp[first]] = ends[first]
    rest = ~first
    extra = np.stack([rp[rest], starts[rest], ends[rest]], axis=1).astype(np.int32).reshape(-1, 3)
    return VolumeCode(lo.reshape(H, W), hi.reshape(H, W), extra, D)


def _extra_indices(extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pixel, d) index arrays of every voxel of the extra runs."""
    ex = extra.astype(np.int64)
    n = np.clip(ex[:, 2] - ex[:, 1], 0, None)
    total = int(n.sum())
    run = np.repeat(np.arange(len(ex)), n)
    within = np.arange(total) - np.repeat(np.cumsum(n) - n, n)
    return ex[run, 0], ex[run, 1] + within


def decode(code: VolumeCode) -> np.ndarray:
    """Dense volume of a code.

    Returns:
        (D, H, W) bool, index ``[d, r, c]``.
    """
    D = int(code.depth_bins)
    H, W = code.lo.shape
    lo = code.lo.astype(np.uint8, copy=False)
    hi = code.hi.astype(np.uint8, copy=False)
    n = np.where(hi > lo, hi - lo, 0).astype(np.uint8)
    d = np.arange(D, dtype=np.uint8)[:, None, None]
    vol = (d - lo[None]) < n[None]  # d in [lo, hi) <=> (d - lo) mod 256 < hi - lo
    if len(code.extra):
        pix, dd = _extra_indices(code.extra)
        vol.reshape(D, H * W)[dd, pix] = True
    return vol


def to_bytes(code: VolumeCode) -> bytes:
    """Serialise a code: 24-byte header + zlib stream (exact round trip with :func:`from_bytes`).

    Header (little endian): magic ``b"VRNC"``, version u8 (1), flags u8 (0), depth_bins
    u16, H u16, W u16, K u32 (extra runs), payload length u32. Payload before zlib: the
    lo map and the run-length map ``hi - lo`` (uint8 mod 256), each row-delta filtered
    (every byte minus its left neighbour, mod 256, like PNG "Sub"), then the extra runs as
    pixel deltas (int32), lo (uint8), hi (uint8) column arrays.
    """
    H, W = code.lo.shape
    lo = np.ascontiguousarray(code.lo, dtype=np.uint8)
    ln = (code.hi.astype(np.uint8) - lo).astype(np.uint8)  # wraps mod 256 when hi < lo: still exact

    def sub(a: np.ndarray) -> np.ndarray:
        f = a.copy()
        f[:, 1:] = a[:, 1:] - a[:, :-1]
        return f

    ex = np.asarray(code.extra, dtype=np.int64).reshape(-1, 3)
    if len(ex) and (ex[:, 1:].min() < 0 or ex[:, 1:].max() > 255 or ex[:, 0].min() < 0):
        raise ValueError("extra runs out of range")
    pix_d = np.diff(ex[:, 0], prepend=0).astype("<i4")
    payload = b"".join(
        [
            sub(lo).tobytes(),
            sub(ln).tobytes(),
            pix_d.tobytes(),
            ex[:, 1].astype(np.uint8).tobytes(),
            ex[:, 2].astype(np.uint8).tobytes(),
        ]
    )
    head = _HEADER.pack(_MAGIC, _VERSION, 0, int(code.depth_bins), H, W, len(ex), len(payload))
    return head + zlib.compress(payload, 9)


def from_bytes(b: bytes) -> VolumeCode:
    """Inverse of :func:`to_bytes`. Raises :class:`CodecError` on a malformed blob."""
    b = bytes(b)
    if len(b) < _HEADER.size:
        raise CodecError("blob shorter than the header")
    magic, ver, _flags, D, H, W, K, n = _HEADER.unpack_from(b)
    if magic != _MAGIC:
        raise CodecError(f"bad magic {magic!r}")
    if ver != _VERSION:
        raise CodecError(f"unsupported version {ver}")
    try:
        p = zlib.decompress(b[_HEADER.size :])
    except zlib.error as e:
        raise CodecError(f"corrupt payload: {e}") from e
    if len(p) != n or n != 2 * H * W + 6 * K:
        raise CodecError("payload length mismatch")
    P = H * W

    def unsub(a: np.ndarray) -> np.ndarray:
        return np.cumsum(a, axis=1, dtype=np.uint8)  # cumsum mod 256

    lo = unsub(np.frombuffer(p, np.uint8, P, 0).reshape(H, W))
    ln = unsub(np.frombuffer(p, np.uint8, P, P).reshape(H, W))
    hi = (lo + ln).astype(np.uint8)
    o = 2 * P
    pix = np.cumsum(np.frombuffer(p, "<i4", K, o).astype(np.int64))
    elo = np.frombuffer(p, np.uint8, K, o + 4 * K)
    ehi = np.frombuffer(p, np.uint8, K, o + 5 * K)
    extra = np.stack([pix, elo, ehi], axis=1).astype(np.int32).reshape(-1, 3)
    return VolumeCode(lo, hi, extra, int(D))


def decode_torch(
    lo: torch.Tensor,
    hi: torch.Tensor,
    extra: list[torch.Tensor | None] | None = None,
    depth_bins: int = DEPTH_BINS,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Batched dense decode on ``lo.device`` (vectorised; works on GPU).

    Args:
        lo, hi: (B, H, W) uint8 (any integer dtype) first-run maps.
        extra: None, or a list of B entries, each None or a (K_i, 3) integer tensor of
            further runs (flat pixel r*W + c, lo, hi); moved to ``lo.device``.
        depth_bins: D.
        dtype: output dtype (default torch.bool; e.g. torch.float32 for a BCE target).
    Returns:
        (B, D, H, W) occupancy, index ``[b, d, r, c]``, on ``lo.device``.
    """
    if lo.shape != hi.shape or lo.dim() != 3:
        raise ValueError(f"lo and hi must be equal (B, H, W), got {tuple(lo.shape)} and {tuple(hi.shape)}")
    B, H, W = lo.shape
    dev = lo.device
    D = int(depth_bins)
    if not 0 < D <= 255:
        raise ValueError(f"depth_bins must be in 1..255, got {D}")
    lo8, hi8 = lo.to(torch.uint8), hi.to(dev, torch.uint8)
    n8 = torch.where(hi8 > lo8, hi8 - lo8, torch.zeros_like(lo8)).unsqueeze(1)
    d = torch.arange(D, device=dev, dtype=torch.uint8).view(1, D, 1, 1)
    # d in [lo, hi)  <=>  (d - lo) mod 256 < hi - lo   (all values <= 255): one compare
    vol = (d - lo8.unsqueeze(1)) < n8
    if extra is not None:
        if len(extra) != B:
            raise ValueError(f"extra has {len(extra)} entries for a batch of {B}")
        parts = [(i, e) for i, e in enumerate(extra) if e is not None and e.numel()]
        if parts:
            ex = torch.cat([e.reshape(-1, 3).to(dev, torch.int64) for _, e in parts])
            bidx = torch.cat(
                [torch.full((e.reshape(-1, 3).shape[0],), i, device=dev, dtype=torch.int64) for i, e in parts]
            )
            n = (ex[:, 2] - ex[:, 1]).clamp(min=0)
            total = int(n.sum())  # one host sync per batch
            run = torch.repeat_interleave(torch.arange(len(ex), device=dev), n, output_size=total)
            within = torch.arange(total, device=dev) - torch.repeat_interleave(
                torch.cumsum(n, 0) - n, n, output_size=total
            )
            flat = vol.view(B, D, H * W)
            flat[bidx[run], ex[run, 1] + within, ex[run, 0]] = True
    return vol if dtype is None or dtype == torch.bool else vol.to(dtype)

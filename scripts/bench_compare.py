#!/usr/bin/env python
"""Side-by-side benchmarks: each part of vrn against what a user would otherwise write, on the
same inputs in the same process.

    VRN_ASSETS_DIR=../shared/assets python scripts/bench_compare.py [--repeats 5] [--threads 1]
        [--only voxelise,bytes,train_step,forward,mesh,image_to_mesh] [--json out.json] [--quick]

Pairs (``--only`` names):

* ``voxelise``: the 38,365-vertex BFM mean face (posed yaw 20, pitch 10, roll 5, ~110 crop px
  wide) into its filled (200, 192, 192) VRN target. Ours: :func:`vrn.volume.voxelize.voxelize_face`
  (straight to the compact code). Alternatives, both from the same closed mesh
  (:func:`vrn.volume.voxelize.closed_face_mesh`, included in their time): trimesh
  ``Trimesh(...).voxelized(1).fill()`` (z scaled to depth bins), and a vectorised numpy z-buffer
  fill (:func:`zbuffer_fill`, written here: near and far z-buffer of the closed mesh, every bin
  between them filled).
* ``bytes``: one training target stored as our codec blob (:func:`vrn.volume.codec.to_bytes`) vs a
  uint8 ``.npy``, ``np.packbits`` in a ``.npy``, and ``np.savez_compressed``; plus the time to
  read each back into the dense bool volume (``decode``).
* ``train_step``: one step (forward, loss, backward, RMSprop) of the same network on the same
  batch: ours (matrix-product bilinear head, fused BCE, targets decoded from the compact code
  in the step) vs the plain form (``F.interpolate`` head, ``nn.BCEWithLogitsLoss``, dense float
  targets).
* ``forward``: the network's forward + sigmoid, torch fp32 vs onnxruntime (our ONNX export,
  :mod:`vrn.export`), batch 1 and 4.
* ``mesh``: marching cubes + ``.obj`` export of a realistic probability volume (the target
  above blurred by a 1-voxel Gaussian): ours (:func:`vrn.volume.mesh.volume_to_mesh` +
  :func:`vrn.volume.mesh.export_mesh`) vs ``skimage.measure.marching_cubes`` + trimesh defaults.
* ``image_to_mesh``: a whole face, photo -> mesh: ours (``Reconstructor.from_pretrained()``,
  detector ``tddfa``) vs the 3DDFA_V2 port's dense mesh (FaceBoxes + 3DDFA_V2 + BFM dense
  vertices), the fast alternative users know.

Every pair also checks that the two sides agree (IoU, decoded volumes, losses, outputs,
vertex counts / areas, meshes over the face); ``--quick`` (tiny sizes, one repeat) is what the
test suite runs. Ratios are ``alternative / ours``: above 1 means ours is faster / smaller.
Times are medians over ``--repeats`` warm runs (:func:`vrn.bench_timing.median_ms`), the two
sides of a pair timed in alternation (:func:`interleaved_ms`) so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import copy
import functools
import io
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vrn import assets
from vrn.atomic_write import atomic_write
from vrn.bench_timing import cpu_model, median_ms
from vrn.conventions import DEPTH_BINS, DEPTH_FACTOR, VolumeLayout
from vrn.geometry.transforms import euler_to_matrix
from vrn.losses import volume_bce_loss
from vrn.models import create_model
from vrn.volume.codec import VolumeCode, decode, decode_torch, from_bytes, to_bytes
from vrn.volume.voxelize import closed_face_mesh, solid_depth_shift, voxelize_face

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "images" / "AFLW_image00046.jpg"
#: the benchmark pose of the dense face (yaw, pitch, roll), degrees
POSE = (20.0, 10.0, 5.0)
#: face width as a fraction of the crop side (110 px in a 192 px crop, the VRN crop rule's scale)
FACE_WIDTH = 110.0 / 192.0


@dataclass
class PairResult:
    """One compared pair.

    Attributes:
        pair: what is measured.
        unit: "ms" or "B".
        ours: our value (median ms, or bytes).
        alternatives: name -> the alternative's value (same unit).
        checks: correctness numbers of the pair (IoU, max differences, counts, ...).
        ok: every check passed its tolerance.
        note: one line on what differs by design.
    """

    pair: str
    unit: str
    ours: float
    alternatives: dict[str, float]
    checks: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    note: str = ""

    def ratios(self) -> dict[str, float]:
        """alternative / ours (above 1: ours is faster or smaller)."""
        return {k: (v / self.ours if self.ours > 0 else float("nan")) for k, v in self.alternatives.items()}


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: the full benchmark or the test suite's ``--quick`` run."""

    crop: int  # crop side, px (volume is (DEPTH_BINS, crop, crop))
    model: str  # network for train_step / forward
    batch: int  # train_step batch
    repeats: int
    trimesh_repeats: int  # trimesh's voxelizer takes ~20 s on the full face

    @staticmethod
    def make(quick: bool, repeats: int) -> Sizes:
        if quick:
            return Sizes(crop=48, model="vrn_tiny", batch=2, repeats=1, trimesh_repeats=1)
        return Sizes(crop=192, model="vrn_unguided", batch=4, repeats=repeats, trimesh_repeats=min(repeats, 3))


def interleaved_ms(
    fns: dict[str, Callable[[], Any]], repeats: int, max_runs: dict[str, int] | None = None
) -> dict[str, tuple[float, Any]]:
    """Median ms of several functions timed in alternation (round r runs each once), so a busy
    machine's slow spells hit every side alike and the ratios hold.

    Each function is called once untimed first (warm-up), except those in ``max_runs``, which
    run at most that many timed rounds and no warm-up (too slow to repeat).

    Returns:
        name -> (median ms, the last call's result), timed with :func:`vrn.bench_timing.median_ms`.
    """
    limits = max_runs or {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    last: dict[str, Any] = {}
    for k, fn in fns.items():
        if k not in limits:
            last[k] = fn()
    for r in range(max(1, repeats)):
        for k, fn in fns.items():
            if r < limits.get(k, repeats):
                t, last[k] = median_ms(fn, 1, warmup=0)
                times[k].append(t)
    return {k: (float(np.median(v)), last[k]) for k, v in times.items()}


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _bfm_mean_face() -> tuple[np.ndarray, np.ndarray]:
    """(38365, 3) float64 BFM mean face (model units, y up) and (76073, 3) int32 triangles."""
    z = np.load(assets.resolve("3ddfa_v2/bfm_noneck_v3_offline.npz"))
    u = z["u"].reshape(-1, 3).astype(np.float64)  # interleaved x, y, z; y up
    tri = z["tri"]
    tri = tri.T if tri.shape[0] == 3 else tri
    # the y flip to crop px mirrors the mesh: reverse the winding to keep it outward
    return u, np.ascontiguousarray(tri[:, ::-1], dtype=np.int32)


def posed_bfm_face(
    crop: int = 192, ypr: tuple[float, float, float] = POSE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dense BFM mean face (3DDFA_V2's no-neck mesh) posed in crop px.

    Args:
        crop: crop side, px; the face is ``FACE_WIDTH * crop`` px wide, centred.
        ypr: yaw, pitch, roll in degrees.
    Returns:
        verts (38365, 3) float32 crop px (x right, y down, z toward the camera, placed in depth
        by :func:`vrn.volume.voxelize.solid_depth_shift`), tris (76073, 3) int32, rotation (3, 3).
    """
    u, tris = _bfm_mean_face()
    s = FACE_WIDTH * crop / np.ptp(u[:, 0])
    v = (u - u.mean(0)) * np.array([s, -s, s])
    R = euler_to_matrix(*ypr)
    p = v @ R.T
    p[:, :2] += (crop - 1) / 2.0
    verts = p.astype(np.float32)
    verts[:, 2] += solid_depth_shift(verts, tris, R)
    return verts, tris, R


def zbuffer_fill(
    verts: np.ndarray,
    tris: np.ndarray,
    rotation: np.ndarray,
    size: int,
    depth_bins: int = DEPTH_BINS,
    depth_factor: float = DEPTH_FACTOR,
) -> np.ndarray:
    """Baseline voxeliser: near and far z-buffer of the closed face mesh, every bin between filled.

    Vectorised numpy: every (triangle, pixel of its bounding box) pair is one array element;
    barycentric inside test at pixel centres; ``np.maximum.at`` / ``np.minimum.at`` z-buffers.
    One interval per pixel column, so columns with two runs (nose overhangs) are filled
    across the gap -- the difference from :func:`voxelize_face`'s exact ray fill.

    Args:
        verts: (V, 3) float32 posed open surface, crop px; tris (F, 3) int32; rotation (3, 3).
        size: crop side (H = W).
    Returns:
        (depth_bins, size, size) bool volume, index ``[d, r, c]``.
    """
    cv, ct = closed_face_mesh(verts, tris, rotation)
    v = cv.astype(np.float64)
    p0, p1, p2 = v[ct[:, 0]], v[ct[:, 1]], v[ct[:, 2]]
    xs = np.stack([p0[:, 0], p1[:, 0], p2[:, 0]])
    ys = np.stack([p0[:, 1], p1[:, 1], p2[:, 1]])
    c0 = np.clip(np.ceil(xs.min(0)), 0, size).astype(np.int64)
    c1 = np.clip(np.floor(xs.max(0)), -1, size - 1).astype(np.int64)
    r0 = np.clip(np.ceil(ys.min(0)), 0, size).astype(np.int64)
    r1 = np.clip(np.floor(ys.max(0)), -1, size - 1).astype(np.int64)
    nx = np.maximum(c1 - c0 + 1, 0)
    n = nx * np.maximum(r1 - r0 + 1, 0)
    tid = np.repeat(np.arange(len(ct)), n)
    k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    px = c0[tid] + k % nx[tid]
    py = r0[tid] + k // nx[tid]
    x0, y0, x1, y1, x2, y2 = p0[:, 0], p0[:, 1], p1[:, 0], p1[:, 1], p2[:, 0], p2[:, 1]
    den = (y1 - y2) * (x0 - x2) + (x2 - x1) * (y0 - y2)
    good = np.abs(den) > 1e-12
    inv = 1.0 / np.where(good, den, 1.0)
    dx, dy = px - x2[tid], py - y2[tid]
    a = ((y1 - y2)[tid] * dx + (x2 - x1)[tid] * dy) * inv[tid]
    b = ((y2 - y0)[tid] * dx + (x0 - x2)[tid] * dy) * inv[tid]
    c = 1.0 - a - b
    inside = good[tid] & (a >= 0) & (b >= 0) & (c >= 0)
    z = (a * p0[tid, 2] + b * p1[tid, 2] + c * p2[tid, 2])[inside]
    pix = (py * size + px)[inside]
    near = np.full(size * size, -np.inf)
    far = np.full(size * size, np.inf)
    np.maximum.at(near, pix, z)
    np.minimum.at(far, pix, z)
    zc = (np.arange(depth_bins) + 0.5) / depth_factor
    return ((zc[:, None] > far[None]) & (zc[:, None] < near[None])).reshape(depth_bins, size, size)


def trimesh_fill(
    verts: np.ndarray,
    tris: np.ndarray,
    rotation: np.ndarray,
    size: int,
    depth_bins: int = DEPTH_BINS,
    depth_factor: float = DEPTH_FACTOR,
) -> np.ndarray:
    """Baseline voxeliser: trimesh ``voxelized(1).fill()`` of the closed face mesh.

    z is scaled to depth bins and shifted by half a bin so trimesh's voxel centres (integer
    points) are ours (voxel (d, r, c) centre at x = c, y = r, z = (d + 0.5) / depth_factor).

    Returns:
        (depth_bins, size, size) bool volume, index ``[d, r, c]`` (outside parts clipped).
    """
    import trimesh

    cv, ct = closed_face_mesh(verts, tris, rotation)
    q = cv.astype(np.float64)
    q[:, 2] = q[:, 2] * depth_factor - 0.5
    grid = trimesh.Trimesh(q, ct, process=False).voxelized(1.0).fill()
    ix, iy, iz = np.nonzero(grid.matrix)
    off = np.round(grid.transform[:3, 3]).astype(np.int64)
    c, r, d = ix + off[0], iy + off[1], iz + off[2]
    keep = (c >= 0) & (c < size) & (r >= 0) & (r < size) & (d >= 0) & (d < depth_bins)
    out = np.zeros((depth_bins, size, size), bool)
    out[d[keep], r[keep], c[keep]] = True
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Voxel IoU of two bool volumes of the same shape."""
    return float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))


# --------------------------------------------------------------------------------------
# pairs
# --------------------------------------------------------------------------------------


def bench_voxelise(sz: Sizes) -> list[PairResult]:
    """Ours vs trimesh vs the numpy z-buffer fill on the posed dense face.

    Agreement: IoU with the z-buffer fill > 0.98; trimesh's solid contains ours and lies
    within ours grown by one voxel (its IoU with ours is reported: it falls with the face size,
    as its extra shell is one voxel thick whatever the size).
    """
    import scipy.ndimage as ndi

    verts, tris, R = posed_bfm_face(sz.crop)
    res = interleaved_ms(
        {
            "ours": lambda: voxelize_face(verts, tris, R, size=sz.crop),
            "zbuffer": lambda: zbuffer_fill(verts, tris, R, sz.crop),
            "trimesh": lambda: trimesh_fill(verts, tris, R, sz.crop),
        },
        sz.repeats,
        {"trimesh": sz.trimesh_repeats},
    )
    (t_ours, code), (t_zb, zb), (t_tm, tm) = res["ours"], res["zbuffer"], res["trimesh"]
    vol = decode(code)
    grown = ndi.binary_dilation(vol)  # ours plus one voxel (6-neighbourhood) all round
    checks = {
        "vertices": len(verts),
        "iou_zbuffer": iou(vol, zb),
        "iou_trimesh": iou(vol, tm),
        "ours_inside_trimesh": float(np.logical_and(vol, tm).sum() / max(1, vol.sum())),
        "trimesh_inside_ours_plus_1_voxel": float(np.logical_and(tm, grown).sum() / max(1, tm.sum())),
        "occupied_ours": int(vol.sum()),
    }
    ok = (
        checks["iou_zbuffer"] > 0.98
        and checks["ours_inside_trimesh"] > 0.99
        and checks["trimesh_inside_ours_plus_1_voxel"] > 0.99
    )
    return [
        PairResult(
            f"voxelise {len(verts):,}-vertex face -> filled {DEPTH_BINS}x{sz.crop}x{sz.crop}",
            "ms",
            t_ours,
            {"numpy z-buffer fill": t_zb, "trimesh voxelized(1).fill()": t_tm},
            checks,
            ok,
            "trimesh's solid keeps its surface shell (voxels whose centre is up to half a voxel outside), so "
            "it is ~half a voxel thicker all round; the z-buffer fills one interval per column",
        )
    ]


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _npz_bytes(vol: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, volume=vol)
    return buf.getvalue()


def bench_bytes(sz: Sizes) -> list[PairResult]:
    """Bytes of one target in each format, and the time to read each back to the dense volume."""
    verts, tris, R = posed_bfm_face(sz.crop)
    code = voxelize_face(verts, tris, R, size=sz.crop)
    vol = decode(code)
    blobs = {
        "ours": to_bytes(code),
        "uint8 .npy": _npy_bytes(vol.astype(np.uint8)),
        "np.packbits .npy": _npy_bytes(np.packbits(vol)),
        "compressed .npz": _npz_bytes(vol),
    }
    readers: dict[str, Callable[[bytes], np.ndarray]] = {
        "ours": lambda b: decode(from_bytes(b)),
        "uint8 .npy": lambda b: np.load(io.BytesIO(b)).astype(bool),
        "np.packbits .npy": lambda b: (
            np.unpackbits(np.load(io.BytesIO(b)), count=vol.size).reshape(vol.shape).view(bool)
        ),
        "compressed .npz": lambda b: np.load(io.BytesIO(b))["volume"],
    }
    res = interleaved_ms({k: (lambda k=k: readers[k](blobs[k])) for k in blobs}, max(sz.repeats, 3))
    times, same = {}, {}
    for name, (t, back) in res.items():
        times[name] = t
        same[name] = bool(back.dtype == bool and back.shape == vol.shape and np.array_equal(back, vol))
    alts = [k for k in blobs if k != "ours"]
    checks = {f"decodes_equal[{k}]": v for k, v in same.items()}
    checks["occupied"] = int(vol.sum())
    ok = all(same.values())
    return [
        PairResult(
            f"bytes per training target ({DEPTH_BINS}x{sz.crop}x{sz.crop})",
            "B",
            float(len(blobs["ours"])),
            {k: float(len(blobs[k])) for k in alts},
            checks,
            ok,
            "target only; a packed sample adds its JPEG crop (~12 KB on AFLW)",
        ),
        PairResult(
            "read one target back to the dense bool volume",
            "ms",
            times["ours"],
            {k: times[k] for k in alts},
            checks,
            ok,
        ),
    ]


class _InterpolateUpsample(nn.Module):
    """The plain head: ``F.interpolate`` bilinear (same call signature as SeparableBilinearUpsample)."""

    def __init__(self, scale_factor: int = 4, align_corners: bool = True) -> None:
        super().__init__()
        self.scale_factor = scale_factor
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            return F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=self.align_corners)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)


def plain_network(net: nn.Module) -> nn.Module:
    """A copy of a VRN (same weights) whose head upsamples with ``F.interpolate``."""
    plain = copy.deepcopy(net)
    plain.upsample = _InterpolateUpsample(net.upsample.scale_factor, net.upsample.align_corners)
    return plain


def _train_batch(sz: Sizes) -> tuple[torch.Tensor, list[VolumeCode]]:
    """(B, 3, S, S) random crops and the targets of B poses of the dense face."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(sz.batch, 3, sz.crop, sz.crop, generator=g)
    poses = [(20, 10, 5), (-35, 0, 0), (0, -15, 10), (60, 5, -5)]
    codes = []
    for i in range(sz.batch):
        v, t, R = posed_bfm_face(sz.crop, poses[i % len(poses)])
        codes.append(voxelize_face(v, t, R, size=sz.crop))
    return x, codes


def bench_train_step(sz: Sizes) -> list[PairResult]:
    """One optimiser step of the same network: ours vs the plain form, CPU."""
    torch.manual_seed(0)
    net0 = create_model(sz.model)
    x, codes = _train_batch(sz)
    lo = torch.from_numpy(np.stack([c.lo for c in codes]))
    hi = torch.from_numpy(np.stack([c.hi for c in codes]))
    extra = [torch.from_numpy(c.extra.astype(np.int64)) for c in codes]
    dense_u8 = torch.from_numpy(np.stack([decode(c) for c in codes]).astype(np.uint8))  # what a .npy loader gives
    bce = nn.BCEWithLogitsLoss()

    def make(plain: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
        net = plain_network(net0) if plain else copy.deepcopy(net0)
        net.train()
        return net, torch.optim.RMSprop(net.parameters(), lr=1e-4, momentum=0.9)

    def ours_step(net: nn.Module, opt: torch.optim.Optimizer) -> float:
        opt.zero_grad(set_to_none=True)
        logits = net(x)
        target = decode_torch(lo, hi, extra, DEPTH_BINS, dtype=torch.float32)
        loss = volume_bce_loss(logits, target)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def plain_step(net: nn.Module, opt: torch.optim.Optimizer) -> float:
        opt.zero_grad(set_to_none=True)
        logits = net(x)
        loss = bce(logits, dense_u8.float())
        loss.backward()
        opt.step()
        return float(loss.detach())

    # correctness: two steps of each from the same weights on the same batch
    a_net, a_opt = make(False)
    b_net, b_opt = make(True)
    la = [ours_step(a_net, a_opt) for _ in range(2)]
    lb = [plain_step(b_net, b_opt) for _ in range(2)]
    wdiff = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a_net.parameters(), b_net.parameters()))
    checks = {
        "loss_ours": la[0],
        "loss_plain": lb[0],
        "loss_abs_diff_step1": abs(la[0] - lb[0]),
        "loss_abs_diff_step2": abs(la[1] - lb[1]),
        "weights_max_abs_diff_after_2_steps": wdiff,
    }
    ok = checks["loss_abs_diff_step1"] < 1e-5 and checks["loss_abs_diff_step2"] < 1e-5
    res = interleaved_ms(
        {"ours": lambda: ours_step(a_net, a_opt), "plain": lambda: plain_step(b_net, b_opt)}, sz.repeats
    )
    t_ours, t_plain = res["ours"][0], res["plain"][0]
    return [
        PairResult(
            f"training step, {sz.model}, batch {sz.batch}, CPU",
            "ms",
            t_ours,
            {"F.interpolate head + BCEWithLogitsLoss": t_plain},
            checks,
            ok,
            "same weights and batch; ours decodes the compact targets inside the step, the plain form gets "
            "dense uint8 targets",
        )
    ]


def bench_forward(sz: Sizes) -> list[PairResult]:
    """Forward + sigmoid: torch fp32 vs onnxruntime (our export), batch 1 and 4."""
    from vrn.export import OnnxNetwork, onnx_bytes

    torch.manual_seed(0)
    net = create_model(sz.model).eval()
    layout = VolumeLayout(crop_size=sz.crop)
    ort_net = OnnxNetwork(onnx_bytes(net, layout, {"name": sz.model}), threads=torch.get_num_threads())
    out = []
    for batch in (1, 4):
        x = torch.rand(batch, 3, sz.crop, sz.crop, generator=torch.Generator().manual_seed(batch))

        def run_torch(x: torch.Tensor = x) -> np.ndarray:
            with torch.inference_mode():
                return torch.sigmoid(net(x)).numpy()

        res = interleaved_ms({"torch": run_torch, "ort": lambda x=x: ort_net(x.numpy())}, sz.repeats)
        (t_torch, p_torch), (t_ort, p_ort) = res["torch"], res["ort"]
        checks = {
            "max_abs_prob_diff": float(np.abs(p_torch - p_ort).max()),
            "occupancy_flip_fraction": float(np.mean((p_torch > 0.5) != (p_ort > 0.5))),
        }
        ok = checks["max_abs_prob_diff"] < 1e-4 and checks["occupancy_flip_fraction"] < 1e-4
        out.append(
            PairResult(
                f"network forward, {sz.model}, batch {batch}, CPU: torch fp32 (ours) vs onnxruntime",
                "ms",
                t_torch,
                {"onnxruntime (vrn.export)": t_ort},
                checks,
                ok,
                "onnxruntime runs our own export; ratio > 1 means torch is faster",
            )
        )
    return out


def _mesh_area(verts: np.ndarray, faces: np.ndarray) -> float:
    v = verts[faces]
    return float(0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1).sum())


def bench_mesh(sz: Sizes) -> list[PairResult]:
    """Marching cubes + .obj export: ours vs skimage + trimesh defaults."""
    import scipy.ndimage as ndi
    import trimesh
    from skimage.measure import marching_cubes

    from vrn.volume.mesh import export_mesh, volume_to_mesh

    verts, tris, R = posed_bfm_face(sz.crop)
    prob = ndi.gaussian_filter(decode(voxelize_face(verts, tris, R, size=sz.crop)).astype(np.float32), 1.0)
    with tempfile.TemporaryDirectory() as tmp:

        def ours() -> tuple[np.ndarray, np.ndarray]:
            v, f = volume_to_mesh(prob)
            export_mesh(Path(tmp) / "ours.obj", v, f)
            return v, f

        def plain() -> trimesh.Trimesh:
            v, f, _n, _val = marching_cubes(prob, level=0.5)
            m = trimesh.Trimesh(v, f)
            m.export(Path(tmp) / "plain.obj")
            return m

        res = interleaved_ms({"ours": ours, "plain": plain}, sz.repeats)
        (t_ours, (v_ours, f_ours)), (t_plain, m) = res["ours"], res["plain"]
        size_ours = (Path(tmp) / "ours.obj").stat().st_size
        size_plain = (Path(tmp) / "plain.obj").stat().st_size
    # the plain mesh in crop px (index (d, r, c) -> x = c, y = r, z = (d + 0.5) / depth_factor)
    vp = np.asarray(m.vertices)
    v_plain = np.stack([vp[:, 2], vp[:, 1], (vp[:, 0] + 0.5) / DEPTH_FACTOR], axis=1)
    # ours closes the surface where the solid meets the volume's border (its back, clipped at
    # d = 0, on a strongly pitched face): those cap vertices lie outside the index box, and the
    # plain mesh is open there. Compare without them.
    d_idx = v_ours[:, 2].astype(np.float64) * DEPTH_FACTOR - 0.5
    hw = prob.shape[1] - 1, prob.shape[2] - 1
    eps = 1e-3
    cap = (
        (d_idx < -eps)
        | (d_idx > prob.shape[0] - 1 + eps)
        | (v_ours[:, 1] < -eps)
        | (v_ours[:, 1] > hw[0] + eps)
        | (v_ours[:, 0] < -eps)
        | (v_ours[:, 0] > hw[1] + eps)
    )
    f_in = f_ours[~cap[f_ours].any(axis=1)]
    a_ours, a_plain = _mesh_area(v_ours.astype(np.float64), f_in), _mesh_area(v_plain, np.asarray(m.faces))
    n_ours = int((~cap).sum())
    checks = {
        "verts_ours": len(v_ours),
        "verts_plain": len(v_plain),
        "faces_ours": len(f_ours),
        "faces_plain": len(m.faces),
        "ours_border_cap_verts": int(cap.sum()),
        "verts_rel_diff": abs(n_ours - len(v_plain)) / max(1, len(v_plain)),
        "area_rel_diff": abs(a_ours - a_plain) / max(1e-9, a_plain),
        "obj_bytes_ours": size_ours,
        "obj_bytes_plain": size_plain,
    }
    ok = checks["verts_rel_diff"] < 0.01 and checks["area_rel_diff"] < 0.01
    return [
        PairResult(
            f"marching cubes + .obj export ({len(v_ours):,} vertices)",
            "ms",
            t_ours,
            {"skimage marching_cubes + trimesh export": t_plain},
            checks,
            ok,
            "ours crops to the occupied box, pads it (closing the surface at the volume border: vertex/area "
            "checks leave that cap out) and writes the .obj text with numpy",
        )
    ]


def bench_image_to_mesh(sz: Sizes, image: Path = DEFAULT_IMAGE) -> list[PairResult]:
    """A whole face, photo -> mesh: ours (pretrained VRN) vs the 3DDFA_V2 port's dense mesh."""
    from vrn.face_models.tddfa_models import load_faceboxes, load_tddfa
    from vrn.image_io import read_image_rgb
    from vrn.inference import Reconstructor

    img = read_image_rgb(image)
    rec = Reconstructor.from_pretrained(detector="tddfa", device="cpu")
    boxes_net, tddfa = load_faceboxes(), load_tddfa()

    def ours() -> list[Any]:
        return rec(img, keep=None)

    def dense_3ddfa() -> tuple[np.ndarray, np.ndarray]:
        boxes = np.asarray(boxes_net(img), np.float64).reshape(-1, 5)
        res = tddfa(img, boxes[:, :4])
        return res[0].dense().T, res[0].tri

    res = interleaved_ms({"ours": ours, "3ddfa": dense_3ddfa}, sz.repeats)
    (t_ours, faces), (t_3d, (v3, tri3)) = res["ours"], res["3ddfa"]
    f0 = faces[0]
    box = np.asarray(f0.box, np.float64)
    w, h = box[2] - box[0], box[3] - box[1]
    grown = box + np.array([-0.25 * w, -0.25 * h, 0.25 * w, 0.25 * h])

    def inside(v: np.ndarray) -> float:
        x, y = v[:, 0], v[:, 1]
        return float(np.mean((x >= grown[0]) & (x <= grown[2]) & (y >= grown[1]) & (y <= grown[3])))

    def bbox(v: np.ndarray) -> np.ndarray:
        return np.concatenate([v[:, :2].min(0), v[:, :2].max(0)])

    b1, b2 = bbox(f0.verts), bbox(v3)
    iw = max(0.0, min(b1[2], b2[2]) - max(b1[0], b2[0]))
    ih = max(0.0, min(b1[3], b2[3]) - max(b1[1], b2[1]))
    inter = iw * ih
    union = np.prod(b1[2:] - b1[:2]) + np.prod(b2[2:] - b2[:2]) - inter
    checks = {
        "faces_found": len(faces),
        "verts_ours": len(f0.verts),
        "verts_3ddfa": len(v3),
        "tris_3ddfa": len(tri3),
        "ours_in_face_box": inside(f0.verts),
        "3ddfa_in_face_box": inside(v3),
        "xy_bbox_iou": float(inter / max(union, 1e-9)),
    }
    ok = (
        f0.has_surface
        and len(v3) > 0
        and checks["ours_in_face_box"] > 0.95
        and checks["3ddfa_in_face_box"] > 0.95
        and checks["xy_bbox_iou"] > 0.5
    )
    return [
        PairResult(
            f"photo -> mesh, one face ({image.name}), CPU",
            "ms",
            t_ours,
            {"3DDFA_V2 port dense mesh (FaceBoxes + mb05 + BFM)": t_3d},
            checks,
            ok,
            "ours = the same FaceBoxes + 3DDFA_V2 landmarks, then the VRN network (vrn_medium_aflw), marching "
            "cubes and colours; ratio < 1 means the 3DDFA_V2 mesh is faster",
        )
    ]


PAIRS: dict[str, Callable[[Sizes], list[PairResult]]] = {
    "voxelise": bench_voxelise,
    "bytes": bench_bytes,
    "train_step": bench_train_step,
    "forward": bench_forward,
    "mesh": bench_mesh,
    "image_to_mesh": bench_image_to_mesh,
}


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model, cores, load, torch threads and library versions."""
    cpu = cpu_model()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    for mod in ("trimesh", "skimage", "onnxruntime", "scipy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def _fmt(v: float, unit: str) -> str:
    if unit == "B":
        return f"{v:,.0f} B"
    return f"{v:,.1f} ms" if v >= 10 else f"{v:,.2f} ms"


def _fmt_check(k: str, v: Any) -> str:
    if isinstance(v, bool):
        return f"{k}={'yes' if v else 'NO'}"
    if isinstance(v, float):
        return f"{k}={v:.3g}"
    return f"{k}={v}"


def markdown_table(results: list[PairResult]) -> str:
    """One row per (pair, alternative): ours, the alternative, the ratio, the pair's checks."""
    lines = [
        "| pair | ours | alternative | alternative's | alt / ours | agreement check |",
        "|---|---:|---|---:|---:|---|",
    ]
    for r in results:
        checks = ", ".join(_fmt_check(k, v) for k, v in r.checks.items()) + ("" if r.ok else " **FAILED**")
        for i, (name, value) in enumerate(r.alternatives.items()):
            lines.append(
                f"| {r.pair if i == 0 else ''} | {_fmt(r.ours, r.unit) if i == 0 else ''} | {name} | "
                f"{_fmt(value, r.unit)} | {r.ratios()[name]:.2f} | {checks if i == 0 else ''} |"
            )
    return "\n".join(lines)


def run(names: list[str], quick: bool, repeats: int, image: Path = DEFAULT_IMAGE) -> list[PairResult]:
    """Run the named pairs; a pair that raises becomes a failed row naming the error."""
    sz = Sizes.make(quick, repeats)
    out: list[PairResult] = []
    for name in names:
        t0 = time.perf_counter()
        try:
            res = bench_image_to_mesh(sz, image) if name == "image_to_mesh" else PAIRS[name](sz)
        except Exception as e:  # noqa: BLE001 - one failing pair must not hide the others
            res = [PairResult(name, "ms", float("nan"), {}, {"error": f"{type(e).__name__}: {e}"}, False)]
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
        out.extend(res)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (the test suite's run)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads (default 1)")
    ap.add_argument("--only", default=",".join(PAIRS), help=f"comma-separated subset of: {','.join(PAIRS)}")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="photo for image_to_mesh")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        ap.error(f"--only: unknown pair(s) {', '.join(unknown)}; choose from {', '.join(PAIRS)}")
    if args.repeats < 1 or args.threads < 1:
        ap.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    info = machine_info()
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    results = run(names, args.quick, args.repeats, args.image)
    print()
    print(markdown_table(results))
    for r in results:
        if r.note:
            print(f"- {r.pair}: {r.note}")
    if args.json is not None:
        payload = {
            "command": command,
            "machine": info,
            "quick": args.quick,
            "results": [{**asdict(r), "ratios": r.ratios()} for r in results],
        }
        atomic_write(args.json, json.dumps(payload, indent=2, default=str).encode())
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

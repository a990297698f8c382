"""Synthetic training faces from the Surrey Face Model (the embedded default data).

Each sample: random identity (63 shape coefficients), expression (6 blendshapes), pose
(yaw up to +-90 deg, pitch +-30, roll +-20), scale, translation, skin albedo and lighting,
rendered with the project's z-buffer rasteriser to a 192x192 RGB crop over a random
background; the VRN target is built from the same posed mesh by
:func:`vrn.volume.voxelize.voxelize_face` (surface filled back to a plane in the face's
frame, then posed). Everything is drawn from ``np.random.default_rng([seed, split, i])``,
so a sample depends only on (settings, seed, split, index): same seed, same bytes.

CLI: ``python -m vrn.data.synthetic --out DIR --train 512 --val 64 --test 64``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm.auto import tqdm

from vrn.assets import verified_sha256
from vrn.conventions import CROP_SIZE, DEPTH_BINS, DEPTH_FACTOR
from vrn.data.packed import PackedWriter
from vrn.face_models.sfm import SurreyFaceModel, load_sfm
from vrn.geometry.normals import vertex_normals
from vrn.geometry.raster import rasterize
from vrn.geometry.transforms import euler_to_matrix
from vrn.volume.codec import VolumeCode
from vrn.volume.voxelize import solid_depth_shift, voxelize_face

__all__ = ["SyntheticFaceConfig", "render_sample", "generate_packed", "cache_name"]

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
#: the asset files a synthetic set is made from (their sha256 is part of the cache key)
SFM_ASSETS = ("sfm/sfm_shape_3448.bin", "sfm/expression_blendshapes_3448.bin", "sfm/ibug_to_sfm.txt")
# iBUG landmark groups used to paint facial features into the albedo (1-based iBUG ids).
_BROWS = list(range(18, 28))
_EYES = list(range(37, 49))
_LIPS = list(range(49, 69))


@dataclass
class SyntheticFaceConfig:
    size: int = CROP_SIZE
    depth_bins: int = DEPTH_BINS
    depth_factor: float = DEPTH_FACTOR
    yaw_deg: float = 90.0
    pitch_deg: float = 30.0
    roll_deg: float = 20.0
    px_per_mm: float = 0.55  # SFM mean ~148 mm wide -> ~81 crop px
    scale_jitter: float = 0.08  # relative, uniform
    translation_px: float = 6.0  # uniform, per axis
    shape_std: float = 1.0  # in units of the model's standard deviations
    expression_max: float = 0.8
    supersample: int = 2  # anti-aliasing factor of the photo render
    bfm_version: str = "sfm_3448"


def cache_name(cfg: SyntheticFaceConfig, counts: dict[str, int], seed: int) -> str:
    """Folder name unique to the generation settings and the SFM files (their sha256,
    verified through :mod:`vrn.assets`: a damaged model file raises here, before any
    rendering, and another model version gets another folder)."""
    # v3: vertex normals in float64 (vrn.geometry.normals): 2 of 128 images differ by one grey level in one pixel
    assets = {name: verified_sha256(name) for name in SFM_ASSETS}
    key = json.dumps({"cfg": asdict(cfg), "counts": counts, "seed": seed, "v": 3, "assets": assets}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return f"synthetic_{counts['train']}_{counts['val']}_{counts['test']}_s{seed}_{digest}"


@lru_cache(maxsize=1)
def _feature_weights() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-vertex soft masks (V,) of brows, eyes and lips on the mean face (for the albedo)."""
    m = load_sfm()

    def mask(ids: list[int], radius_mm: float) -> np.ndarray:
        pts = m.mean[[m.landmarks[i] for i in ids if i in m.landmarks]]
        d = np.linalg.norm(m.mean[:, None, :] - pts[None, :, :], axis=2).min(axis=1)
        return np.exp(-((d / radius_mm) ** 2)).astype(np.float32)

    return mask(_BROWS, 7.0), mask(_EYES, 6.5), mask(_LIPS, 5.0)


def _albedo(rng: np.random.Generator, n_verts: int) -> np.ndarray:
    brows, eyes, lips = _feature_weights()
    t = rng.uniform(0.0, 1.0)
    light, dark = np.array([0.96, 0.80, 0.70]), np.array([0.36, 0.23, 0.16])
    skin = (1 - t) * light + t * dark
    skin = skin * rng.uniform(0.92, 1.08, size=3)
    alb = np.tile(skin, (n_verts, 1))
    brow_col = skin * rng.uniform(0.25, 0.6)
    lip_col = skin * np.array([1.05, 0.62, 0.62]) * rng.uniform(0.8, 1.0)
    eye_col = np.array([0.12, 0.1, 0.09]) * rng.uniform(0.6, 1.4)
    for w, col in ((brows, brow_col), (lips, lip_col), (eyes, eye_col)):
        alb = alb * (1 - w[:, None]) + col[None, :] * w[:, None]
    alb *= rng.uniform(0.95, 1.05, size=(n_verts, 1))  # fine blotches
    return np.clip(alb, 0, 1).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    g = rng.integers(2, 7)
    coarse = rng.uniform(0, 1, size=(g, g, 3)).astype(np.float32)
    bg = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(rng.integers(0, 5)):  # a few clutter blobs
        c = tuple(int(v) for v in rng.integers(0, size, 2))
        axes = tuple(int(v) for v in rng.integers(size // 16, size // 3, 2))
        cv2.ellipse(bg, c, axes, float(rng.uniform(0, 180)), 0, 360, rng.uniform(0, 1, 3).tolist(), -1)
    bg += rng.normal(0, rng.uniform(0.0, 0.04), size=bg.shape).astype(np.float32)
    return np.clip(bg, 0, 1)


def render_sample(
    cfg: SyntheticFaceConfig, rng: np.random.Generator, model: SurreyFaceModel | None = None
) -> tuple[np.ndarray, VolumeCode, dict[str, Any]]:
    """Draw and render one synthetic face.

    Returns:
        image: (size, size, 3) uint8 RGB, crop px.
        code: the VRN target (compact).
        meta: pose (yaw, pitch, roll degrees), px_per_mm, rotation (3x3, crop frame),
            landmarks (68, 3) crop px (NaN for the 18 iBUG points the SFM does not map: the
            16 jaw-contour points and the inner mouth corners 61, 65, 1-based).

    (One function of ~70 lines on purpose: it is the generator's recipe read top to bottom,
    draw -> pose -> render -> voxelise, sharing one random stream whose order fixes the bytes.)
    """
    m = model or load_sfm()
    S, E = m.shape_basis.shape[1], m.expression_basis.shape[1]
    alpha = np.clip(rng.standard_normal(S) * cfg.shape_std, -3, 3).astype(np.float32)
    beta = (rng.uniform(0, cfg.expression_max, E) * (rng.random(E) < 0.35)).astype(np.float32)
    verts_mm = m.vertices(alpha, beta)
    albedo = _albedo(rng, len(verts_mm))

    # Frontal frame in crop px: x right, y down, z toward the camera; centred on the mesh.
    s = cfg.px_per_mm * (1 + rng.uniform(-cfg.scale_jitter, cfg.scale_jitter))
    v0 = (verts_mm - verts_mm.mean(axis=0)) * np.array([s, -s, s], dtype=np.float32)
    yaw = rng.uniform(-cfg.yaw_deg, cfg.yaw_deg)
    pitch = rng.uniform(-cfg.pitch_deg, cfg.pitch_deg)
    roll = rng.uniform(-cfg.roll_deg, cfg.roll_deg)
    R = euler_to_matrix(yaw, pitch, roll).astype(np.float32)
    posed = v0 @ R.T
    # Place like the VRN crop rule: centre the visible landmarks' 2D box, jitter, centre depth.
    lm_ids = np.array([m.landmarks.get(i, -1) for i in range(1, 69)])
    lm = posed[lm_ids[lm_ids >= 0]]
    centre_xy = (lm[:, :2].min(0) + lm[:, :2].max(0)) / 2
    t = rng.uniform(-cfg.translation_px, cfg.translation_px, 2)
    # Centre the target *solid* (surface + back plane), not just the surface, in depth: at
    # large pitch the back plane tilts and would otherwise leave the volume.
    offset = np.array(
        [
            (cfg.size - 1) / 2 + t[0] - centre_xy[0],
            (cfg.size - 1) / 2 + t[1] - centre_xy[1],
            solid_depth_shift(posed, m.tris, R, depth_bins=cfg.depth_bins, depth_factor=cfg.depth_factor),
        ],
        dtype=np.float32,
    )
    posed = (posed + offset).astype(np.float32)

    # Photo: supersampled z-buffer render with interpolated normals, Lambert + ambient light.
    ss = int(cfg.supersample)
    hi = cfg.size * ss
    vss = posed.copy()
    vss[:, :2] = (vss[:, :2] + 0.5) * ss - 0.5
    rast = rasterize(vss, m.tris, hi, hi, keep="front")
    normals = vertex_normals(posed, m.tris)
    fg = rast.tri_id >= 0
    tri = m.tris[np.where(fg, rast.tri_id, 0)]  # (H, W, 3)
    b = rast.bary[..., :, None]
    n = (normals[tri] * b).sum(axis=2)
    # Orient normals toward the camera side of each visible pixel's surface.
    n *= np.sign(n[..., 2:3] + 1e-6)
    n /= np.linalg.norm(n, axis=-1, keepdims=True).clip(1e-6)
    alb = (albedo[tri] * b).sum(axis=2)
    ldir = np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.4, 1.5)])
    ldir /= np.linalg.norm(ldir)
    ambient, diffuse = rng.uniform(0.25, 0.55), rng.uniform(0.45, 0.85)
    tint = rng.uniform(0.85, 1.15, 3)
    shade = ambient + diffuse * np.clip(n @ ldir, 0, None)
    face = np.clip(alb * shade[..., None] * tint, 0, 1)
    bg = cv2.resize(_background(rng, cfg.size), (hi, hi), interpolation=cv2.INTER_NEAREST)
    img_ss = np.where(fg[..., None], face, bg).astype(np.float32)
    img = img_ss.reshape(cfg.size, ss, cfg.size, ss, 3).mean(axis=(1, 3))
    img = np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)
    image = (img * 255 + 0.5).astype(np.uint8)

    code = voxelize_face(posed, m.tris, R, depth_bins=cfg.depth_bins, depth_factor=cfg.depth_factor, size=cfg.size)
    lms = np.full((68, 3), np.nan, dtype=np.float32)
    ok = lm_ids >= 0
    lms[ok] = posed[lm_ids[ok]]
    meta = {
        "yaw": float(yaw),
        "pitch": float(pitch),
        "roll": float(roll),
        "px_per_mm": float(s),
        "rotation": R.tolist(),
        "landmarks": np.round(lms, 3).tolist(),
    }
    return image, code, meta


def _render_one(args: tuple[SyntheticFaceConfig, int, str, int]) -> tuple[str, int, np.ndarray, VolumeCode, dict]:
    cfg, seed, split, i = args
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
    image, code, meta = render_sample(cfg, rng)
    return split, i, image, code, meta


def generate_packed(
    root: str | os.PathLike,
    cfg: SyntheticFaceConfig,
    counts: dict[str, int],
    seed: int = 0,
    workers: int = 0,
    progress: bool = True,
) -> Path:
    """Render ``counts[split]`` faces per split into a packed folder at ``root`` (atomic)."""
    jobs = [(cfg, seed, split, i) for split in ("train", "val", "test") for i in range(int(counts.get(split, 0)))]
    extra_meta = {
        "source": "synthetic-sfm",
        "generator": asdict(cfg),
        "seed": seed,
        "mesh": "Surrey Face Model 3448 (eos)",
    }
    with (
        PackedWriter(root, image_codec=".png", extra_meta=extra_meta, overwrite=True) as w,
        ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as ex,
    ):
        results = ex.map(_render_one, jobs, chunksize=8) if ex is not None else map(_render_one, jobs)
        for split, i, image, code, meta in tqdm(results, total=len(jobs), disable=not progress, desc="synthetic faces"):
            w.add(
                image,
                code,
                {
                    "id": f"{split}_{i:06d}",
                    "split": split,
                    "subject": f"{split}_{i:06d}",
                    "source": "synthetic",
                    **meta,
                },
            )
    return Path(root)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Render synthetic SFM faces into a packed vrn dataset.")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=512)
    p.add_argument("--val", type=int, default=64)
    p.add_argument("--test", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    a = p.parse_args(argv)
    out = generate_packed(
        a.out, SyntheticFaceConfig(), {"train": a.train, "val": a.val, "test": a.test}, seed=a.seed, workers=a.workers
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

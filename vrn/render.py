"""Pictures of reconstructed meshes: overlay PNGs, depth maps, turntable GIFs.

Everything is drawn with the project's z-buffer rasteriser (:func:`vrn.geometry.raster.rasterize`,
orthographic along z, pixel centres at integer (x, y)) and Lambert shading; no Python loop
runs over pixels or triangles (only over turntable frames).

Frames: meshes come in image px (x right, y down, z toward the camera, :mod:`vrn.conventions`),
as :class:`vrn.inference.FaceResult` holds them. Only the window of the photo that the
mesh covers is rasterised, so a face in a 4000 px photo costs what a face in a crop costs.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from vrn.atomic_write import atomic_write
from vrn.geometry.normals import vertex_normals
from vrn.geometry.raster import Raster, rasterize
from vrn.geometry.transforms import euler_to_matrix
from vrn.image_io import encode_image_rgb

__all__ = [
    "render_mesh",
    "render_overlay",
    "render_depth",
    "render_turntable",
    "draw_pose_landmarks",
    "save_png",
    "save_gif",
    "DEFAULT_LIGHT",
]

#: direction toward the light (image px frame): up-left of the camera, mostly frontal
DEFAULT_LIGHT: tuple[float, float, float] = (-0.35, -0.45, 1.0)


def _window(verts: np.ndarray, height: int, width: int, pad: int = 1) -> tuple[int, int, int, int] | None:
    """Pixel window (x0, y0, x1, y1), end exclusive, of the mesh's 2D box clipped to the image."""
    if len(verts) == 0:
        return None
    lo = np.floor(verts[:, :2].min(0)).astype(int) - pad
    hi = np.ceil(verts[:, :2].max(0)).astype(int) + pad + 1
    x0, y0 = max(0, lo[0]), max(0, lo[1])
    x1, y1 = min(width, hi[0]), min(height, hi[1])
    if x1 <= x0 or y1 <= y0:
        return None
    return int(x0), int(y0), int(x1), int(y1)


def _vertex_shade(
    normals: np.ndarray, colors: np.ndarray | None, light: Sequence[float], ambient: float, diffuse: float
) -> np.ndarray:
    """(V, 3) float32 shaded vertex colours in [0, 1] (Lambert; normals turned to the viewer, +z)."""
    n = np.asarray(normals, np.float32)
    n = n * np.where(n[:, 2:3] < 0, -1.0, 1.0).astype(np.float32)
    ld = np.asarray(light, np.float64)
    ld = (ld / np.linalg.norm(ld)).astype(np.float32)
    shade = ambient + diffuse * np.clip(n @ ld, 0.0, None)
    albedo = (
        np.full((len(n), 3), 0.8, np.float32)
        if colors is None
        else np.asarray(colors)[:, :3].astype(np.float32) / 255.0
    )
    return np.clip(albedo * shade[:, None], 0.0, 1.0)


def _shade(r: Raster, faces: np.ndarray, vertex_rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) float32: shaded vertex colours interpolated over the raster (Gouraud; 0 where empty)."""
    mask = r.tri_id >= 0
    tri = faces[np.where(mask, r.tri_id, 0)]  # (h, w, 3) vertex ids
    out = np.einsum("hwk,hwkc->hwc", r.bary, vertex_rgb[tri])
    return out * mask[..., None]


def render_mesh(
    verts: np.ndarray,
    faces: np.ndarray,
    height: int,
    width: int,
    colors: np.ndarray | None = None,
    light: Sequence[float] = DEFAULT_LIGHT,
    ambient: float = 0.3,
    diffuse: float = 0.75,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthographic Lambert render (Gouraud: shaded at the vertices, interpolated) of a mesh
    on an (height, width) pixel grid.

    Args:
        verts: (V, 3) float px (x, y, z toward the camera) of the target grid.
        faces: (F, 3) int.
        colors: optional (V, 3) uint8 RGB albedo; None = light grey.
        light: direction toward the light (same frame), normalised here.
        ambient, diffuse: shading weights.
    Returns:
        rgb: (height, width, 3) float32 in [0, 1] (0 where empty).
        mask: (height, width) bool, covered pixels.
        depth: (height, width) float32 z of the front surface, -inf where empty.
    """
    rgb = np.zeros((height, width, 3), np.float32)
    mask = np.zeros((height, width), bool)
    depth = np.full((height, width), -np.inf, np.float32)
    v = np.asarray(verts, np.float32)
    f = np.ascontiguousarray(faces, np.int32)
    win = _window(v, height, width) if len(f) else None
    if win is None:
        return rgb, mask, depth
    x0, y0, x1, y1 = win
    vw = v - np.array([x0, y0, 0], np.float32)
    r = rasterize(vw, f, y1 - y0, x1 - x0, keep="front")
    vrgb = _vertex_shade(vertex_normals(v, f), colors, light, ambient, diffuse)
    rgb[y0:y1, x0:x1] = _shade(r, f, vrgb)
    mask[y0:y1, x0:x1] = r.tri_id >= 0
    depth[y0:y1, x0:x1] = r.depth
    return rgb, mask, depth


def render_overlay(
    image: np.ndarray,
    meshes: Sequence[tuple[np.ndarray, np.ndarray]],
    alpha: float = 0.85,
    colors: Sequence[np.ndarray | None] | None = None,
) -> np.ndarray:
    """Shaded meshes drawn over the photo.

    Args:
        image: (H, W, 3) uint8 RGB photo.
        meshes: (verts (V, 3) image px, faces (F, 3)) pairs; drawn together with one
            z-buffer (a nearer face hides a farther one).
        alpha: opacity of the mesh.
        colors: optional per-mesh (V, 3) uint8 albedo (None = grey clay).
    Returns:
        (H, W, 3) uint8 RGB.
    """
    H, W = image.shape[:2]
    meshes = [(np.asarray(v, np.float32), np.asarray(f, np.int32)) for v, f in meshes if len(v) and len(f)]
    if not meshes:
        return np.array(image, copy=True)
    offs = np.cumsum([0] + [len(v) for v, _ in meshes])
    verts = np.concatenate([v for v, _ in meshes])
    faces = np.concatenate([f + o for (_, f), o in zip(meshes, offs[:-1])])
    col = None
    if colors is not None and all(c is not None for c in colors):
        col = np.concatenate([np.asarray(c)[:, :3] for c in colors]).astype(np.uint8)
    rgb, mask, _ = render_mesh(verts, faces, H, W, col)
    out = image.astype(np.float32) / 255.0
    a = float(alpha) * mask[..., None]
    out = out * (1 - a) + rgb * a
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def render_depth(
    verts: np.ndarray, faces: np.ndarray, height: int, width: int, window: bool = True, pad: int = 4
) -> tuple[np.ndarray, tuple[int, int]]:
    """8-bit depth map of the front surface: nearest = 255, farthest surface point = 32,
    background 0.

    Args:
        verts: (V, 3) image px; faces (F, 3).
        height, width: photo size.
        window: return only the mesh's window of the photo (plus ``pad`` px), else the
            whole photo.
    Returns:
        depth8: (h, w) uint8, and the (x0, y0) image px of its top-left pixel.
    """
    v = np.asarray(verts, np.float32)
    win = _window(v, height, width, pad) if window else (0, 0, width, height)
    if win is None:
        return np.zeros((1, 1), np.uint8), (0, 0)
    x0, y0, x1, y1 = win
    r = rasterize(
        v - np.array([x0, y0, 0], np.float32), np.ascontiguousarray(faces, np.int32), y1 - y0, x1 - x0, keep="front"
    )
    m = r.tri_id >= 0
    out = np.zeros(m.shape, np.uint8)
    if m.any():
        z = r.depth[m]
        lo, hi = float(z.min()), float(z.max())
        out[m] = np.rint(32 + 223 * (z - lo) / max(hi - lo, 1e-6)).astype(np.uint8)
    return out, (x0, y0)


def render_turntable(
    verts: np.ndarray,
    faces: np.ndarray,
    colors: np.ndarray | None = None,
    frames: int = 36,
    size: int = 256,
    sweep_deg: float = 360.0,
    background: Sequence[int] = (24, 24, 28),
    light: Sequence[float] = DEFAULT_LIGHT,
    fill: float = 0.9,
) -> list[np.ndarray]:
    """Frames of the mesh rotating about its vertical axis (y, through its box centre).

    Args:
        verts: (V, 3) any px frame (x right, y down, z toward the camera).
        faces: (F, 3); colors (V, 3) uint8 RGB or None (grey clay).
        frames: number of frames.
        size: frame side in px; the mesh is scaled so that its bounding sphere fills ``fill``
            of the frame at every angle (no jumps in scale).
        sweep_deg: 360 = full turn; less = a swing from -sweep/2 to +sweep/2 and back.
        background: RGB of empty pixels.
        light: direction toward the light, fixed relative to the camera.
    Returns:
        ``frames`` (size, size, 3) uint8 RGB arrays.
    """
    v = np.asarray(verts, np.float64)
    f = np.ascontiguousarray(faces, np.int32)
    bg = np.asarray(background, np.uint8)
    if len(v) == 0 or len(f) == 0:
        return [np.broadcast_to(bg, (size, size, 3)).copy() for _ in range(max(1, frames))]
    c = (v.min(0) + v.max(0)) / 2
    radius = max(float(np.linalg.norm(v - c, axis=1).max()), 1e-6)
    s = fill * (size / 2.0) / radius
    if sweep_deg >= 360:
        angles = np.linspace(0.0, 360.0, frames, endpoint=False)
    else:
        angles = (sweep_deg / 2.0) * np.sin(np.linspace(0.0, 2 * math.pi, frames, endpoint=False))
    out = []
    centre = np.array([(size - 1) / 2.0, (size - 1) / 2.0, 0.0], np.float32)
    normals = vertex_normals(v, f)  # rotated with the mesh below (rotation keeps them unit)
    v0 = (v - c).astype(np.float32)
    bgf = bg[None, None, :].astype(np.float32)
    for a in angles:  # one loop over frames; each frame is one vectorised render
        Rt = np.ascontiguousarray(euler_to_matrix(float(a), 0.0, 0.0).T, dtype=np.float32)  # C order: BLAS path
        p = v0 @ (Rt * np.float32(s)) + centre
        r = rasterize(p, f, size, size, keep="front")
        rgb = _shade(r, f, _vertex_shade(normals @ Rt, colors, light, 0.3, 0.75))
        img = np.where((r.tri_id >= 0)[..., None], np.rint(rgb * 255.0), bgf)
        out.append(img.astype(np.uint8))
    return out


#: colours (RGB) of the landmark dots (visible, hidden) and of the face's x, y, z axes
_VISIBLE_RGB, _HIDDEN_RGB = (60, 255, 60), (255, 60, 60)
_AXIS_RGB = ((255, 40, 40), (40, 255, 40), (60, 120, 255))


def draw_pose_landmarks(
    image: np.ndarray,
    landmarks_3d: np.ndarray,
    visible: np.ndarray | None = None,
    rotation: np.ndarray | None = None,
    axis_length: float | None = None,
) -> np.ndarray:
    """The 68 landmarks and the head-pose axes drawn over a photo (a copy).

    Args:
        image: (H, W, 3) uint8 RGB (e.g. :func:`render_overlay`'s output).
        landmarks_3d: (68, 3) float image px (x, y used; NaN rows skipped).
        visible: (68,) bool: green dots where True, red where False (None: all green).
        rotation: (3, 3) crop-frame head rotation (:class:`vrn.geometry.head_pose.HeadPose`):
            the face's own x (red; image right for a frontal face), y (green; down) and z
            (blue; out of the face) axes drawn from the nose tip (landmark 31, 1-based),
            projected orthographically; None: no axes.
        axis_length: px (None: half the landmark box size).
    Returns:
        (H, W, 3) uint8 RGB.
    """
    out = np.ascontiguousarray(np.asarray(image, np.uint8)).copy()
    lm = np.asarray(landmarks_3d, np.float64)
    ok = np.isfinite(lm[:, :2]).all(1)
    if not ok.any():
        return out
    box = np.ptp(lm[ok, :2], axis=0)
    size = float(np.sqrt(max(box[0] * box[1], 1.0)))
    radius = max(1, int(round(size / 80)))
    vis = np.ones(len(lm), bool) if visible is None else np.asarray(visible, bool)
    for (x, y), v in zip(np.round(lm[ok, :2]).astype(int), vis[ok]):  # 68 dots
        cv2.circle(out, (int(x), int(y)), radius, _VISIBLE_RGB if v else _HIDDEN_RGB, -1, cv2.LINE_AA)
    if rotation is not None and ok[30]:
        R = np.asarray(rotation, np.float64)
        length = float(axis_length) if axis_length else size / 2
        o = lm[30, :2]
        # draw the axis pointing most away from the camera first, so nearer axes stay on top
        for k in np.argsort(R[2, :]):
            end = o + length * R[:2, k]
            p0 = (int(round(o[0])), int(round(o[1])))
            p1 = (int(round(end[0])), int(round(end[1])))
            cv2.arrowedLine(out, p0, p1, _AXIS_RGB[k], max(1, radius), cv2.LINE_AA, tipLength=0.15)
    return out


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an (H, W, 3) RGB or (H, W) grey uint8 PNG atomically."""
    return atomic_write(path, encode_image_rgb(image, ".png"))


def save_gif(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: float = 12.0) -> Path:
    """Write RGB frames as a looping GIF atomically.

    One 256-colour palette (Pillow's fast octree, from a sample of the frames) is shared by
    all frames: no palette flicker, and 10-50x faster than quantising every frame on its
    own (imageio's default), which dominated the demo's time per face.
    """
    fr = [np.ascontiguousarray(f[..., :3], dtype=np.uint8) for f in frames]
    step = max(1, len(fr) // 6)
    palette = Image.fromarray(np.concatenate(fr[::step], axis=0)).quantize(256, method=Image.Quantize.FASTOCTREE)
    ims = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in fr]
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=int(round(1000.0 / fps)), loop=0)
    return atomic_write(path, buf.getvalue())

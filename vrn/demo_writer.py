"""Demo, per face: post-processing and the files it writes, in a thread pool.

:func:`write_face` turns one predicted occupancy volume into the face's files (meshes,
depth map, overlay, turntable, compact volume); :class:`FaceWriter` runs it in a thread
pool beside the network with a bounded backlog. Coordinates: meshes are in image px of the
photo (x right, y down, z toward the camera; :mod:`vrn.conventions`); the optional copy for
3D viewers (W&B) is y-up (x, -y, z) with the winding reversed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vrn import render
from vrn.atomic_write import atomic_write
from vrn.inference import PreparedImage, Reconstructor
from vrn.pose_landmarks import PoseLandmarks
from vrn.volume.codec import encode, to_bytes
from vrn.volume.confidence import confidence_colors
from vrn.volume.mesh import export_mesh

log = logging.getLogger(__name__)

__all__ = ["MESH_EXTS", "FaceMesh", "FaceOutput", "FaceWriter", "face_outputs", "write_face", "write_face_safe"]

MESH_EXTS = ("obj", "ply", "glb")


@dataclass
class FaceMesh:
    """A face's mesh kept in memory for the caller (the video overlay): image px
    (V, 3) float32 verts, (F, 3) int32 faces, (V, 3) uint8 RGB colours, (V,) float32 confidence."""

    verts: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    confidence: np.ndarray


@dataclass
class FaceOutput:
    """What was written for one face (``files``: kind -> path; ``timings``: stage -> s;
    ``confidence_mean``: mean per-vertex confidence, :mod:`vrn.volume.confidence`; ``mesh``:
    the mesh itself when :class:`FaceWriter` was asked to keep it, never in summary.json)."""

    face_index: int
    score: float
    has_surface: bool
    n_verts: int = 0
    n_faces: int = 0
    files: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    confidence_mean: float | None = None
    mesh: FaceMesh | None = field(default=None, repr=False, compare=False)
    #: head pose (``pose_landmarks: true``): yaw, pitch, roll degrees (AFLW2000-3D convention), ...
    pose: dict[str, Any] | None = None
    #: 68 x [x, y, z] image px (:mod:`vrn.pose_landmarks`) and which took z from the surface
    landmarks_3d: list[list[float | None]] | None = None
    landmarks_visible: list[bool] | None = None


def face_outputs(out_dir: Path, stem: str, k: int, cfg: Mapping[str, Any]) -> dict[str, Path]:
    """The output files of face ``k`` of image ``stem`` under the config's switches.

    Raises:
        ValueError: ``formats`` names a mesh format other than :data:`MESH_EXTS`.
    """
    c = cfg
    formats = [str(f).lower().lstrip(".") for f in (c.get("formats") or [])]
    if c.get("glb") and "glb" not in formats:
        formats.append("glb")
    bad = [f for f in formats if f not in MESH_EXTS]
    if bad:
        raise ValueError(f"formats={bad} not supported; choose from {list(MESH_EXTS)}")
    base = f"{stem}_face{k}"
    files = {f: out_dir / f"{base}.{f}" for f in formats}
    if c.get("depth", True):
        files["depth"] = out_dir / f"{base}_depth.png"
    if c.get("overlay", True):
        files["overlay"] = out_dir / f"{base}_overlay.png"
    if c.get("confidence_map", False):
        files["confidence"] = out_dir / f"{base}_confidence.png"
    if c.get("turntable", True):
        files["turntable"] = out_dir / f"{base}_turntable.gif"
    if c.get("save_volume", False):
        files["volume"] = out_dir / f"{base}.vrnc"
    return files


def _export_meshes(
    out: FaceOutput,
    files: dict[str, Path],
    verts: np.ndarray,
    faces: np.ndarray,
    colors: np.ndarray,
    confidence: np.ndarray | None = None,
) -> None:
    """Mesh files; .ply also gets the (V,) confidence as the vertex property ``quality``."""
    for ext in MESH_EXTS:
        if ext in files:
            export_mesh(files[ext], verts, faces, colors, confidence)
            out.files[ext] = str(files[ext])


def _render_views(
    out: FaceOutput,
    files: dict[str, Path],
    image: np.ndarray,
    verts: np.ndarray,
    faces: np.ndarray,
    confidence: np.ndarray,
    marks: PoseLandmarks | None = None,
) -> None:
    """Depth map, overlay and confidence map of the (V, 3) image-px mesh over the (H, W, 3) photo;
    with ``marks``, the overlay also shows the 68 landmarks and the pose axes."""
    H, W = image.shape[:2]
    if "depth" in files:
        d8, _ = render.render_depth(verts, faces, H, W)
        render.save_png(files["depth"], d8)
        out.files["depth"] = str(files["depth"])
    if "overlay" in files:
        ov = render.render_overlay(image, [(verts, faces)])
        if marks is not None:
            ov = render.draw_pose_landmarks(ov, marks.landmarks_3d, marks.visible, marks.pose.rotation)
        render.save_png(files["overlay"], ov)
        out.files["overlay"] = str(files["overlay"])
    if "confidence" in files:  # the mesh in confidence colours (red low, green high) over the photo
        conf_rgb = render.render_overlay(image, [(verts, faces)], alpha=1.0, colors=[confidence_colors(confidence)])
        render.save_png(files["confidence"], conf_rgb)
        out.files["confidence"] = str(files["confidence"])


def _viewer_copy(
    viewer_dir: Path, image_path: str | None, k: int, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray
) -> Path:
    """A y-up, right-handed .glb copy for 3D viewers: (x, -y, z) with the winding reversed."""
    tag = hashlib.sha1(str(image_path).encode()).hexdigest()[:6]
    p = Path(viewer_dir) / f"{Path(image_path or 'image').stem}_{tag}_face{k}_yup.glb"
    export_mesh(p, verts * np.array([1, -1, 1], np.float32), faces[:, ::-1], colors)
    return p


def write_face(
    rec: Reconstructor,
    prep: PreparedImage,
    k: int,
    prob: np.ndarray,
    files: dict[str, Path],
    cfg: Mapping[str, Any],
    viewer_dir: Path | None = None,
    keep_mesh: bool = False,
) -> FaceOutput:
    """Post-process face ``k`` of ``prep`` and write its ``files`` (see :func:`face_outputs`).

    prob: (D, H, W) float occupancy probabilities of the face's crop. ``cfg`` gives the
    turntable settings (``turntable_frames``, ``turntable_size``, ``turntable_sweep``).
    With ``viewer_dir``, a y-up .glb copy for W&B is written there too (``files["wandb_glb"]``).
    ``keep_mesh``: the result also holds the mesh (:class:`FaceMesh`, ``out.mesh``).
    ``cfg["confidence_colors"]``: colour the meshes by confidence instead of the photo.
    """
    det = prep.detections[k]
    verts, faces, colors, confidence, tm = rec.postprocess(prob, prep.transforms[k], prep.image)
    if cfg.get("confidence_colors", False):  # the meshes and turntable show confidence, not the photo
        colors = confidence_colors(confidence)
    out = FaceOutput(
        face_index=k,
        score=float(det.score),
        has_surface=len(faces) > 0,
        n_verts=len(verts),
        n_faces=len(faces),
        timings=tm,
        confidence_mean=float(confidence.mean()) if len(confidence) else None,
        mesh=FaceMesh(verts, faces, colors, confidence) if keep_mesh else None,
    )
    marks = None
    if cfg.get("pose_landmarks", True):
        tp = time.perf_counter()
        marks = rec.pose_landmarks(prob, prep.transforms[k], np.asarray(det.landmarks, np.float64)[:, :2])
        tm["pose"] = time.perf_counter() - tp
        if marks is not None:
            d = marks.to_dict()
            out.pose, out.landmarks_3d, out.landmarks_visible = d["pose"], d["landmarks_3d"], d["landmarks_visible"]
    if "volume" in files:
        tv = time.perf_counter()
        atomic_write(files["volume"], to_bytes(encode(prob > rec.threshold)))
        out.files["volume"] = str(files["volume"])
        tm["volume"] = time.perf_counter() - tv
    if not out.has_surface:
        return out
    t0 = time.perf_counter()
    _export_meshes(out, files, verts, faces, colors, confidence)
    t1 = time.perf_counter()
    tm["export"] = t1 - t0
    _render_views(out, files, prep.image, verts, faces, confidence, marks if cfg.get("draw_landmarks") else None)
    t2 = time.perf_counter()
    tm["render"] = t2 - t1
    if "turntable" in files:
        frames = render.render_turntable(
            verts,
            faces,
            colors,
            frames=int(cfg.get("turntable_frames", 24)),
            size=int(cfg.get("turntable_size", 256)),
            sweep_deg=float(cfg.get("turntable_sweep", 360)),
        )
        render.save_gif(files["turntable"], frames)
        out.files["turntable"] = str(files["turntable"])
        tm["turntable"] = time.perf_counter() - t2
    if viewer_dir is not None:
        t3 = time.perf_counter()
        out.files["wandb_glb"] = str(_viewer_copy(viewer_dir, prep.path, k, verts, faces, colors))
        tm["viewer"] = time.perf_counter() - t3
    return out


def write_face_safe(
    rec: Reconstructor,
    prep: PreparedImage,
    k: int,
    prob: np.ndarray,
    files: dict[str, Path],
    cfg: Mapping[str, Any],
    viewer_dir: Path | None = None,
    keep_mesh: bool = False,
) -> FaceOutput:
    """:func:`write_face`; an exception fails this face only (reported), not the run."""
    try:
        return write_face(rec, prep, k, prob, files, cfg, viewer_dir, keep_mesh)
    except Exception as e:  # noqa: BLE001
        log.exception(f"{prep.path}: face {k} failed")
        return FaceOutput(
            face_index=k, score=float(prep.detections[k].score), has_surface=False, error=f"{type(e).__name__}: {e}"
        )


class FaceWriter:
    """Runs :func:`write_face_safe` in ``threads`` threads, at most ``max_backlog`` faces pending.

    ``threads=0`` runs it in the calling thread (nothing overlaps the network: exact
    per-image timings, for profiling).

    With ``viewer_root`` a temporary folder ``.wandb_meshes_*`` is made there for the y-up
    copies that W&B logs (W&B copies them into its run folder); :meth:`close` removes it.
    ``keep_meshes``: each :class:`FaceOutput` also holds its mesh (``mesh``; the video path
    draws every face of a frame into one overlay frame).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        rec: Reconstructor,
        cfg: Mapping[str, Any],
        threads: int = 2,
        max_backlog: int = 2,
        viewer_root: str | os.PathLike | None = None,
        keep_meshes: bool = False,
    ) -> None:
        self.rec = rec
        self.keep_meshes = bool(keep_meshes)
        self.cfg = cfg
        self.max_backlog = max(1, int(max_backlog))
        self.inline = int(threads) <= 0
        self.pool = ThreadPoolExecutor(max(1, int(threads)), thread_name_prefix="vrn-post")
        self.viewer_dir = Path(tempfile.mkdtemp(prefix=".wandb_meshes_", dir=viewer_root)) if viewer_root else None
        self._inflight: list[Future] = []

    def submit(self, prep: PreparedImage, k: int, prob: np.ndarray, files: dict[str, Path]) -> Future:
        """Queue face ``k`` (prob: (D, H, W) float); blocks first while the backlog is full
        (bounds memory, ~30 MB per pending volume). The future yields a :class:`FaceOutput`."""
        if self.inline:
            done: Future = Future()
            done.set_result(
                write_face_safe(self.rec, prep, k, prob, files, self.cfg, self.viewer_dir, self.keep_meshes)
            )
            return done
        while len(self._inflight) >= self.max_backlog:
            self._inflight.pop(0).result()
        fut = self.pool.submit(
            write_face_safe, self.rec, prep, k, prob, files, self.cfg, self.viewer_dir, self.keep_meshes
        )
        self._inflight.append(fut)
        return fut

    def wait(self) -> None:
        """Block until every queued face is written."""
        for f in self._inflight:
            f.result()

    def close(self) -> None:
        """Wait for the pool and remove the temporary viewer copies."""
        self.pool.shutdown(wait=True)
        if self.viewer_dir is not None:
            shutil.rmtree(self.viewer_dir, ignore_errors=True)

    def __enter__(self) -> FaceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Demo: every face in every photo -> mesh files, depth map, overlay and turntable.

``python -m vrn.demo input=PATH_OR_DIR ckpt=CKPT output_dir=OUT [device=cuda] [precision=bf16]
[detector=tddfa] [formats=[obj,ply]] [glb=true] [turntable=false]`` (conf/demo.yaml).

Per face ``k`` of ``<image>`` (``k`` counts faces left to right), in ``output_dir`` (input
sub-folders are mirrored):

* ``<image>_face<k>.obj`` / ``.ply`` (per-vertex colour) / ``.glb``: the mesh in image px
  (x right, y down, z toward the camera; :mod:`vrn.conventions`),
* ``<image>_face<k>_depth.png``: front-surface depth of the face's window (near = bright),
* ``<image>_face<k>_overlay.png``: the shaded mesh drawn over the photo,
* ``<image>_face<k>_turntable.gif``: the coloured mesh turning about its vertical axis,
* ``<image>_face<k>.vrnc`` (``save_volume=true``): the predicted occupancy, compact code.

One summary line per image on stdout; images without a face and unreadable files are
reported and skipped. ``summary.json`` in ``output_dir`` lists everything.

Throughput: images are decoded, detected and cropped in DataLoader worker processes; the
main thread feeds the network ``batch_size`` faces at a time; marching cubes, colours,
renders and file writes run in a thread pool beside it, so an accelerator is not left
waiting on the CPU stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from vrn.detectors import get_detector
from vrn.image_io import IMAGE_EXTS, ImageReadError, list_image_files
from vrn.inference import PreparedImage, Reconstructor, prepare_image

log = logging.getLogger(__name__)

__all__ = ["run_demo", "ImageReport", "FaceOutput", "find_images", "face_outputs"]

MESH_EXTS = ("obj", "ply", "glb")


# --------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------


@dataclass
class FaceOutput:
    """What was written for one face."""

    face_index: int
    score: float
    has_surface: bool
    n_verts: int = 0
    n_faces: int = 0
    files: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ImageReport:
    """One input image: ``status`` is "ok", "no_face" or "unreadable"."""

    path: str
    status: str
    message: str
    faces: list[FaceOutput] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        """The one-line summary printed for this image."""
        name = self.path
        if self.status != "ok":
            return f"{name}: {self.message}"
        parts = []
        for f in self.faces:
            if f.error:
                parts.append(f"face{f.face_index}: FAILED ({f.error})")
            elif f.has_surface:
                parts.append(f"face{f.face_index}: {f.n_verts} verts")
            else:
                parts.append(f"face{f.face_index}: no surface (empty volume), nothing written")
        return f"{name}: {len(self.faces)} face(s) [{'; '.join(parts)}] in {self.seconds:.2f} s"


# --------------------------------------------------------------------------------------
# input
# --------------------------------------------------------------------------------------


def find_images(input_path: str | os.PathLike, recursive: bool = True) -> tuple[Path, list[Path]]:
    """The images to process: the file itself, or the image files of a folder (sorted).

    Returns:
        (root the outputs mirror, image paths).
    Raises:
        FileNotFoundError: the input does not exist or the folder holds no image files.
    """
    p = Path(os.path.expanduser(str(input_path)))
    if p.is_file():
        return p.parent, [p]
    if p.is_dir():
        files = [p / r for r in list_image_files(p, IMAGE_EXTS, recursive)]
        if not files:
            raise FileNotFoundError(f"input={p} holds no image files ({', '.join(IMAGE_EXTS)})")
        return p, files
    raise FileNotFoundError(f"input={p} does not exist: give an image file or a folder of images")


class _ImageDataset(Dataset):
    """Reads, detects and crops one photo per item (runs in DataLoader workers)."""

    def __init__(self, paths: list[Path], detector: Any) -> None:
        self.paths = paths
        self.detector = detector

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        try:
            self.detector.setup()
        except Exception as e:  # noqa: BLE001 - a model that cannot load stops the run, with a hint
            raise RuntimeError(
                f"Face detector '{self.detector.name}' could not load its models: {type(e).__name__}: {e}. "
                f"Offline, use detector=tddfa (runs from the project's assets).") from e
        t0 = time.perf_counter()
        try:
            prep = prepare_image(path, self.detector)
        except ImageReadError as e:
            return {"index": i, "path": str(path), "error": str(e), "t0": t0}
        return {"index": i, "path": str(path), "prep": prep, "t0": t0}


def _first(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]


# --------------------------------------------------------------------------------------
# per face: post-processing and files
# --------------------------------------------------------------------------------------


def face_outputs(out_dir: Path, stem: str, k: int, cfg: DictConfig | dict[str, Any]) -> dict[str, Path]:
    """The output files of face ``k`` of image ``stem`` under the config's switches."""
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
    if c.get("turntable", True):
        files["turntable"] = out_dir / f"{base}_turntable.gif"
    if c.get("save_volume", False):
        files["volume"] = out_dir / f"{base}.vrnc"
    return files


def _write_face(rec: Reconstructor, prep: PreparedImage, k: int, prob: np.ndarray, files: dict[str, Path],
                cfg: dict[str, Any]) -> FaceOutput:
    from vrn import render
    from vrn.atomic_write import atomic_write
    from vrn.volume.codec import encode, to_bytes
    from vrn.volume.mesh import export_mesh

    det = prep.detections[k]
    verts, faces, colors, tm = rec.postprocess(prob, prep.transforms[k], prep.image)
    out = FaceOutput(face_index=k, score=float(det.score), has_surface=len(faces) > 0,
                     n_verts=int(len(verts)), n_faces=int(len(faces)), timings=tm)
    if "volume" in files:
        atomic_write(files["volume"], to_bytes(encode(prob > rec.threshold)))
        out.files["volume"] = str(files["volume"])
    if not out.has_surface:
        return out
    H, W = prep.image.shape[:2]
    t0 = time.perf_counter()
    for ext in MESH_EXTS:
        if ext in files:
            export_mesh(files[ext], verts, faces, colors)
            out.files[ext] = str(files[ext])
    t1 = time.perf_counter()
    tm["export"] = t1 - t0
    if "depth" in files:
        d8, _ = render.render_depth(verts, faces, H, W)
        render.save_png(files["depth"], d8)
        out.files["depth"] = str(files["depth"])
    if "overlay" in files:
        render.save_png(files["overlay"], render.render_overlay(prep.image, [(verts, faces)]))
        out.files["overlay"] = str(files["overlay"])
    t2 = time.perf_counter()
    tm["render"] = t2 - t1
    if "turntable" in files:
        frames = render.render_turntable(verts, faces, colors, frames=int(cfg.get("turntable_frames", 24)),
                                         size=int(cfg.get("turntable_size", 256)),
                                         sweep_deg=float(cfg.get("turntable_sweep", 360)))
        render.save_gif(files["turntable"], frames)
        out.files["turntable"] = str(files["turntable"])
        tm["turntable"] = time.perf_counter() - t2
    if cfg.get("_wandb_dir"):
        # a y-up, right-handed copy for 3D viewers: (x, -y, z) with the winding reversed
        tag = hashlib.sha1(str(prep.path).encode()).hexdigest()[:6]
        p = Path(cfg["_wandb_dir"]) / f"{Path(prep.path or 'image').stem}_{tag}_face{k}_yup.glb"
        export_mesh(p, verts * np.array([1, -1, 1], np.float32), faces[:, ::-1], colors)
        out.files["wandb_glb"] = str(p)
    return out


def _write_face_safe(rec: Reconstructor, prep: PreparedImage, k: int, prob: np.ndarray, files: dict[str, Path],
                     cfg: dict[str, Any]) -> FaceOutput:
    """:func:`_write_face`; an exception fails this face only (reported), not the run."""
    try:
        return _write_face(rec, prep, k, prob, files, cfg)
    except Exception as e:  # noqa: BLE001
        log.exception(f"{prep.path}: face {k} failed")
        return FaceOutput(face_index=k, score=float(prep.detections[k].score), has_surface=False,
                          error=f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------


@dataclass
class _ImageState:
    report: ImageReport
    prep: PreparedImage | None
    stem: str
    out_dir: Path
    futures: list[Future] = field(default_factory=list)
    t0: float = 0.0


def _build_detector(cfg: DictConfig) -> Any:
    kw: dict[str, Any] = {"device": str(cfg.get("detector_device") or "cpu")}
    if cfg.get("min_score") is not None:
        kw["min_score"] = float(cfg.min_score)
    if cfg.get("max_faces") is not None:
        kw["max_faces"] = int(cfg.max_faces)
    return get_detector(str(cfg.detector), **kw)


def _plain(cfg: DictConfig) -> dict[str, Any]:
    """The config as a resolved dict, without Hydra's own node."""
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.to_container(plain, resolve=True)  # type: ignore[return-value]


def _start_wandb(cfg: DictConfig, out_dir: Path) -> bool:
    """Start a W&B run when asked (offline without an API key); True if this call started it."""
    if not cfg.get("wandb", False):
        return False
    import wandb

    if wandb.run is not None:
        return False
    from vrn.trainer import wandb_has_api_key

    mode = "offline" if (os.environ.get("WANDB_MODE") == "offline" or not wandb_has_api_key()) else "online"
    wandb.init(project=str(cfg.get("wandb_project", "vrn-demo")), dir=str(out_dir), mode=mode, job_type="demo",
               config=_plain(cfg))
    return True


def run_demo(cfg: DictConfig) -> list[ImageReport]:
    """Run the demo for a composed ``conf/demo.yaml``; returns one report per input image."""
    out_root = Path(os.path.expanduser(str(cfg.output_dir)))
    out_root.mkdir(parents=True, exist_ok=True)
    root, paths = find_images(cfg.input, bool(cfg.get("recursive", True)))
    face_outputs(out_root, "x", 0, cfg)  # validates `formats` before any work
    rec = Reconstructor.from_checkpoint(str(cfg.ckpt), device=str(cfg.device), precision=str(cfg.precision),
                                        detector=None, threshold=float(cfg.threshold),
                                        batch_size=int(cfg.batch_size))
    detector = _build_detector(cfg)
    log.info(f"{rec!r}; detector={detector.name}; {len(paths)} image(s) from {cfg.input}")

    started_wandb = _start_wandb(cfg, out_root)
    import importlib.util

    wandb_run = None
    if importlib.util.find_spec("wandb") is not None:
        import wandb

        wandb_run = wandb.run
    wandb_dir = None
    if wandb_run is not None:
        wandb_dir = tempfile.mkdtemp(prefix=".wandb_meshes_", dir=out_root)
    wcfg: dict[str, Any] = {**_plain(cfg), "_wandb_dir": wandb_dir}

    nw = int(cfg.get("num_workers", 0))
    # (DataLoader workers run torch single-threaded already; do not touch OpenCV's thread pool in a
    # forked worker: reconfiguring it after fork can hang when the parent has used it)
    loader = DataLoader(_ImageDataset(paths, detector), batch_size=1, shuffle=False, num_workers=nw,
                        collate_fn=_first, prefetch_factor=2 if nw > 0 else None,
                        multiprocessing_context=cfg.get("worker_start") if nw > 0 else None)
    batch_size = max(1, int(cfg.batch_size))
    max_backlog = max(2, 2 * batch_size)
    pool = ThreadPoolExecutor(max(1, int(cfg.get("post_threads", 2))), thread_name_prefix="vrn-post")
    states: "OrderedDict[int, _ImageState]" = OrderedDict()
    queue: list[tuple[_ImageState, int]] = []
    inflight: list[Future] = []
    reports: list[ImageReport] = []
    t_start = time.perf_counter()
    n_faces = 0

    def run_batch(items: list[tuple[_ImageState, int]]) -> None:
        crops = np.stack([st.prep.crops[k] for st, k in items])  # type: ignore[union-attr]
        probs = rec.reconstruct_crops(crops)
        for (st, k), p in zip(items, probs):
            while len(inflight) >= max_backlog:  # bound memory (~30 MB per pending volume)
                inflight.pop(0).result()
            files = face_outputs(st.out_dir, st.stem, k, cfg)
            fut = pool.submit(_write_face_safe, rec, st.prep, k, p.numpy(), files, wcfg)  # type: ignore[arg-type]
            st.futures.append(fut)
            inflight.append(fut)

    def flush(final: bool = False) -> None:
        # report images in input order as soon as all of their faces are written
        while states:
            idx, st = next(iter(states.items()))
            if st.prep is not None and len(st.prep) and len(st.futures) < len(st.prep):
                return  # faces still queued for the network
            if not final and not all(f.done() for f in st.futures):
                return
            st.report.faces = [f.result() for f in st.futures]
            if st.futures:
                st.report.seconds = time.perf_counter() - st.t0
            states.popitem(last=False)
            _finish_image(st.report, wandb_run)
            reports.append(st.report)

    try:
        for item in loader:
            path = Path(item["path"])
            rel = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
            out_dir = out_root / rel.parent
            report = ImageReport(path=rel.as_posix(), status="ok", message="")
            st = _ImageState(report, item.get("prep"), path.stem, out_dir, t0=item["t0"])
            states[item["index"]] = st
            if "error" in item:
                report.status = "unreadable"
                report.message = f"unreadable image, skipped ({item['error']})"
            elif len(st.prep) == 0:  # type: ignore[arg-type]
                report.status = "no_face"
                report.message = f"no face found (detector={detector.name}), skipped"
            else:
                out_dir.mkdir(parents=True, exist_ok=True)
                n_faces += len(st.prep)  # type: ignore[arg-type]
                queue.extend((st, k) for k in range(len(st.prep)))  # type: ignore[arg-type]
            while len(queue) >= batch_size:
                run_batch(queue[:batch_size])
                del queue[:batch_size]
            flush()
        if queue:
            run_batch(queue)
            queue.clear()
        for f in inflight:
            f.result()
        flush(final=True)
    finally:
        pool.shutdown(wait=True)
        if wandb_dir is not None:  # W&B copied the meshes into its run folder when they were logged
            shutil.rmtree(wandb_dir, ignore_errors=True)
        if started_wandb:
            import wandb

            wandb.finish()
    dt = time.perf_counter() - t_start
    ok = sum(r.status == "ok" for r in reports)
    print(f"done: {len(reports)} image(s), {ok} with faces, {n_faces} face(s) in {dt:.1f} s -> {out_root}",
          flush=True)
    summary = {"ckpt": str(cfg.ckpt), "model": rec.model_spec, "detector": detector.describe(),
               "device": str(cfg.device), "precision": str(cfg.precision), "threshold": rec.threshold,
               "seconds": dt, "images": [asdict(r) for r in reports]}
    from vrn.atomic_write import atomic_write

    atomic_write(out_root / "summary.json", json.dumps(summary, indent=2).encode())
    return reports


def _finish_image(report: ImageReport, wandb_run: Any) -> None:
    print(report.line(), flush=True)
    if wandb_run is None or report.status != "ok":
        return
    import wandb

    logged = {}
    for f in report.faces:
        p = f.files.get("wandb_glb")
        if p:
            logged[f"demo/face{f.face_index}"] = wandb.Object3D(p, caption=f"{report.path} face {f.face_index}")
        if "overlay" in f.files:
            logged[f"demo/overlay{f.face_index}"] = wandb.Image(f.files["overlay"], caption=report.path)
    if logged:
        wandb_run.log(logged)


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo.yaml")
def main(cfg: DictConfig) -> None:
    run_demo(cfg)


if __name__ == "__main__":
    main()

"""Demo: every face in every photo -> mesh files, depth map, overlay and turntable.

``python -m vrn.demo input=PATH_OR_DIR ckpt=CKPT output_dir=OUT [device=cuda] [precision=bf16]
[detector=tddfa] [formats=[obj,ply]] [glb=true] [turntable=false] [backend=onnxruntime]``
(conf/demo.yaml; ``ckpt=model.onnx`` from :mod:`vrn.export` runs with onnxruntime).

A video ``input`` (``.mp4``, ``.avi``, ``.mov``, ``.mkv``, ``.webm``, ...) gives
``<video>_overlay.mp4`` and ``<video>_video.json`` (faces per frame with identities) instead:
:func:`_run_video`, docs/video_and_confidence.md.

Per face ``k`` of ``<image>`` (``k`` counts faces left to right), in ``output_dir`` (input
sub-folders are mirrored):

* ``<image>_face<k>.obj`` / ``.ply`` (per-vertex colour; .ply also ``quality`` = the vertex's
  confidence, :mod:`vrn.volume.confidence`) / ``.glb``: the mesh in image px
  (x right, y down, z toward the camera; :mod:`vrn.conventions`),
* ``<image>_face<k>_depth.png``: front-surface depth of the face's window (near = bright),
* ``<image>_face<k>_overlay.png``: the shaded mesh drawn over the photo,
* ``<image>_face<k>_turntable.gif``: the coloured mesh turning about its vertical axis,
* ``<image>_face<k>.vrnc`` (``save_volume=true``): the predicted occupancy, compact code,
* ``<image>_face<k>_confidence.png`` (``confidence_map=true``): the mesh coloured by confidence,
* in ``summary.json`` (``pose_landmarks=true``, the default): the head pose (yaw, pitch, roll)
  and 68 3D landmarks of each face (:mod:`vrn.pose_landmarks`); ``draw_landmarks=true`` draws
  them and the pose axes on the overlay.

Photos of one folder that share a stem (``face.jpg``, ``face.jpeg``) are told apart by their
extension: ``face_jpg_face0.*``, ``face_jpeg_face0.*`` (only when stems collide).

One summary line per image on stdout, with the image's own time split into ``detect`` (read,
detect, crop), ``network`` (its faces' share of each batch's network time), ``post``
(marching cubes, colours) and ``write`` (mesh files, renders, turntable, volume); the last
line gives the run's wall-clock total. The stages of different images overlap in time
(DataLoader workers, ``post_threads``), so the per-image totals add up to at most the run
total only when nothing runs beside the main thread (``num_workers=0 post_threads=0``).
Images without a face and unreadable files (0-byte,
truncated, not an image: reason ``unreadable_image``) are reported and skipped.
``summary.json`` in ``output_dir`` lists everything. ``output_dir`` is checked writable
before any work; the run exits 1 when no file could be written, and 2 with one line on
an expected error (:mod:`vrn.cli_errors`), leaving no empty output folder behind.

Throughput: images are decoded, detected and cropped in DataLoader worker processes; the
main thread feeds the network ``batch_size`` faces at a time; marching cubes, colours,
renders and file writes run in a thread pool beside it, so an accelerator is not left
waiting on the CPU stages.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from vrn.atomic_write import atomic_write
from vrn.cli_errors import UserError, check_device, make_dirs, prepare_output_dir, remove_empty, run_cli
from vrn.conventions import VolumeLayout
from vrn.demo_video import VideoSink
from vrn.demo_writer import MESH_EXTS, FaceOutput, FaceWriter, face_outputs
from vrn.detectors import get_detector
from vrn.image_io import IMAGE_EXTS, ImageReadError, list_image_files
from vrn.inference import PreparedImage, Reconstructor, prepare_image
from vrn.tracking import IouTracker
from vrn.video_io import (
    FrameReader,
    VideoInfo,
    VideoReadError,
    frame_blocks,
    is_video_file,
    open_video_writer,
    probe_video,
)
from vrn.wandb_logging import finish_run, image_media, is_active, log_media, mesh_media, start_run

log = logging.getLogger(__name__)

#: the per-image time split of the report lines and summary.json (seconds)
STAGES = ("detect", "network", "post", "write")
#: FaceOutput.timings keys (vrn.demo_writer.write_face) -> stage
_FACE_STAGE = {
    "marching_cubes": "post",
    "colour": "post",
    "confidence": "post",
    "pose": "post",
    "volume": "write",
    "export": "write",
    "render": "write",
    "turntable": "write",
    "viewer": "write",
}

__all__ = [
    "STAGES",
    "MESH_EXTS",
    "FaceOutput",
    "ImageReport",
    "face_outputs",
    "find_images",
    "output_stems",
    "run_demo",
]


# --------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------


@dataclass
class ImageReport:
    """One input image: ``status`` is "ok", "no_face" or "unreadable"; ``reason`` says why an
    image was skipped ("no_face", "unreadable_image"; "" when ok); ``output_stem``: the name its
    files start with. ``timings``: this image's own seconds per stage (:data:`STAGES`: detect,
    network, post, write) and their sum ``total`` (= ``seconds``); ``latency``: wall seconds
    from the start of its read to its last file written (queueing and overlap included)."""

    path: str
    status: str
    message: str
    faces: list[FaceOutput] = field(default_factory=list)
    seconds: float = 0.0
    reason: str = ""
    output_stem: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    latency: float = 0.0

    def time_split(self) -> str:
        """``"1.23 s (detect 0.40, network 0.50, post 0.13, write 0.20)"``."""
        parts = ", ".join(f"{k} {self.timings.get(k, 0.0):.2f}" for k in STAGES)
        return f"{self.seconds:.2f} s ({parts})"

    def line(self) -> str:
        """The one-line summary printed for this image."""
        name = self.path
        if self.status != "ok":
            return f"{name}: {self.message} in {self.time_split()}"
        parts = []
        for f in self.faces:
            if f.error:
                parts.append(f"face{f.face_index}: FAILED ({f.error})")
            elif f.has_surface:
                parts.append(f"face{f.face_index}: {f.n_verts} verts")
            else:
                parts.append(f"face{f.face_index}: no surface (empty volume), nothing written")
        return f"{name}: {len(self.faces)} face(s) [{'; '.join(parts)}] in {self.time_split()}"


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


#: the last bytes of a complete file, by its first bytes (a truncated download or copy lacks them)
def output_stems(root: Path, paths: list[Path]) -> list[str]:
    """The name each photo's files start with: its stem, or ``<stem>_<ext>`` when photos of
    one folder share a stem (``face.jpg`` / ``face.jpeg`` -> ``face_jpg`` / ``face_jpeg``);
    a remaining clash (``Face.JPG`` / ``Face.jpg``) gets ``_2``, ``_3``, ..."""

    def key(p: Path, stem: str) -> tuple[str, str]:
        parent = p.parent.relative_to(root).as_posix() if p.parent.is_relative_to(root) else ""
        return parent, stem.casefold()

    counts: dict[tuple[str, str], int] = {}
    for p in paths:
        counts[key(p, p.stem)] = counts.get(key(p, p.stem), 0) + 1
    stems = [p.stem if counts[key(p, p.stem)] == 1 else f"{p.stem}_{p.suffix.lstrip('.')}" for p in paths]
    taken = {key(p, p.stem) for p in paths if counts[key(p, p.stem)] == 1}
    out = []
    for p, stem in zip(paths, stems):
        name, n = stem, 1
        if counts[key(p, p.stem)] > 1:  # a renamed photo must not take another photo's name
            while key(p, name) in taken:
                n += 1
                name = f"{stem}_{n}"
            taken.add(key(p, name))
        out.append(name)
    return out


def _read_failure(path: Path, e: BaseException) -> str:
    if isinstance(e, ImageReadError):
        return str(e)
    return f"{path}: not a readable image ({type(e).__name__}: {' '.join(str(e).split())})"


class _ImageDataset(Dataset):
    """Reads, detects and crops one photo per item (runs in DataLoader workers)."""

    def __init__(self, paths: list[Path], detector: Any, layout: VolumeLayout) -> None:
        self.paths = paths
        self.detector = detector
        self.layout = layout

    def __len__(self) -> int:
        return len(self.paths)

    def _source(self, i: int) -> Path | np.ndarray:
        """What :func:`prepare_image` gets for item ``i``: the photo's path (it reads it)."""
        return self.paths[i]

    def _describe(self, i: int) -> dict[str, Any]:
        """The item's ``index`` and ``path`` (and, for video frames, ``frame``)."""
        return {"index": i, "path": str(self.paths[i])}

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self._describe(i)
        path = Path(item["path"])
        try:
            self.detector.setup()
        except Exception as e:  # noqa: BLE001 - a model that cannot load stops the run, with a hint
            raise RuntimeError(
                f"Face detector '{self.detector.name}' could not load its models: {type(e).__name__}: {e}. "
                f"Offline, use detector=tddfa (runs from the project's assets)."
            ) from e
        t0 = time.perf_counter()
        try:
            prep = prepare_image(self._source(i), self.detector, self.layout)
        except (ImageReadError, cv2.error, OSError) as e:
            dt = time.perf_counter() - t0
            return {**item, "error": _read_failure(path, e), "t0": t0, "detect_s": dt}
        return {**item, "prep": prep, "t0": t0, "detect_s": time.perf_counter() - t0}


class _VideoFrameDataset(_ImageDataset):
    """Decodes, detects and crops one video frame per item (item ``j`` = source frame
    ``frames[j]``); each DataLoader worker process decodes with its own
    :class:`~vrn.video_io.FrameReader` (:mod:`vrn.video_io` for the block scheme)."""

    def __init__(self, path: Path, frames: list[int], detector: Any, layout: VolumeLayout) -> None:
        super().__init__([path], detector, layout)
        self.frames = frames
        self.reader = FrameReader(path)

    def __len__(self) -> int:
        return len(self.frames)

    def _source(self, i: int) -> np.ndarray:
        return self.reader.read(self.frames[i])  # FrameReadError (an ImageReadError): this frame only

    def _describe(self, i: int) -> dict[str, Any]:
        return {"index": i, "path": str(self.paths[0]), "frame": self.frames[i]}


def _first(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]


def _block(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def _image_loader(paths: list[Path], detector: Any, layout: VolumeLayout, cfg: DictConfig) -> DataLoader:
    """One item per photo: ``{"index", "path", "t0", "detect_s"}`` plus ``"prep"`` or ``"error"``
    (``detect_s``: seconds to read, detect and crop it)."""
    return _loader(_ImageDataset(paths, detector, layout), cfg)


def _loader(dataset: _ImageDataset, cfg: DictConfig, block: int | None = None) -> DataLoader:
    """Items of ``dataset`` from ``num_workers`` worker processes, in order. ``block``: items
    go to the workers ``block`` consecutive ones at a time (video frames: a worker decodes a
    run of frames forward, :mod:`vrn.video_io`), and the loader yields lists of items."""
    nw = int(cfg.get("num_workers", 0))
    # (DataLoader workers run torch single-threaded already; do not touch OpenCV's thread pool in a
    # forked worker: reconfiguring it after fork can hang when the parent has used it)
    batching: dict[str, Any] = (
        {"batch_size": 1, "shuffle": False, "collate_fn": _first}
        if block is None
        else {"batch_sampler": frame_blocks(len(dataset), block), "collate_fn": _block}
    )
    return DataLoader(
        dataset,
        num_workers=nw,
        prefetch_factor=2 if nw > 0 else None,
        multiprocessing_context=cfg.get("worker_start") if nw > 0 else None,
        **batching,
    )


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
    #: seconds: read + detect + crop, and this image's share of the network batches
    detect_s: float = 0.0
    network_s: float = 0.0
    #: the loader item without its payload (``index``, ``path``, and ``frame`` for video frames)
    item: dict[str, Any] = field(default_factory=dict)


class _DemoRun:
    """The run loop's state: faces queued for the network, images waiting for their files.

    :meth:`add` takes one loader item; faces go to the network ``batch_size`` at a time
    (:meth:`_run_batch`) and on to the :class:`~vrn.demo_writer.FaceWriter`; :meth:`_flush`
    reports images in input order as soon as all of their faces are written: one line on
    stdout (and W&B media), or, with ``on_done`` (video frames), ``on_done(state)`` instead.
    """

    def __init__(
        self,
        cfg: DictConfig,
        rec: Reconstructor,
        writer: FaceWriter,
        root: Path,
        out_root: Path,
        detector_name: str,
        stems: list[str],
        on_done: Callable[[_ImageState], None] | None = None,
    ) -> None:
        self.on_done = on_done
        self.cfg = cfg
        self.rec = rec
        self.writer = writer
        self.root = root
        self.out_root = out_root
        self.detector_name = detector_name
        self.stems = stems
        #: folders this run made (removed again when they stay empty)
        self.made_dirs: list[Path] = []
        self.batch_size = max(1, int(cfg.batch_size))
        self.states: OrderedDict[int, _ImageState] = OrderedDict()
        self.queue: list[tuple[_ImageState, int]] = []
        self.reports: list[ImageReport] = []
        self.n_faces = 0

    def add(self, item: dict[str, Any]) -> None:
        """One loader item: report it, queue its faces, run full batches, report finished images."""
        path = Path(item["path"])
        rel = path.relative_to(self.root) if path.is_relative_to(self.root) else Path(path.name)
        out_dir = self.out_root / rel.parent
        stem = self.stems[item["index"]]
        report = ImageReport(path=rel.as_posix(), status="ok", message="", output_stem=stem)
        st = _ImageState(report, item.get("prep"), stem, out_dir, t0=item["t0"], detect_s=item.get("detect_s", 0.0))
        st.item = {k: item[k] for k in ("index", "path", "frame") if k in item}
        self.states[item["index"]] = st
        if "error" in item:
            report.status, report.reason = "unreadable", "unreadable_image"
            report.message = f"unreadable image, skipped ({item['error']})"
        elif len(st.prep) == 0:  # type: ignore[arg-type]
            report.status, report.reason = "no_face", "no_face"
            report.message = f"no face found (detector={self.detector_name}), skipped"
        else:
            self.made_dirs += make_dirs(out_dir)
            self.n_faces += len(st.prep)  # type: ignore[arg-type]
            self.queue.extend((st, k) for k in range(len(st.prep)))  # type: ignore[arg-type]
        while len(self.queue) >= self.batch_size:
            self._run_batch(self.queue[: self.batch_size])
            del self.queue[: self.batch_size]
        self._flush()

    def finish(self) -> list[ImageReport]:
        """Run the last partial batch, wait for every file, report the rest; all reports."""
        if self.queue:
            self._run_batch(self.queue)
            self.queue.clear()
        self.writer.wait()
        self._flush(final=True)
        return self.reports

    def _run_batch(self, items: list[tuple[_ImageState, int]]) -> None:
        t0 = time.perf_counter()
        crops = np.stack([st.prep.crops[k] for st, k in items])  # type: ignore[union-attr]
        marks = np.stack([st.prep.crop_landmarks()[k] for st, k in items]) if self.rec.needs_landmarks else None  # type: ignore[union-attr]
        probs = self.rec.reconstruct_crops(crops, marks)
        share = (time.perf_counter() - t0) / len(items)  # the batch's network time, shared by its faces
        for (st, k), p in zip(items, probs):
            st.network_s += share
            files = face_outputs(st.out_dir, st.stem, k, self.cfg)
            st.futures.append(self.writer.submit(st.prep, k, p.numpy(), files))  # type: ignore[arg-type]

    def _flush(self, final: bool = False) -> None:
        while self.states:
            st = next(iter(self.states.values()))
            if st.prep is not None and len(st.prep) and len(st.futures) < len(st.prep):
                return  # faces still queued for the network
            if not final and not all(f.done() for f in st.futures):
                return
            st.report.faces = [f.result() for f in st.futures]
            _set_timings(st)
            self.states.popitem(last=False)
            if self.on_done is not None:
                self.on_done(st)
            else:
                print(st.report.line(), flush=True)
                _log_report_to_wandb(st.report)
            self.reports.append(st.report)


def _set_timings(st: _ImageState) -> None:
    """The image's own seconds per stage (its faces' post-processing and writes summed) -> its report."""
    tm = dict.fromkeys(STAGES, 0.0)
    tm["detect"] = st.detect_s
    tm["network"] = st.network_s
    for f in st.report.faces:
        for key, sec in f.timings.items():
            if key in _FACE_STAGE:
                tm[_FACE_STAGE[key]] += sec
    tm["total"] = sum(tm[k] for k in STAGES)
    st.report.timings = tm
    st.report.seconds = tm["total"]
    st.report.latency = time.perf_counter() - st.t0


def _files_written(reports: list[ImageReport]) -> int:
    return sum(len(f.files) for r in reports for f in r.faces)


def _log_report_to_wandb(report: ImageReport) -> None:
    """Log an image's y-up meshes (Object3D) and overlays to the active W&B run, if any."""
    if report.status != "ok" or not is_active():
        return
    logged = {}
    for f in report.faces:
        p = f.files.get("wandb_glb")
        if p:
            logged[f"demo/face{f.face_index}"] = mesh_media(p, caption=f"{report.path} face {f.face_index}")
        if "overlay" in f.files:
            logged[f"demo/overlay{f.face_index}"] = image_media(f.files["overlay"], caption=report.path)
    log_media(logged)


def _json_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """asdict() factory for summary.json: drops in-memory meshes (``FaceOutput.mesh``)."""
    return {k: v for k, v in pairs if k != "mesh"}


def _write_summary(
    out_root: Path, cfg: DictConfig, rec: Reconstructor, detector: Any, reports: list[ImageReport], seconds: float
) -> None:
    summary = {
        "ckpt": str(cfg.ckpt),
        "model": rec.model_spec,
        "detector": detector.describe(),
        "device": str(cfg.device),
        "precision": str(cfg.precision),
        "threshold": rec.threshold,
        "backend": rec.backend,
        "seconds": seconds,
        "stage_seconds": {k: sum(r.timings.get(k, 0.0) for r in reports) for k in STAGES},
        "images": [asdict(r, dict_factory=_json_fields) for r in reports],
    }
    atomic_write(out_root / "summary.json", json.dumps(summary, indent=2).encode())


def run_demo(cfg: DictConfig) -> list[ImageReport]:
    """Run the demo for a composed ``conf/demo.yaml``; returns one report per input image.

    ``wandb: true`` starts a W&B run (:func:`vrn.wandb_logging.start_run`) unless one is
    active; with an active run, each face's y-up mesh and overlay are logged.
    """
    out_root = Path(os.path.expanduser(str(cfg.output_dir)))
    video = _probe_video_input(cfg) if is_video_file(cfg.input) else None  # a video: docs/video_and_confidence.md
    if video is None:
        root, paths = find_images(cfg.input, bool(cfg.get("recursive", True)))
    face_outputs(out_root, "x", 0, cfg)  # validates `formats` before any work
    check_device(str(cfg.device))
    made = prepare_output_dir(out_root)
    try:
        if video is not None:
            return _run_video(cfg, out_root, video)
        return _run(cfg, out_root, root, paths)
    except BaseException:
        remove_empty(made)  # no empty output folder after a failure
        raise


def _run(cfg: DictConfig, out_root: Path, root: Path, paths: list[Path]) -> list[ImageReport]:
    rec = Reconstructor.from_run_config(cfg)
    detector = _build_detector(cfg)
    log.info(f"{rec!r}; detector={detector.name}; {len(paths)} image(s) from {cfg.input}")

    plain = _plain(cfg)
    started_wandb = bool(cfg.get("wandb", False)) and start_run(
        str(cfg.get("wandb_project", "vrn-demo")), out_root, job_type="demo", config=plain
    )
    batch_size = max(1, int(cfg.batch_size))
    t_start = time.perf_counter()
    try:
        with FaceWriter(
            rec,
            plain,
            threads=int(cfg.get("post_threads", 2)),  # 0: in the main thread (exact per-image timings)
            max_backlog=max(2, 2 * batch_size),
            viewer_root=out_root if is_active() else None,
        ) as writer:
            run = _DemoRun(cfg, rec, writer, root, out_root, detector.name, output_stems(root, paths))
            try:
                for item in _image_loader(paths, detector, rec.layout, cfg):
                    run.add(item)
                reports = run.finish()
            finally:
                remove_empty(run.made_dirs)
    finally:
        if started_wandb:
            finish_run()
    dt = time.perf_counter() - t_start
    ok = sum(r.status == "ok" for r in reports)
    stages = ", ".join(f"{k} {sum(r.timings.get(k, 0.0) for r in reports):.2f}" for k in STAGES)
    print(
        f"done: {len(reports)} image(s), {ok} with faces, {run.n_faces} face(s) in {dt:.2f} s total "
        f"(stage seconds summed over images: {stages}) -> {out_root}",
        flush=True,
    )
    _write_summary(out_root, cfg, rec, detector, reports, dt)
    return reports


# --------------------------------------------------------------------------------------
# video input (docs/video_and_confidence.md)
# --------------------------------------------------------------------------------------


def _probe_video_input(cfg: DictConfig) -> VideoInfo:
    """The input video's frame count, fps and size; a config or file error as a UserError."""
    stride = int(cfg.get("video_stride", 1))
    if stride < 1:
        raise UserError(f"video_stride={stride}: give 1 (every frame) or more (every k-th frame)")
    try:
        return probe_video(cfg.input)
    except VideoReadError as e:
        raise UserError(str(e)) from e


def _frame_config(cfg: DictConfig) -> DictConfig:
    """The per-face outputs of a video frame: mesh files (``formats``) only with ``video_meshes``,
    no per-face depth / overlay / turntable / confidence map / volume (the overlay is the video)."""
    over: dict[str, Any] = dict.fromkeys(("depth", "overlay", "turntable", "confidence_map", "save_volume"), False)
    if not cfg.get("video_meshes", False):
        over.update(formats=[], glb=False)
    return OmegaConf.merge(cfg, over)  # type: ignore[return-value]


def _frame_done(sink: VideoSink, st: _ImageState) -> None:
    """Hand a finished frame (in order) to the video sink; its report gets ``path#frame``."""
    frame = int(st.item["frame"])
    prep = st.prep
    if st.report.status == "unreadable":
        st.report.reason = "unreadable_frame"
    boxes = np.array([d.box for d in prep.detections] if prep is not None else [], np.float64).reshape(-1, 4)
    sink.add(
        frame,
        prep.image if prep is not None else None,
        boxes,
        st.report.faces,
        st.report.status,
        st.report.message,
        st.report.timings,
    )
    st.report.path = f"{st.report.path}#{frame}"


def _run_video(cfg: DictConfig, out_root: Path, info: VideoInfo) -> list[ImageReport]:
    """Every ``video_stride``-th frame of a video through the photo machinery (loader workers,
    network batches, :class:`~vrn.demo_writer.FaceWriter`), then :class:`~vrn.demo_video.VideoSink`:
    identities, ``<stem>_overlay.mp4``, ``<stem>_video.json``; per-frame meshes in
    ``<stem>_meshes/`` with ``video_meshes``. Returns one report per processed frame."""
    path = Path(info.path)
    stride = int(cfg.get("video_stride", 1))
    frames = list(range(0, info.n_frames, stride))
    rec = Reconstructor.from_run_config(cfg)
    detector = _build_detector(cfg)
    log.info(f"{rec!r}; detector={detector.name}; {len(frames)} of {info.n_frames} frame(s) of {path}")
    fcfg = _frame_config(cfg)
    batch_size = max(1, int(cfg.batch_size))
    overlay = out_root / f"{path.stem}_overlay.mp4" if cfg.get("video_overlay", True) else None
    tracker = IouTracker(float(cfg.get("track_iou", 0.3)), int(cfg.get("track_max_gap", 10)))
    t_start = time.perf_counter()
    with ExitStack() as stack:
        vw = (
            stack.enter_context(open_video_writer(overlay, info.fps / stride, (info.width, info.height)))
            if overlay
            else None
        )
        sink = VideoSink(info, stride, len(frames), vw, tracker, progress=bool(cfg.get("progress", True)))
        stack.callback(sink.close)  # after an error: stop its thread before the video is dropped
        writer = stack.enter_context(
            FaceWriter(
                rec,
                _plain(fcfg),
                threads=int(cfg.get("post_threads", 2)),
                max_backlog=max(2, 2 * batch_size),
                keep_meshes=True,
            )
        )
        stems = [f"{path.stem}_frame{f:06d}" for f in frames]
        run = _DemoRun(
            fcfg,
            rec,
            writer,
            path.parent,
            out_root / f"{path.stem}_meshes",
            detector.name,
            stems,
            lambda st: _frame_done(sink, st),
        )
        try:
            dataset = _VideoFrameDataset(path, frames, detector, rec.layout)
            for block in _loader(dataset, cfg, block=int(cfg.get("video_block", 8))):
                for item in block:
                    run.add(item)
            reports = run.finish()
            dropped = sink.finish()
        finally:
            remove_empty(run.made_dirs)
    reports = reports[: len(reports) - dropped]
    dt = time.perf_counter() - t_start
    stage_s = {k: sum(r.timings.get(k, 0.0) for r in reports) for k in STAGES}
    header = {
        "video": str(path),
        "fps": info.fps,
        "n_frames": info.n_frames,
        "width": info.width,
        "height": info.height,
        "stride": stride,
        "frames_processed": len(reports),
        "end_of_stream": dropped,
        "overlay": str(overlay) if overlay else None,
        "ckpt": str(cfg.ckpt),
        "model": rec.model_spec,
        "detector": detector.describe(),
        "device": str(cfg.device),
        "threshold": rec.threshold,
        "seconds": dt,
        "stage_seconds": stage_s,
    }
    sink.write_json(out_root / f"{path.stem}_video.json", header)
    n_faces = sum(len(r.faces) for r in reports)
    print(
        f"done: {path.name}: {len(reports)} frame(s) (stride {stride}), {n_faces} face(s), "
        f"{len(tracker.tracks)} identit{'y' if len(tracker.tracks) == 1 else 'ies'} in {dt:.2f} s -> {out_root}",
        flush=True,
    )
    return reports


def _main(cfg: DictConfig) -> None:
    reports = run_demo(cfg)
    if _files_written(reports) == 0 and not is_video_file(cfg.input):  # a video always gets its JSON
        skipped = {r.reason or r.status for r in reports}
        print(
            f"vrn.demo: nothing written for {len(reports)} image(s) ({', '.join(sorted(skipped))}); "
            f"see {Path(os.path.expanduser(str(cfg.output_dir))) / 'summary.json'}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo.yaml")
def main(cfg: DictConfig) -> None:
    run_cli("vrn.demo", lambda: _main(cfg))


if __name__ == "__main__":
    main()

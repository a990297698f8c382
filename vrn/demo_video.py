"""Demo on a video, per processed frame in order: face identities, the overlay video, the
per-video JSON record.

:mod:`vrn.demo` runs the frames through the same loader / network batching / face writer as
photos and hands each finished frame, in frame order, to :meth:`VideoSink.add`, which

* gives its faces track ids (:class:`vrn.tracking.IouTracker`, box IoU),
* draws its meshes (grey clay, one z-buffer) with each face's box and ``id N`` over the
  frame and appends it to the overlay video (a background thread renders and writes, in
  order, so the network is not kept waiting),
* keeps its record for ``<video stem>_video.json``.

A frame that cannot be decoded is recorded (status ``unreadable``) and shows as a black
overlay frame, so the overlay keeps the video's timing; unreadable frames at the very end
are taken as a frame count the container overstated, dropped from the record and the
overlay, and counted as ``end_of_stream``.
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from vrn import render
from vrn.atomic_write import atomic_write
from vrn.demo_writer import FaceOutput
from vrn.tracking import IouTracker
from vrn.video_io import VideoFileWriter, VideoInfo

__all__ = ["VideoSink", "id_color"]

#: overlay frames waiting for the background thread at most (each holds a frame and its meshes)
_MAX_PENDING = 8
#: box / label colours (RGB), one per track id modulo its length
_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]],
    np.uint8,
)


def id_color(track_id: int) -> tuple[int, int, int]:
    """The RGB colour of a track id in the overlay."""
    c = _PALETTE[int(track_id) % len(_PALETTE)]
    return int(c[0]), int(c[1]), int(c[2])


def _overlay_frame(
    image: np.ndarray, meshes: list[tuple[np.ndarray, np.ndarray]], boxes: np.ndarray, ids: np.ndarray
) -> np.ndarray:
    """(H, W, 3) uint8 RGB frame with the meshes ((V, 3) image px verts, (F, 3) faces), each
    face's box (K, 4) and its ``id N`` label drawn on it."""
    out = render.render_overlay(image, meshes)
    thick = max(1, round(max(image.shape[:2]) / 400))
    for box, tid in zip(boxes, ids):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        col = id_color(int(tid))
        cv2.rectangle(out, (x1, y1), (x2, y2), col, thick)
        cv2.putText(out, f"id {int(tid)}", (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, col, thick)
    return out


def _face_record(f: FaceOutput, tid: int, box: np.ndarray) -> dict[str, Any]:
    return {
        "id": int(tid),
        "face_index": f.face_index,
        "box": [float(v) for v in box],
        "score": f.score,
        "has_surface": f.has_surface,
        "n_verts": f.n_verts,
        "n_faces": f.n_faces,
        "confidence_mean": f.confidence_mean,
        # head pose and 68 3D landmarks (None when pose_landmarks=false or no surface)
        "pose": f.pose,
        "landmarks_3d": f.landmarks_3d,
        "landmarks_visible": f.landmarks_visible,
        "files": f.files,
        "timings": f.timings,
        "error": f.error,
    }


class VideoSink:
    """Collects the processed frames of one video, in order (module doc).

    Args:
        info: the source video.
        stride: every ``stride``-th frame is processed.
        n_frames: processed frames expected (for the progress bar).
        overlay: the overlay video writer (None: no overlay video).
        tracker: assigns the ids.
        progress: show a progress bar (tqdm, on stderr).
    """

    def __init__(
        self,
        info: VideoInfo,
        stride: int,
        n_frames: int,
        overlay: VideoFileWriter | None,
        tracker: IouTracker,
        progress: bool = True,
    ) -> None:
        self.info = info
        self.stride = int(stride)
        self.overlay = overlay
        self.tracker = tracker
        self.records: list[dict[str, Any]] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vrn-video")  # one thread: frames stay in order
        self._pending: deque[Future] = deque()
        self._unreadable: list[dict[str, Any]] = []  # a run of unreadable frames not yet followed by a good one
        self._black = np.zeros((info.height, info.width, 3), np.uint8)
        self._bar = tqdm(total=n_frames, unit="frame", desc=Path(info.path).name, disable=not progress, leave=False)

    def add(
        self,
        frame: int,
        image: np.ndarray | None,
        boxes: np.ndarray,
        faces: list[FaceOutput],
        status: str,
        message: str,
        timings: dict[str, float],
    ) -> list[int]:
        """One processed frame, in frame order.

        Args:
            frame: its number in the source video.
            image: (H, W, 3) uint8 RGB frame (None when it could not be decoded).
            boxes: (K, 4) float detector boxes x1, y1, x2, y2 image px, one per face.
            faces: the K faces' outputs (their ``mesh`` is drawn, then dropped).
            status: "ok", "no_face" or "unreadable"; message: why, when not ok.
            timings: the frame's seconds per demo stage.
        Returns:
            the K track ids.
        """
        rec: dict[str, Any] = {
            "frame": int(frame),
            "time_s": frame / self.info.fps,
            "status": status,
            "message": message,
            "timings": timings,
            "faces": [],
        }
        self._bar.update(1)
        if image is None:
            self._unreadable.append(rec)
            return []
        self._flush_unreadable()
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        ids = self.tracker.update(frame, b)
        rec["faces"] = [_face_record(f, t, bx) for f, t, bx in zip(faces, ids, b)]
        self.records.append(rec)
        if self.overlay is not None:
            meshes = [(f.mesh.verts, f.mesh.faces) for f in faces if f.mesh is not None and f.has_surface]
            self._submit(_overlay_frame, image, meshes, b, ids)
        for f in faces:
            f.mesh = None  # the overlay task holds what it needs; free the rest
        return [int(t) for t in ids]

    def _flush_unreadable(self) -> None:
        for rec in self._unreadable:
            self.records.append(rec)
            if self.overlay is not None:
                self._submit(lambda: self._black)
        self._unreadable.clear()

    def _submit(self, fn: Any, *args: Any) -> None:
        while len(self._pending) >= _MAX_PENDING:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(lambda: self.overlay.write(fn(*args))))  # type: ignore[union-attr]

    def finish(self) -> int:
        """Wait for the overlay frames; returns the number of trailing unreadable frames dropped."""
        dropped = len(self._unreadable)
        self._unreadable.clear()
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)
            self._bar.close()
        return dropped

    def close(self) -> None:
        """Stop the background thread (after an error; :meth:`finish` on success)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._bar.close()

    def write_json(self, path: str | os.PathLike, header: dict[str, Any]) -> Path:
        """``header`` + per-track summary + per-frame records, atomically, as JSON."""
        tracks = [
            {"id": t.id, "first_frame": t.first_frame, "last_frame": t.last_frame, "n_frames": t.n_frames}
            for t in self.tracker.tracks
        ]
        body = {**header, "tracks": tracks, "frames": self.records}
        return atomic_write(path, json.dumps(body, indent=2).encode())

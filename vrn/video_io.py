"""Video files in and out (OpenCV): probe, per-process frame reading, blocks of frames for
DataLoader workers, and an atomic video writer.

Frames leave this module as (H, W, 3) uint8 **RGB** (OpenCV decodes BGR; converted here),
frame numbers count from 0 in decode order.

Worker scheme (:func:`frame_blocks`, :class:`FrameReader`): the processed frames (every
``stride``-th) are cut into blocks of ``block`` consecutive processed frames; a DataLoader
with ``batch_sampler=frame_blocks(...)`` hands block ``b`` to worker ``b % num_workers`` and
returns the blocks in order (a map-style dataset keeps its sampler's order), so the main
process sees every frame once, in order, with at most ``prefetch_factor * num_workers``
blocks in memory. Each worker process owns one :class:`FrameReader` (its own
``cv2.VideoCapture``, opened on first use): inside a block it decodes forward (``grab`` over
the skipped frames); to the start of its next block it seeks, and checks where the seek
landed (reopening and decoding forward when a container cannot seek exactly).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from vrn.atomic_write import atomic_path
from vrn.image_io import ImageReadError

__all__ = [
    "VIDEO_EXTS",
    "VideoInfo",
    "VideoReadError",
    "FrameReadError",
    "FrameReader",
    "VideoFileWriter",
    "is_video_file",
    "probe_video",
    "frame_blocks",
    "open_video_writer",
]

#: input file extensions treated as videos (anything OpenCV's FFmpeg backend decodes)
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
#: fourcc per output extension (mp4v in .mp4/.mov/.m4v, MJPG in .avi, VP80 in .webm)
_FOURCC = {".mp4": "mp4v", ".mov": "mp4v", ".m4v": "mp4v", ".avi": "MJPG", ".mkv": "mp4v", ".webm": "VP80"}
#: a forward jump of at most this many frames is decoded (grab) rather than seeked
_MAX_GRAB = 32
#: frame rate assumed when the container reports none
DEFAULT_FPS = 25.0


class VideoReadError(ValueError):
    """A video that OpenCV cannot open, or that holds no frame."""


class FrameReadError(ImageReadError):
    """One frame that could not be decoded (reported for that frame; the run goes on)."""


def is_video_file(path: str | os.PathLike) -> bool:
    """True when the path's extension is one of :data:`VIDEO_EXTS` (case-insensitive)."""
    return Path(str(path)).suffix.lower() in VIDEO_EXTS


@dataclass(frozen=True)
class VideoInfo:
    """A video's frame count (decodable frames), frame rate and frame size in px."""

    path: str
    n_frames: int
    fps: float
    width: int
    height: int


def _open(path: str) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        cap.release()
        raise VideoReadError(
            f"input={path}: OpenCV cannot open this video (missing file, or a codec/container its FFmpeg "
            f"build lacks): convert it, e.g. `ffmpeg -i {Path(path).name} -c:v libx264 out.mp4`"
        )
    return cap


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, fps and size of a video.

    The container's frame count is used when it reports one; otherwise (some .webm/.mkv) the
    frames are counted by decoding once. A count the container overstates shows up as
    unreadable frames at the end, which the demo drops (``end_of_stream``).

    Raises:
        VideoReadError: OpenCV cannot open it, or it has no frame.
    """
    p = str(Path(os.path.expanduser(str(path))))
    if not Path(p).is_file():
        raise VideoReadError(f"input={p} does not exist: give a video file ({', '.join(VIDEO_EXTS)})")
    cap = _open(p)
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if n <= 0:
            n = 0
            while cap.grab():
                n += 1
    finally:
        cap.release()
    if n <= 0 or w <= 0 or h <= 0:
        raise VideoReadError(f"input={p}: the video holds no decodable frame")
    return VideoInfo(p, n, fps if fps > 0 else DEFAULT_FPS, w, h)


class FrameReader:
    """Reads frames by number from one ``cv2.VideoCapture`` (one reader per process).

    Args:
        path: the video file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self._cap: cv2.VideoCapture | None = None
        self._next = 0  # the frame number the next read() returns

    def _reopen(self) -> cv2.VideoCapture:
        if self._cap is not None:
            self._cap.release()
        self._cap = _open(self.path)
        self._next = 0
        return self._cap

    def _seek(self, frame: int) -> None:
        cap = self._cap if self._cap is not None else self._reopen()
        if frame < self._next or frame - self._next > _MAX_GRAB:
            landed = cap.set(cv2.CAP_PROP_POS_FRAMES, frame) and int(round(cap.get(cv2.CAP_PROP_POS_FRAMES))) == frame
            if landed:
                self._next = frame
            else:  # the container cannot seek exactly: start over and decode forward
                cap = self._reopen()
        while self._next < frame:  # decode forward over the skipped frames
            if not cap.grab():
                raise FrameReadError(f"{self.path}: frame {frame}: the video ends at frame {self._next}")
            self._next += 1

    def read(self, frame: int) -> np.ndarray:
        """Frame ``frame`` as (H, W, 3) uint8 RGB.

        Raises:
            FrameReadError: it cannot be decoded (corrupt, or past the end).
        """
        self._seek(int(frame))
        ok, bgr = self._cap.read()  # type: ignore[union-attr]
        self._next += 1
        if not ok or bgr is None:
            raise FrameReadError(f"{self.path}: frame {frame} could not be decoded")
        return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __getstate__(self) -> dict[str, object]:  # a worker process opens its own capture
        return {"path": self.path}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(str(state["path"]))  # type: ignore[misc]


def frame_blocks(n: int, block: int) -> list[list[int]]:
    """Item numbers ``0 .. n-1`` in blocks of ``block`` consecutive ones (the last may be
    shorter): the ``batch_sampler`` of the video DataLoader (module doc)."""
    block = max(1, int(block))
    return [list(range(s, min(s + block, n))) for s in range(0, n, block)]


class VideoFileWriter:
    """Appends RGB frames to a video file with ``cv2.VideoWriter`` (see :func:`open_video_writer`).

    Args:
        path: the file; its extension picks the container (OpenCV) and the fourcc (:data:`_FOURCC`).
        fps: frames per second.
        size: (width, height) px of every frame.
        suffix: the container extension when ``path`` has another (a temporary name).
    """

    def __init__(self, path: str | os.PathLike, fps: float, size: tuple[int, int], suffix: str | None = None) -> None:
        ext = (suffix or Path(path).suffix).lower()
        self.size = (int(size[0]), int(size[1]))
        self._w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*_FOURCC.get(ext, "mp4v")), float(fps), self.size)
        if not self._w.isOpened():
            raise VideoReadError(f"OpenCV cannot write a {ext} video ({path}): its build lacks the encoder")
        self.n_frames = 0

    def write(self, rgb: np.ndarray) -> None:
        """One (height, width, 3) uint8 RGB frame."""
        if rgb.shape[:2] != (self.size[1], self.size[0]):
            raise ValueError(f"frame is {rgb.shape[1]}x{rgb.shape[0]}, the video {self.size[0]}x{self.size[1]}")
        self._w.write(cv2.cvtColor(np.ascontiguousarray(rgb, np.uint8), cv2.COLOR_RGB2BGR))
        self.n_frames += 1

    def release(self) -> None:
        self._w.release()


@contextlib.contextmanager
def open_video_writer(path: str | os.PathLike, fps: float, size: tuple[int, int]) -> Iterator[VideoFileWriter]:
    """A :class:`VideoFileWriter` on a temporary file that becomes ``path`` when the block
    ends without an error (:func:`vrn.atomic_write.atomic_path`); after an error nothing is left."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp_video = tmp.with_name(tmp.name + path.suffix)  # OpenCV picks the container by the name
        try:
            w = VideoFileWriter(tmp_video, fps, size, path.suffix)
            try:
                yield w
            finally:
                w.release()
            os.replace(tmp_video, tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp_video.unlink()

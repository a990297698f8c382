"""Face identities across video frames, by box overlap (IoU).

Rule (:class:`IouTracker`), applied to the processed frames in order:

* every face of the new frame is compared with every live track's last box by IoU
  (intersection over union of the x1, y1, x2, y2 boxes, image px);
* pairs are taken greedily, highest IoU first, each face and each track at most once, while
  the IoU is at least ``iou_threshold``; a matched face takes the track's id;
* an unmatched face starts a new track with the next id (0, 1, 2, ... in order of first
  appearance; ties in a frame go left to right, the detector's order);
* a track that is not matched keeps its last box and stays live for ``max_gap`` more
  processed frames (calls of :meth:`IouTracker.update`; with a video stride of k that is
  ``k * max_gap`` source frames); a face that comes back within that gap near its old box
  gets its old id back, later it gets a new one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["box_iou", "IouTracker", "Track"]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes.

    Args:
        a: (N, 4) float x1, y1, x2, y2 (any px frame, x2 >= x1, y2 >= y1).
        b: (M, 4) float, same frame.
    Returns:
        (N, M) float64 in [0, 1] (0 for empty boxes).
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0.0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


@dataclass
class Track:
    """One identity: its id, last box (x1, y1, x2, y2 image px), the first and last source
    frame it was seen in, the number of processed frames it was seen in, and the index of the
    last :meth:`IouTracker.update` call that saw it."""

    id: int
    box: np.ndarray
    first_frame: int
    last_frame: int
    n_frames: int = 1
    last_step: int = 0


class IouTracker:
    """Greedy IoU matching of each frame's boxes to the live tracks (module doc).

    Args:
        iou_threshold: least IoU for a face to continue a track.
        max_gap: processed frames a track may go unseen and still be continued.
    """

    def __init__(self, iou_threshold: float = 0.3, max_gap: int = 10) -> None:
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0 frames, got {max_gap}")
        self.iou_threshold = float(iou_threshold)
        self.max_gap = int(max_gap)
        self.tracks: list[Track] = []  # every track ever started, in id order
        self._last_frame = -1
        self._step = -1

    def live(self) -> list[Track]:
        """Tracks that the next :meth:`update` may continue."""
        return [t for t in self.tracks if self._step - t.last_step <= self.max_gap]

    def update(self, frame: int, boxes: np.ndarray) -> np.ndarray:
        """Assign ids to the faces of one frame.

        Args:
            frame: the source video's frame number (increasing from call to call).
            boxes: (K, 4) float x1, y1, x2, y2 image px, one per face (K may be 0).
        Returns:
            (K,) int64 track ids.
        """
        if frame <= self._last_frame:
            raise ValueError(f"frames must come in increasing order: {frame} after {self._last_frame}")
        live = self.live()
        self._last_frame = frame
        self._step += 1
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        ids = np.full(len(b), -1, np.int64)
        if len(b) and live:
            iou = box_iou(b, np.stack([t.box for t in live]))
            order = np.argsort(-iou, axis=None, kind="stable")  # pairs, best first (K x T: a handful)
            face_used = np.zeros(len(b), bool)
            track_used = np.zeros(len(live), bool)
            for flat in order:
                i, j = divmod(int(flat), len(live))
                if iou[i, j] < self.iou_threshold:
                    break
                if face_used[i] or track_used[j]:
                    continue
                face_used[i] = track_used[j] = True
                t = live[j]
                t.box, t.last_frame, t.n_frames, t.last_step = b[i].copy(), frame, t.n_frames + 1, self._step
                ids[i] = t.id
        for i in np.flatnonzero(ids < 0):
            t = Track(id=len(self.tracks), box=b[i].copy(), first_frame=frame, last_frame=frame, last_step=self._step)
            self.tracks.append(t)
            ids[i] = t.id
        return ids

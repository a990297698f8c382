"""The demo on a video made here from the shared photos: 12 frames of trump_hillary.jpg (2
faces) sliding 3 px per frame, with frames 5 and 6 replaced by grass.jpg (no face), written
with cv2.VideoWriter. Checked: frames processed (all, in order; stride 2 halves them), faces
per frame, identities stable across frames and across the 2-frame gap (new ones with
``track_max_gap=0``), the overlay video's frame count read back with OpenCV, per-frame meshes
on request. Also: the worker scheme of vrn.video_io (frames via DataLoader workers equal a
plain sequential decode), the tracker alone, and bad inputs.

The network is a tiny ``vrn_tiny`` (crop 64 px, 48 depth bins) whose last convolution is
set to a constant slab (weights 0, bias +8 on bins [20, 28), -8 elsewhere), so every face
gets a mesh fast; the detector is tddfa (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.helpers import compose_demo, slab_checkpoint
from vrn.cli_errors import UserError
from vrn.conventions import VolumeLayout
from vrn.demo import _loader, _VideoFrameDataset, run_demo
from vrn.demo_video import VideoSink
from vrn.tracking import IouTracker, box_iou
from vrn.video_io import FrameReader, VideoInfo, is_video_file, open_video_writer, probe_video

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"
N_FRAMES = 12
GAP = (5, 6)  # frames without a face
SIZE = (480, 216)  # clip width, height


@pytest.fixture(scope="module")
def slab_ckpt(tmp_path_factory) -> Path:
    return slab_checkpoint(tmp_path_factory.mktemp("ckpt") / "slab.ckpt")


def _frames() -> list[np.ndarray]:
    """The clip's BGR frames (module doc)."""
    if not IMAGES.is_dir():
        pytest.fail(f"shared images not found at {IMAGES}")
    w, h = SIZE
    faces = cv2.resize(cv2.imread(str(IMAGES / "trump_hillary.jpg")), (w + 3 * N_FRAMES, h))
    grass = cv2.resize(cv2.imread(str(IMAGES / "grass.jpg")), (w, h))
    return [grass if i in GAP else np.ascontiguousarray(faces[:, 3 * i : 3 * i + w]) for i in range(N_FRAMES)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, SIZE)
    assert vw.isOpened()
    for f in _frames():
        vw.write(f)
    vw.release()
    return path


def _decode_all(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            return out
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def _run(clip: Path, ckpt: Path, out: Path, *extra: str):
    cfg = compose_demo(clip, ckpt, out, "batch_size=3", "progress=false", *extra, set_output=True)
    reports = run_demo(cfg)
    return reports, json.loads((out / f"{clip.stem}_video.json").read_text())


def _ids_left_to_right(frame_record: dict) -> list[int]:
    return [f["id"] for f in sorted(frame_record["faces"], key=lambda f: f["box"][0])]


@pytest.fixture(scope="module")
def video_run(clip: Path, slab_ckpt: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("video_out")
    reports, record = _run(clip, slab_ckpt, out, "num_workers=2", "video_block=3", "video_meshes=true", "formats=[ply]")
    return out, reports, record


def test_every_frame_in_order_with_its_faces(video_run) -> None:
    _out, reports, record = video_run
    assert [r.path for r in reports] == [f"clip.mp4#{i}" for i in range(N_FRAMES)]
    assert [f["frame"] for f in record["frames"]] == list(range(N_FRAMES))
    assert record["frames_processed"] == N_FRAMES and record["n_frames"] == N_FRAMES and record["stride"] == 1
    n_faces = [len(f["faces"]) for f in record["frames"]]
    assert n_faces == [0 if i in GAP else 2 for i in range(N_FRAMES)]
    assert [f["status"] for f in record["frames"]] == ["no_face" if i in GAP else "ok" for i in range(N_FRAMES)]
    assert all(face["has_surface"] and face["error"] is None for fr in record["frames"] for face in fr["faces"])
    # the image path's pose and 3D landmarks, per face and frame
    faces = [face for fr in record["frames"] for face in fr["faces"]]
    assert all({"pose", "landmarks_3d", "landmarks_visible"} <= set(face) for face in faces)
    posed = [face for face in faces if face["pose"] is not None]
    assert posed, "no face got a pose"
    assert all({"yaw", "pitch", "roll"} <= set(face["pose"]) and len(face["landmarks_3d"]) == 68 for face in posed)
    np.testing.assert_allclose([f["time_s"] for f in record["frames"]], np.arange(N_FRAMES) / 10.0)


def test_identities_stable_across_frames_and_gap(video_run) -> None:
    _out, _reports, record = video_run
    ids = [_ids_left_to_right(fr) for fr in record["frames"] if fr["faces"]]
    assert len(ids) == N_FRAMES - len(GAP)
    assert all(i == ids[0] for i in ids) and sorted(ids[0]) == [0, 1]  # the same face keeps its id
    assert [(t["id"], t["first_frame"], t["last_frame"], t["n_frames"]) for t in record["tracks"]] == [
        (0, 0, N_FRAMES - 1, N_FRAMES - len(GAP)),
        (1, 0, N_FRAMES - 1, N_FRAMES - len(GAP)),
    ]
    # the boxes follow the faces as they slide left 3 px per frame
    left = [min(fr["faces"], key=lambda f: f["box"][0])["box"][0] for fr in record["frames"] if fr["faces"]]
    assert left[0] - left[-1] > 2 * (N_FRAMES - 1)


def test_overlay_video_and_meshes(video_run, clip: Path) -> None:
    out, _reports, record = video_run
    overlay = out / "clip_overlay.mp4"
    assert record["overlay"] == str(overlay)
    frames = _decode_all(overlay)
    src = _decode_all(clip)
    assert len(frames) == N_FRAMES and frames[0].shape == (SIZE[1], SIZE[0], 3)
    assert probe_video(overlay).fps == pytest.approx(10.0)
    diff = [float(np.abs(a.astype(int) - b.astype(int)).mean()) for a, b in zip(frames, src)]
    assert all(diff[i] < 3.0 for i in GAP)  # no face: the frame as it was (up to re-encoding)
    assert all(diff[i] > 3.0 for i in range(N_FRAMES) if i not in GAP)  # meshes and boxes drawn
    meshes = sorted(p.name for p in (out / "clip_meshes").iterdir())
    assert meshes == sorted(f"clip_frame{i:06d}_face{k}.ply" for i in range(N_FRAMES) if i not in GAP for k in (0, 1))
    head = (out / "clip_meshes" / meshes[0]).read_bytes()[:400]
    assert b"property float quality" in head  # the per-vertex confidence
    assert not list(out.glob("*_depth.png")) and not list(out.glob("*_turntable.gif"))


def test_stride_halves_frames_and_gap_limit(clip: Path, slab_ckpt: Path, tmp_path: Path) -> None:
    reports, record = _run(clip, slab_ckpt, tmp_path, "num_workers=1", "video_stride=2", "track_max_gap=0")
    assert [f["frame"] for f in record["frames"]] == list(range(0, N_FRAMES, 2))
    assert len(reports) == N_FRAMES // 2 and record["frames_processed"] == N_FRAMES // 2
    assert len(_decode_all(tmp_path / "clip_overlay.mp4")) == N_FRAMES // 2
    assert probe_video(tmp_path / "clip_overlay.mp4").fps == pytest.approx(5.0)
    assert not (tmp_path / "clip_meshes").exists()  # per-frame meshes only on request
    # frame 6 (processed) has no face; with track_max_gap=0 the faces after it get new ids
    ids = {fr["frame"]: _ids_left_to_right(fr) for fr in record["frames"]}
    assert ids[0] == ids[2] == ids[4] and sorted(ids[0]) == [0, 1]
    assert ids[6] == [] and ids[8] == ids[10] and sorted(ids[8]) == [2, 3]


class _NoFaces:
    """A detector stand-in that finds nothing (the worker test is about decoding only)."""

    name = "none"

    def setup(self) -> None:
        pass

    def detect(self, image: np.ndarray, path: str | None = None) -> list:
        return []


@pytest.mark.parametrize("workers,block,stride", [(2, 2, 1), (2, 5, 3), (0, 4, 1)])
def test_worker_frames_equal_sequential_decode(clip: Path, workers: int, block: int, stride: int) -> None:
    src = _decode_all(clip)
    frames = list(range(0, len(src), stride))
    ds = _VideoFrameDataset(clip, frames, _NoFaces(), VolumeLayout())
    items = [it for blk in _loader(ds, OmegaConf.create({"num_workers": workers}), block=block) for it in blk]
    assert [it["frame"] for it in items] == frames  # each once, in order
    for it in items:
        np.testing.assert_array_equal(it["prep"].image, src[it["frame"]])


def test_frame_reader_any_order(clip: Path) -> None:
    src = _decode_all(clip)
    reader = FrameReader(clip)
    for f in (9, 2, 3, 11, 0, 7):  # backwards (seek) and forwards (decode)
        np.testing.assert_array_equal(reader.read(f), src[f])
    with pytest.raises(ValueError, match="frame 12"):
        reader.read(12)
    reader.close()


def test_tracker_rules() -> None:
    a = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], float)
    np.testing.assert_allclose(box_iou(a, a + [5, 0, 5, 0]), [[1 / 3, 0], [0, 1 / 3]])
    assert box_iou(a, np.zeros((0, 4))).shape == (2, 0)
    tr = IouTracker(iou_threshold=0.3, max_gap=1)
    assert tr.update(0, a).tolist() == [0, 1]
    assert tr.update(1, a[::-1] + 1).tolist() == [1, 0]  # matched by overlap, not by order
    assert tr.update(2, np.zeros((0, 4))).tolist() == []  # a 1-frame gap ...
    assert tr.update(3, a[:1]).tolist() == [0]  # ... is bridged
    assert tr.update(4, a + [100, 0, 100, 0]).tolist() == [2, 3]  # far away: new faces
    assert tr.update(5, np.zeros((0, 4))).tolist() == []
    assert tr.update(6, np.zeros((0, 4))).tolist() == []
    assert tr.update(7, a).tolist() == [4, 5]  # gap of 2 > max_gap (ids 0, 1 are gone): new ids
    with pytest.raises(ValueError, match="increasing"):
        tr.update(7, a)


def test_bad_video_inputs(clip: Path, slab_ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(UserError, match="OpenCV cannot open this video"):
        run_demo(compose_demo(bad, slab_ckpt, tmp_path / "o1"))
    with pytest.raises(UserError, match="does not exist"):
        run_demo(compose_demo(tmp_path / "missing.mp4", slab_ckpt, tmp_path / "o2"))
    with pytest.raises(UserError, match="video_stride=0"):
        run_demo(compose_demo(clip, slab_ckpt, tmp_path / "o3", "video_stride=0"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


class _ListWriter:
    """Collects the overlay frames (stands in for the video file writer)."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def write(self, rgb: np.ndarray) -> None:
        self.frames.append(rgb.copy())


def test_unreadable_frames_recorded_not_fatal(tmp_path: Path) -> None:
    info = VideoInfo(str(tmp_path / "x.mp4"), 5, 10.0, 32, 24)
    out = _ListWriter()
    sink = VideoSink(info, 1, 5, out, IouTracker(), progress=False)  # type: ignore[arg-type]
    img = np.full((24, 32, 3), 100, np.uint8)
    none = np.zeros((0, 4))
    sink.add(0, img, none, [], "no_face", "no face found", {})
    sink.add(1, None, none, [], "unreadable", "frame 1 could not be decoded", {})
    sink.add(2, img, none, [], "no_face", "no face found", {})
    sink.add(3, None, none, [], "unreadable", "frame 3 could not be decoded", {})  # trailing: the count
    sink.add(4, None, none, [], "unreadable", "frame 4 could not be decoded", {})  # was overstated
    assert sink.finish() == 2
    assert [(r["frame"], r["status"]) for r in sink.records] == [(0, "no_face"), (1, "unreadable"), (2, "no_face")]
    assert len(out.frames) == 3  # the unreadable frame in the middle keeps its place, black
    assert out.frames[1].max() == 0 and out.frames[0].min() == 100 and out.frames[2].min() == 100


@pytest.mark.parametrize("ext", [".mp4", ".avi", ".mov", ".mkv"])
def test_containers_write_probe_read(ext: str, tmp_path: Path) -> None:
    """The overlay writer (atomic: no temporary file left) and the reader on each container."""
    path = tmp_path / f"v{ext}"
    with open_video_writer(path, 8.0, (64, 48)) as w:
        for i in range(5):
            w.write(np.full((48, 64, 3), 40 * i, np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name] and is_video_file(path)
    info = probe_video(path)
    assert (info.n_frames, info.width, info.height) == (5, 64, 48) and info.fps == pytest.approx(8.0)
    reader = FrameReader(path)
    for i in (4, 0, 2):
        assert abs(float(reader.read(i).mean()) - 40 * i) < 6  # lossy codecs
    reader.close()
    with pytest.raises(ValueError, match="failed"), open_video_writer(tmp_path / f"x{ext}", 8.0, (64, 48)) as w:
        w.write(np.zeros((48, 64, 3), np.uint8))
        raise ValueError("failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing half-written

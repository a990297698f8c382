"""Faults by kind (item faults recorded, run faults stop the run and are redone) and
integrity checks (assets, checkpoints, packed datasets, unreadable photos)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf

import data_pipeline.run as pipeline_run
import data_pipeline.stage as stage_mod
from data_pipeline.crop import CropStage
from data_pipeline.runner import run_stage
from data_pipeline.stage import Item, ItemContext, PipelineRunError, Stage, dumps_json
from vrn import assets
from vrn.assets import REGISTRY, AssetIntegrityError, AssetNotFoundError
from vrn.checkpoint import CheckpointIntegrityError, load_network, resolve_checkpoint, verify_checkpoint
from vrn.conventions import DEFAULT_LAYOUT
from vrn.data import packed as packed_mod
from vrn.data import synthetic
from vrn.data.packed import PackedFormatError, PackedReader, PackedSampleError, PackedWriter
from vrn.detectors.base import Detection, FaceDetector
from vrn.image_io import encode_image_rgb
from vrn.volume.codec import encode

ROOT = Path(__file__).resolve().parents[1]
SHARED_IMAGES = ROOT.parent / "shared" / "data" / "images"

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --------------------------------------------------------------------------------------
# faults by kind: the runner
# --------------------------------------------------------------------------------------


class TinyStage(Stage):
    """One small file per item (a function of the input), an item fault for 'fail' inputs."""

    name = "tiny"
    needs_manifest = False

    def list_items(self, input_dir: Path, upstream: Any, out_dir: Path) -> list[Item]:
        return [Item(p.stem, {"path": str(p)}) for p in sorted(input_dir.glob("*.txt"))]

    def process(self, item: Item, ctx: ItemContext) -> list[dict[str, Any]]:
        text = Path(item.data["path"]).read_text()
        if text.startswith("fail"):
            raise ValueError("bad input")  # an item fault: recorded as tiny_error
        files = {"out": ctx.write_bytes(f"items/{item.id}.bin", (text * 100).encode())}
        return [{"id": item.id, "files": files}]


class AssetStage(TinyStage):
    """A stage whose setup needs an asset that is not there."""

    def __init__(self, missing: str) -> None:
        self.missing = missing

    def setup(self) -> None:
        assets.resolve("3ddfa_v2/mb05_120x120.pth", path=self.missing)


def _inputs(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"in{i:03d}.txt").write_text("fail" if i == 2 else f"item {i}")
    return folder


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("timing.json", ".lock")
    }


def _disk_full_for(monkeypatch, target: str) -> list[str]:
    """Make ItemContext's writer fail with ENOSPC for files whose name contains ``target``."""
    real = stage_mod.atomic_write
    hits: list[str] = []

    def writer(path, data, *a, **kw):
        if target in str(path):
            hits.append(str(path))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data, *a, **kw)

    monkeypatch.setattr(stage_mod, "atomic_write", writer)
    return hits


def test_disk_full_stops_the_run_and_a_rerun_redoes_the_item(tmp_path: Path, monkeypatch) -> None:
    inp = _inputs(tmp_path / "in")
    clean = tmp_path / "clean"
    run_stage(TinyStage(), inp, clean, progress=False)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        hits = _disk_full_for(m, "in001")
        with pytest.raises(PipelineRunError, match="No space left on device") as ei:
            run_stage(TinyStage(), inp, out, progress=False)
    assert hits and "in001" in str(ei.value) and "\n" not in str(ei.value)
    assert (out / "done" / "in000.json").is_file()  # finished before the fault: kept
    assert not (out / "done" / "in001.json").exists()  # the item at hand: no record
    assert not (out / "manifest.json").exists()
    manifest = run_stage(TinyStage(), inp, out, progress=False)  # a plain rerun
    assert manifest["counts"] == {"items": 4, "ok_items": 3, "failed_items": 1, "samples": 3, "failures_total": 1}
    assert [f["reason"] for f in manifest["failures"]] == ["tiny_error"]  # the item fault stays an item fault
    assert _tree(out) == _tree(clean)


def test_disk_full_cli_exits_non_zero_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    inp = _inputs(tmp_path / "in")
    _disk_full_for(monkeypatch, "in000")
    monkeypatch.setattr(pipeline_run, "build_stage", lambda cfg, name: TinyStage())
    cfg = OmegaConf.create({"input_dir": str(inp), "output_dir": str(tmp_path / "out"), "progress": False})
    with pytest.raises(SystemExit) as ei:
        pipeline_run.run_single_stage(cfg, "fit")
    assert ei.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "rerun" in err


def test_missing_asset_in_setup_is_a_run_fault(tmp_path: Path) -> None:
    inp = _inputs(tmp_path / "in")
    with pytest.raises(PipelineRunError, match="AssetNotFoundError") as ei:
        run_stage(AssetStage(str(tmp_path / "nope.pth")), inp, tmp_path / "out", progress=False)
    assert "nope.pth" in str(ei.value) and "\n" not in str(ei.value)
    assert not any((tmp_path / "out" / "done").glob("*.json"))


def test_run_fault_recorded_by_an_older_runner_is_redone(tmp_path: Path) -> None:
    inp = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    run_stage(TinyStage(), inp, out, progress=False)
    old = {"id": "in001", "ok": False, "reason": "tiny_error", "samples": [], "files": []}
    old["detail"] = "OSError: [Errno 28] No space left on device"
    (out / "done" / "in001.json").write_bytes(dumps_json(old))
    manifest = run_stage(TinyStage(), inp, out, progress=False)
    assert manifest["counts"]["ok_items"] == 3 and (out / "items" / "in001.bin").is_file()


# --------------------------------------------------------------------------------------
# pack: a failed write keeps its error and leaves no .partial
# --------------------------------------------------------------------------------------


class _FullDisk:
    """A file that fails every write (and its flush on close) with ENOSPC, like a full disk."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _sample(rng: np.random.Generator):
    image = rng.integers(0, 255, (DEFAULT_LAYOUT.crop_size,) * 2 + (3,), dtype=np.uint8)
    vol = np.zeros((DEFAULT_LAYOUT.depth_bins,) + (DEFAULT_LAYOUT.crop_size,) * 2, dtype=bool)
    a, b = sorted(rng.integers(20, 170, 2))
    vol[60:140, a : b + 1, 50:150] = True
    return image, encode(vol)


class FullDiskPack(Stage):
    name = "pack"
    kind = "reduce"

    def reduce(self, upstream: dict[str, Any], input_dir: Path, out_dir: Path, progress: bool) -> dict[str, Any]:
        with PackedWriter(out_dir, image_codec=".jpg", overwrite=True) as w:
            w.add(*_sample(np.random.default_rng(0)), {"id": "s0", "split": "train"})
        return {"num_samples": 1}


def test_pack_on_a_full_disk_reports_the_error_and_leaves_no_partial(tmp_path: Path, monkeypatch) -> None:
    real_open = PackedWriter._open
    monkeypatch.setattr(
        PackedWriter,
        "_open",
        lambda self, name, mode: (
            _FullDisk(real_open(self, name, mode)) if "targets" in name else real_open(self, name, mode)
        ),
    )
    root = tmp_path / "packed"
    with pytest.raises(OSError, match="No space left on device") as ei:
        with PackedWriter(root) as w:
            w.add(*_sample(np.random.default_rng(0)), {"id": "s0"})
    assert ei.value.errno == errno.ENOSPC
    assert not root.exists() and not (tmp_path / "packed.partial").exists()
    # through the runner: one line naming the cause, still no .partial
    (tmp_path / "reap").mkdir()
    (tmp_path / "reap" / "manifest.json").write_bytes(dumps_json({"stage": "reap", "samples": []}))
    with pytest.raises(PipelineRunError, match="No space left on device"):
        run_stage(FullDiskPack(), tmp_path / "reap", root, progress=False)
    assert not root.exists() and not (tmp_path / "packed.partial").exists()


# --------------------------------------------------------------------------------------
# assets: verified against the registry sha256
# --------------------------------------------------------------------------------------


@pytest.fixture()
def asset_mirror(tmp_path: Path, monkeypatch) -> Path:
    """An empty VRN_ASSETS_DIR and VRN_CACHE_DIR, and no verification remembered."""
    mirror = tmp_path / "assets"
    mirror.mkdir()
    monkeypatch.setenv("VRN_ASSETS_DIR", str(mirror))
    monkeypatch.setenv("VRN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_VERIFIED", {})
    return mirror


def _copy_asset(name: str, mirror: Path) -> Path:
    """Copy a good ``name`` from the usual mirrors into ``mirror`` (skip when there is none)."""
    src = [d / name for d in assets.mirror_dirs() if d != mirror and (d / name).is_file()]
    if not src:
        pytest.skip(f"{name} is not in a local assets mirror")
    dst = mirror / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src[0], dst)
    return dst


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("name", ["3ddfa_v2/mb05_120x120.pth", "sfm/sfm_shape_3448.bin"])
def test_damaged_asset_is_refused_naming_file_and_hash(asset_mirror: Path, name: str, damage: str) -> None:
    dst = _copy_asset(name, asset_mirror)
    data = bytearray(dst.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) // 2 :]
    dst.write_bytes(bytes(data))
    with pytest.raises(AssetIntegrityError) as ei:
        assets.resolve(name)
    msg = str(ei.value)
    assert str(dst) in msg and REGISTRY[name].sha256 in msg and "Fix:" in msg
    assert isinstance(ei.value, AssetNotFoundError)  # callers that catch the old error still do


def test_verified_stamp_skips_hashing_until_the_file_changes(asset_mirror: Path, monkeypatch) -> None:
    name = "sfm/ibug_to_sfm.txt"
    dst = _copy_asset(name, asset_mirror)
    assert assets.resolve(name) == dst
    assert len(list((asset_mirror.parent / "cache" / "verified").glob("*.json"))) == 1
    monkeypatch.setattr(assets, "_VERIFIED", {})  # a new process: only the stamp is left

    def no_hashing(p):
        raise AssertionError(f"hashed {p} although its stamp matches")

    monkeypatch.setattr(assets, "sha256_of", no_hashing)
    assert assets.resolve(name) == dst
    monkeypatch.undo()
    monkeypatch.setenv("VRN_ASSETS_DIR", str(asset_mirror))
    monkeypatch.setenv("VRN_CACHE_DIR", str(asset_mirror.parent / "cache"))
    data = bytearray(dst.read_bytes())
    data[10] ^= 0x20
    dst.write_bytes(bytes(data))
    os.utime(dst, ns=(dst.stat().st_atime_ns, dst.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssetIntegrityError, match="ibug_to_sfm.txt"):
        assets.resolve(name)


def test_synthetic_cache_name_depends_on_the_sfm_files(monkeypatch) -> None:
    cfg, counts = synthetic.SyntheticFaceConfig(), {"train": 4, "val": 2, "test": 2}
    a = synthetic.cache_name(cfg, counts, 0)
    monkeypatch.setattr(
        synthetic, "verified_sha256", lambda n: "0" * 64 if n == "sfm/sfm_shape_3448.bin" else REGISTRY[n].sha256
    )
    assert synthetic.cache_name(cfg, counts, 0) != a


# --------------------------------------------------------------------------------------
# checkpoints: zip CRCs checked before loading
# --------------------------------------------------------------------------------------


def test_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    good = assets.resolve("pretrained/vrn_medium_aflw.ckpt")
    verify_checkpoint(good)
    bad = tmp_path / "damaged.ckpt"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor's bytes
    bad.write_bytes(bytes(data))
    for load in (load_network, resolve_checkpoint, verify_checkpoint):
        with pytest.raises(CheckpointIntegrityError, match="damaged.ckpt.*CRC") as ei:
            load(bad)
        assert "\n" not in str(ei.value)
    cut = tmp_path / "truncated.ckpt"
    cut.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointIntegrityError, match="truncated.ckpt"):
        load_network(cut)


# --------------------------------------------------------------------------------------
# packed datasets: checksums, extents, damaged files named
# --------------------------------------------------------------------------------------


@pytest.fixture()
def small_packed(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    root = tmp_path / "packed"
    with PackedWriter(root, image_codec=".jpg") as w:
        for i in range(3):
            w.add(*_sample(rng), {"id": f"s{i}", "split": "train"})
    return root


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_packed_v2_roundtrip_and_flipped_bytes_name_the_sample(small_packed: Path) -> None:
    r = PackedReader(small_packed)
    assert r.meta["version"] == 2 and r.index.shape == (3, 6)
    assert [r[i].row["id"] for i in range(3)] == ["s0", "s1", "s2"]
    io_, ib, to_, tb = (int(v) for v in r.index[1, :4])
    _flip(small_packed / "images.bin", io_ + ib // 2)
    with pytest.raises(PackedSampleError, match="'s1'.*images.bin"):
        PackedReader(small_packed)[1]
    PackedReader(small_packed)[0]  # the others still read
    _flip(small_packed / "targets.bin", int(r.index[2, 2]) + int(r.index[2, 3]) // 2)
    with pytest.raises(PackedSampleError, match="'s2'.*targets.bin"):
        PackedReader(small_packed)[2]


@pytest.mark.parametrize("name", ["targets.bin", "images.bin"])
def test_truncated_bin_fails_at_setup_naming_the_file(small_packed: Path, name: str) -> None:
    p = small_packed / name
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(PackedFormatError, match=f"{name} is truncated"):
        PackedReader(small_packed)


def test_damaged_index_and_manifest_are_named(small_packed: Path) -> None:
    text = (small_packed / "manifest.jsonl").read_text()
    (small_packed / "manifest.jsonl").write_text(text[:-20] + "\n")
    with pytest.raises(PackedFormatError, match="manifest.jsonl line 3"):
        PackedReader(small_packed)
    (small_packed / "manifest.jsonl").write_text(text)
    (small_packed / "index.npy").write_bytes(b"garbage")
    with pytest.raises(PackedFormatError, match="index.npy"):
        PackedReader(small_packed)


def test_packed_v1_stays_readable_with_one_warning(small_packed: Path, caplog) -> None:
    meta = json.loads((small_packed / "meta.json").read_text())
    (small_packed / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    np.save(small_packed / "index.npy", np.load(small_packed / "index.npy")[:, :4])
    with caplog.at_level(logging.WARNING, logger=packed_mod.__name__):
        r = PackedReader(small_packed)
        PackedReader(small_packed, split="train")
    assert sum("no per-sample checksums" in m for m in caplog.messages) == 1
    assert r[0].image.shape == (DEFAULT_LAYOUT.crop_size,) * 2 + (3,)
    # a v1 JPEG cut short (no end marker) is still caught, naming the sample
    io_, ib = (int(v) for v in r.index[1, :2])
    data = bytearray((small_packed / "images.bin").read_bytes())
    data[io_ + ib - 2 : io_ + ib] = b"\x00\x00"
    (small_packed / "images.bin").write_bytes(bytes(data))
    with pytest.raises(PackedSampleError, match="'s1'.*truncated"):
        PackedReader(small_packed)[1]


def test_crc_is_zlib_crc32_of_the_stored_bytes(small_packed: Path) -> None:
    r = PackedReader(small_packed)
    io_, ib, to_, tb, ci, ct = (int(v) for v in r.index[0])
    assert ci == zlib.crc32((small_packed / "images.bin").read_bytes()[io_ : io_ + ib])
    assert ct == zlib.crc32((small_packed / "targets.bin").read_bytes()[to_ : to_ + tb])


# --------------------------------------------------------------------------------------
# crop: empty and truncated photos are unreadable_image
# --------------------------------------------------------------------------------------


class NoFaces(FaceDetector):
    name = "none"

    def _detect(self, image_rgb: np.ndarray, image_path: str | None) -> list[Detection]:
        return []


def test_crop_records_empty_and_truncated_images_as_unreadable(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    good = (SHARED_IMAGES / "grass.jpg").read_bytes() if (SHARED_IMAGES / "grass.jpg").is_file() else None
    if good is None:
        good = encode_image_rgb(np.full((64, 64, 3), 90, np.uint8), ".jpg")
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "cut.jpg").write_bytes(good[: len(good) // 2])
    (photos / "cutpng.png").write_bytes(encode_image_rgb(np.full((64, 64, 3), 90, np.uint8), ".png")[:-12])
    (photos / "whole.jpg").write_bytes(good)
    manifest = run_stage(CropStage(NoFaces()), photos, tmp_path / "crop", progress=False)
    reasons = {f["id"]: f["reason"] for f in manifest["failures"]}
    assert reasons == {
        "empty": "unreadable_image",
        "cut": "unreadable_image",
        "cutpng": "unreadable_image",
        "whole": "no_face",
    }
    details = {f["id"]: f["detail"] for f in manifest["failures"]}
    assert "0 bytes" in details["empty"] and "empty.jpg" in details["empty"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

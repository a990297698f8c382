"""The stage runner: skip/resume, recorded failures, atomic writes, SIGKILL at any moment."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_pipeline.runner import run_stage
from data_pipeline.stage import Item, ItemContext, ItemFailure, Stage, StageConfigError, load_npz, npz_bytes

ROOT = Path(__file__).resolve().parents[1]
SHARED_IMAGES = ROOT.parent / "shared" / "data" / "images"


# --------------------------------------------------------------------------------------
# a toy stage whose outputs are a known function of the input (so any file on disk can be
# checked for completeness), slow enough to be killed mid-item
# --------------------------------------------------------------------------------------


def toy_payload(text: str, k: int = 0) -> bytes:
    """8 MB, cheap to make, distinct per (text, k): writing dominates an item's time, so a
    kill often lands inside a write."""
    seed = int(hashlib.sha256(f"{text}/{k}".encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).bytes(1 << 16) * 122


class ToyStage(Stage):
    name = "toy"
    needs_manifest = False

    def __init__(self, sleep: float = 0.05, tag: str = "v1") -> None:
        self.sleep = sleep
        self.tag = tag

    def params(self) -> dict[str, Any]:
        return {"tag": self.tag}

    def list_items(self, input_dir: Path, upstream: Any, out_dir: Path) -> list[Item]:
        return [Item(p.stem, {"path": str(p)}) for p in sorted(input_dir.glob("*.txt"))]

    def process(self, item: Item, ctx: ItemContext) -> list[dict[str, Any]]:
        text = Path(item.data["path"]).read_text()
        if text.startswith("fail"):
            raise ItemFailure("bad_input", f"{item.id} asked to fail")
        if text.startswith("crash"):
            raise RuntimeError("boom")
        files = {f"bin{k}": ctx.write_bytes(f"items/{item.id}.{k}.bin", toy_payload(text, k)) for k in range(3)}
        time.sleep(self.sleep)
        files["npz"] = ctx.write_npz(f"items/{item.id}.npz", x=np.frombuffer(toy_payload(text)[:4000], np.float32))
        return [{"id": item.id, "files": files}]


def _inputs(folder: Path, n: int = 24) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        body = "fail" if i == 3 else "crash" if i == 5 else f"item {i}"
        (folder / f"in{i:03d}.txt").write_text(body)
    return folder


def tree(root: Path) -> dict[str, bytes]:
    """All files under root except the per-run logs (timing.json, .lock, .logs/)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and p.name not in ("timing.json", ".lock") and not rel.startswith(".logs"):
            out[rel] = p.read_bytes()
    return out


def assert_no_partial_files(out: Path) -> None:
    """Every file under its final name is complete; temporary files live only in .tmp/."""
    for p in out.rglob("*"):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and not rel.startswith(".tmp/"):
            assert not p.name.endswith(".tmp"), rel
    for p in (out / "items").glob("*.bin") if (out / "items").is_dir() else []:
        stem, k = p.name.split(".")[:2]
        text = (out.parent / "in" / f"{stem}.txt").read_text()
        assert p.read_bytes() == toy_payload(text, int(k)), f"partial file {p}"
    for p in (out / "done").glob("*.json") if (out / "done").is_dir() else []:
        rec = json.loads(p.read_text())
        for f in rec["files"]:
            assert (out / f).is_file()


def test_runner_records_failures_and_skips_done_items(tmp_path):
    inp = _inputs(tmp_path / "in", 8)
    out = tmp_path / "out"
    m = run_stage(ToyStage(sleep=0), inp, out, progress=False)
    assert m["counts"] == {"items": 8, "ok_items": 6, "failed_items": 2, "samples": 6, "failures_total": 2}
    reasons = {f["id"]: f["reason"] for f in m["failures"]}
    assert reasons == {"in003": "bad_input", "in005": "toy_error"}
    assert "RuntimeError: boom" in [f["detail"] for f in m["failures"] if f["id"] == "in005"][0]
    assert not (out / ".tmp").exists()
    first = tree(out)
    t = json.loads((out / "timing.json").read_text())
    assert t["processed_items"] == 8
    # rerun: everything skipped, identical bytes
    run_stage(ToyStage(sleep=0), inp, out, progress=False)
    assert json.loads((out / "timing.json").read_text())["processed_items"] == 0
    assert tree(out) == first
    # a deleted output makes its item pending again
    (out / "items" / "in001.1.bin").unlink()
    run_stage(ToyStage(sleep=0), inp, out, progress=False)
    assert json.loads((out / "timing.json").read_text())["processed_items"] == 1
    assert tree(out) == first
    # retry_failed redoes the failures only
    run_stage(ToyStage(sleep=0), inp, out, progress=False, retry_failed=True)
    assert json.loads((out / "timing.json").read_text())["processed_items"] == 2
    # other parameters into the same folder: refused, unless overwrite
    with pytest.raises(StageConfigError, match="overwrite=true"):
        run_stage(ToyStage(sleep=0, tag="v2"), inp, out, progress=False)
    run_stage(ToyStage(sleep=0, tag="v2"), inp, out, progress=False, overwrite=True)
    assert json.loads((out / "timing.json").read_text())["processed_items"] == 8


def test_npz_bytes_are_deterministic(tmp_path):
    a = npz_bytes(v=np.arange(6, dtype=np.float32).reshape(2, 3), s=np.array("bfm"))
    time.sleep(1.1)
    assert npz_bytes(s=np.array("bfm"), v=np.arange(6, dtype=np.float32).reshape(2, 3)) == a
    (tmp_path / "x.npz").write_bytes(a)
    d = load_npz(tmp_path / "x.npz")
    assert d["v"].shape == (2, 3) and str(d["s"]) == "bfm"


_TOY_CMD = (
    "import sys; from pathlib import Path; from tests.test_pipeline_stage import ToyStage; "
    "from data_pipeline.runner import run_stage; "
    "run_stage(ToyStage(sleep=0.01), Path(sys.argv[1]), Path(sys.argv[2]), n_jobs=2, progress=False)"
)


def test_sigkill_at_random_moments_then_resume_is_byte_identical(tmp_path):
    inp = _inputs(tmp_path / "b" / "in", 20)
    ref_in = _inputs(tmp_path / "a" / "in", 20)
    ref = tmp_path / "a" / "out"
    run_stage(ToyStage(sleep=0.01), ref_in, ref, n_jobs=1, progress=False)
    out = tmp_path / "b" / "out"
    rng = np.random.default_rng(0)
    kills = 0
    for _attempt in range(6):
        before = _count(out / "done")
        p = subprocess.Popen(
            [sys.executable, "-c", _TOY_CMD, str(inp), str(out)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # once workers are busy, kill after a random few ms (often inside a write)
        while p.poll() is None and _count(out / "done") <= before:
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0.0, 0.06)))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)  # the runner only; its workers die with it (PDEATHSIG)
            kills += 1
        p.wait(timeout=60)
        time.sleep(0.3)
        assert_no_partial_files(out)
        if p.returncode == 0:
            break
    assert kills >= 1, "the stage finished before any kill: make the toy stage slower"
    run_stage(ToyStage(sleep=0.01), inp, out, n_jobs=2, progress=False)
    assert not (out / ".tmp").exists()
    assert tree(out) == tree(ref)


def _real_subset(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for n in ("AFLW_image00046.jpg", "AFLW_image00095.jpg", "AFLW_image00656.jpg", "aflw-test.jpg", "grass.jpg"):
        os.symlink(SHARED_IMAGES / n, folder / n)
    return folder


def _pipeline(inp: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "data_pipeline.run",
            f"input_dir={inp}",
            f"output_dir={out}",
            "stages=[crop,fit,voxelize]",
            "detector=tddfa",
            "torch_threads=1",
            "progress=false",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _count(folder: Path) -> int:
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def _kill_when(p: subprocess.Popen, cond, timeout: float = 90.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if p.poll() is not None:
            return False
        if cond():
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True
        time.sleep(0.05)
    p.kill()
    raise AssertionError("condition never met")


def test_real_stages_killed_mid_crop_and_mid_fit_resume_identically(tmp_path):
    """crop -> fit -> voxelize on real photos with detector=tddfa, SIGKILLed twice."""
    ref = tmp_path / "a" / "out"
    r = _pipeline(_real_subset(tmp_path / "a" / "in"), ref)
    assert r.wait(timeout=300) == 0, r.stderr.read()
    inp = _real_subset(tmp_path / "b" / "in")
    out = tmp_path / "b" / "out"
    assert _kill_when(_pipeline(inp, out), lambda: _count(out / "crop" / "done") >= 2)
    assert not (out / "crop" / "manifest.json").exists()
    assert _kill_when(_pipeline(inp, out), lambda: _count(out / "fit" / "done") >= 1)
    for p in out.rglob("*"):
        if p.is_file() and ".tmp" not in p.relative_to(out).parts:
            assert not p.name.endswith(".tmp")
    r = _pipeline(inp, out)
    assert r.wait(timeout=300) == 0, r.stderr.read()
    a, b = tree(ref), tree(out)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert not list(out.rglob(".tmp"))
    man = json.loads((out / "voxelize" / "manifest.json").read_text())
    assert man["counts"]["samples"] == 4
    assert [f["reason"] for f in man["failures"]] == ["no_face"]

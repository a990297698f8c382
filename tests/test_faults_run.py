"""Faults of a run: last.ckpt is the latest state, SIGTERM / SIGINT keep the open epoch and
print a resume command that works, bad inputs are reported and skipped, expected user errors
print one line and exit 2 (vrn_tiny on tiny synthetic packed data, CPU)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import compose_config, compose_demo, tiny_train_overrides
from vrn.cli_errors import UserError, run_cli
from vrn.demo import run_demo
from vrn.image_io import read_image_rgb
from vrn.inference import Reconstructor
from vrn.models import create_model
from vrn.train import train

ROOT_DIR = Path(__file__).resolve().parents[1]
IMAGES = ROOT_DIR.parent / "shared" / "data" / "images"
EPOCHS = 3


def _run_overrides(packed: Path, *extra: str) -> list[str]:
    return [
        *tiny_train_overrides(packed, "none"),
        "~callbacks.volume_preview",
        "trainer.accelerator=cpu",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "test=false",
        *extra,
    ]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def stalled_run(synthetic_packed: Path, tmp_path_factory) -> Path:
    """3 epochs of 1 step at lr 0: val/iou never improves after epoch 0."""
    out = tmp_path_factory.mktemp("stalled")
    cfg = compose_config(
        "train",
        _run_overrides(
            synthetic_packed, f"trainer.max_epochs={EPOCHS}", "trainer.limit_train_batches=1", "model.optimizer.lr=0.0"
        ),
        output_dir=out,
    )
    train(cfg)
    return out / "checkpoints"


def test_last_ckpt_is_the_final_epoch_when_the_metric_stalls(stalled_run: Path) -> None:
    last = _load(stalled_run / "last.ckpt")
    assert last["epoch"] == EPOCHS - 1 and last["global_step"] == EPOCHS
    best = sorted(stalled_run.glob("epoch_*-iou_*.ckpt"))
    assert [p.name.split("-")[0] for p in best] == ["epoch_000"]  # the best stays separate
    assert _load(best[0])["global_step"] == 1


# --------------------------------------------------------------------------------------
# signals
# --------------------------------------------------------------------------------------

MAX_STEPS = 24


@pytest.mark.parametrize(
    ("signum", "code", "workers", "group"),
    [
        (signal.SIGTERM, 143, 0, False),
        (signal.SIGINT, 130, 0, False),
        (signal.SIGTERM, 143, 2, True),
        (signal.SIGINT, 130, 2, True),
    ],
    ids=["TERM", "INT", "TERM-group-workers", "INT-group-workers"],
)
def test_signal_saves_the_step_and_the_resume_command_finishes_the_run(
    synthetic_packed: Path, tmp_path: Path, signum: int, code: int, workers: int, group: bool
) -> None:
    """``group``: the signal goes to every process of the run, DataLoader workers included (what
    ``pkill -f``, Ctrl-C in a terminal and SLURM at a job's end do): the workers leave it to the
    main process, which saves and exits as for a signal to it alone."""
    run_dir = tmp_path / "run"
    overrides = _run_overrides(
        synthetic_packed,
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.max_epochs=-1",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        f"data.num_workers={workers}",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vrn.train", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT_DIR,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=group,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    t0 = time.monotonic()
    while not last.is_file() and proc.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    state = _load(last)
    step = state["global_step"]
    assert 1 <= step < MAX_STEPS, "the signal came after the run ended: make the run longer"
    resume = [ln.split("resume with: ", 1)[1] for ln in err.splitlines() if "resume with: " in ln]
    assert len(resume) == 1, err[-3000:]
    argv = shlex.split(resume[0])
    assert argv[:3] == ["python", "-m", "vrn.train"] and argv[-1] == f"ckpt_path={last}"
    # the printed command, run as is (composed in-process), goes on from that step to the end
    cfg = compose_config("train", argv[3:], output_dir=tmp_path / "resumed")
    train(cfg)
    final = _load(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert final["global_step"] == MAX_STEPS


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------


def test_reconstruct_crops_checks_dtype_range_size_and_finiteness() -> None:
    rec = Reconstructor(create_model("vrn_tiny").eval(), detector=None)
    ok = np.zeros((1, 3, 192, 192), np.float32)
    cases = {
        "divide by 255": ok + 255.0,
        "NaN": np.where(np.arange(192) == 3, np.nan, ok).astype(np.float32),
        "192x192": np.zeros((1, 3, 128, 128), np.uint8),
        "uint8 \\[0, 255\\] or float": np.zeros((1, 3, 192, 192), np.int64),
    }
    for match, crops in cases.items():
        with pytest.raises(ValueError, match=match) as e:
            rec.reconstruct_crops(crops)
        assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def slab_ckpt(stalled_run: Path) -> Path:
    """The stalled run's model biased to a slab of occupied depth bins: a surface for every face."""
    state = _load(stalled_run / "last.ckpt")
    sd = state["state_dict"]
    sd["net.head.1.weight"].zero_()
    sd["net.head.1.bias"].fill_(-8.0)
    sd["net.head.1.bias"][90:110] = 8.0
    dst = stalled_run.parent / "slab.ckpt"
    torch.save(state, dst)
    return dst


def _demo_cfg(input_dir: Path, ckpt: Path | str, out: Path | str, *extra: str):
    return compose_demo(
        input_dir, ckpt, out, "formats=[ply]", "depth=false", "turntable=false", "num_workers=0", *extra
    )


def test_demo_skips_bad_files_and_separates_shared_stems(slab_ckpt: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(IMAGES / "AFLW_image00046.jpg", photos / "face.jpg")
    shutil.copy(IMAGES / "JianzhuGuo.jpg", photos / "face.jpeg")
    (photos / "empty.jpg").write_bytes(b"")
    data = (IMAGES / "AFLW_image00095.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    reports = {r.path: r for r in run_demo(_demo_cfg(photos, slab_ckpt, out))}
    for bad in ("empty.jpg", "truncated.jpg"):
        assert reports[bad].reason == "unreadable_image", reports[bad].line()
    assert "0 bytes" in reports["empty.jpg"].message and "truncated" in reports["truncated.jpg"].message
    for name, stem in (("face.jpg", "face_jpg"), ("face.jpeg", "face_jpeg")):
        rep = reports[name]
        assert rep.status == "ok" and rep.output_stem == stem and rep.faces, rep.line()
        overlay = out / f"{stem}_face0_overlay.png"
        assert (out / f"{stem}_face0.ply").is_file()
        # each overlay is drawn over its own photo (the two photos differ in size)
        assert read_image_rgb(overlay).shape == read_image_rgb(photos / name).shape
    assert not list(out.glob("face_face0*"))
    assert (out / "summary.json").is_file()


def test_demo_checks_output_dir_before_any_work(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(IMAGES / "AFLW_image00046.jpg", photos / "face.jpg")
    if os.geteuid() == 0:  # root writes through permission bits: use a folder no one can write to
        ro = Path("/sys/kernel")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    # the checkpoint does not exist either: the output check comes first, before the model loads
    with pytest.raises(UserError, match="output_dir=.* is not writable") as e:
        run_demo(_demo_cfg(photos, tmp_path / "missing.ckpt", ro))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------
# expected user errors: one line, exit 2
# --------------------------------------------------------------------------------------


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, "-m", module, *args, f"hydra.run.dir={cwd / 'hydra'}"],
        cwd=ROOT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _assert_one_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1, r.stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]


def test_train_with_a_missing_ckpt_path_names_it(synthetic_packed: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "last.ckpt"
    r = _cli("vrn.train", *_run_overrides(synthetic_packed, f"ckpt_path={missing}"), cwd=tmp_path)
    _assert_one_line(r, "vrn.train: error: ", f"ckpt_path={missing}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPU")
def test_train_gpus_without_gpu_suggests_cpu(synthetic_packed: Path, tmp_path: Path) -> None:
    r = _cli("vrn.train", *_run_overrides(synthetic_packed, "trainer.gpus=2"), cwd=tmp_path)
    _assert_one_line(r, "trainer.gpus=2", "no CUDA GPU", "trainer.accelerator=cpu", "trainer=ddp_cpu")


def test_run_cli_reports_an_expected_error_in_one_line(capsys, monkeypatch) -> None:
    rec = Reconstructor(create_model("vrn_tiny").eval(), detector=None)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli("vrn.demo", lambda: rec.reconstruct_crops(np.zeros((1, 3, 100, 100), np.uint8)))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vrn.demo: error: crops must be 192x192" in err
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the full error is still there when asked for
    with pytest.raises(ValueError, match="192x192"):
        run_cli("vrn.demo", lambda: rec.reconstruct_crops(np.zeros((1, 3, 100, 100), np.uint8)))

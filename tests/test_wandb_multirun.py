"""W&B offline logging with media, and a Hydra multirun giving separate W&B runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import compose_config, tiny_train_overrides
from vrn.callbacks import VolumePreviewLogger
from vrn.conventions import DEFAULT_LAYOUT, VolumeLayout
from vrn.train import train
from vrn.wandb_logging import has_api_key, wandb_mode

ROOT = Path(__file__).resolve().parents[1]


def test_wandb_offline_run_with_media(synthetic_packed, tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose_config(
        "train",
        [
            *tiny_train_overrides(synthetic_packed, "wandb"),
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "trainer.accelerator=cpu",
            "test=false",
            "trainer.num_sanity_val_steps=0",
        ],
        output_dir=tmp_path,
    )
    train(cfg)
    assert wandb.run is None  # finished
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(n.endswith(".wandb") for n in files)
    media = [p for p in runs[0].rglob("*") if p.suffix in (".png", ".json") and "media" in str(p)]
    assert any(p.suffix == ".png" for p in media), "image panel missing"
    assert any("surface" in p.name or "object3D" in str(p) for p in media), "3D point cloud missing"
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_multirun_gives_separate_wandb_runs(synthetic_packed, tmp_path):
    env = {**os.environ, "WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc"), "VRN_ROOT": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "vrn.train",
        "-m",
        "model.optimizer.lr=1e-4,3e-4",
        "data=folder",
        f"data.root={synthetic_packed}",
        "data.num_workers=0",
        "data.batch_size=2",
        "model=vrn_tiny",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.accelerator=cpu",
        "trainer.num_sanity_val_steps=0",
        "test=false",
        "callbacks=none",
        f"paths.log_dir={tmp_path}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(tmp_path.glob("train/multiruns/*/*/wandb/offline-run-*"))
    assert len(runs) == 2, out.stderr[-2000:]
    assert runs[0].parent.parent != runs[1].parent.parent
    assert runs[0].name.split("-")[-1] != runs[1].name.split("-")[-1]  # distinct run ids


@pytest.mark.parametrize(
    "env_mode, key, requested, expected",
    [
        (None, False, None, "offline"),  # no API key -> offline
        (None, True, None, "online"),
        ("offline", True, None, "offline"),
        ("dryrun", True, None, "offline"),
        ("disabled", True, None, "disabled"),
        ("disabled", False, None, "disabled"),
        (None, True, "offline", "offline"),
        (None, True, "disabled", "disabled"),
        ("offline", True, "online", "offline"),  # the environment only makes it more offline
    ],
)
def test_wandb_mode_rule(monkeypatch, tmp_path, env_mode, key, requested, expected):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    if key:
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    else:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    if env_mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    assert has_api_key() is key
    assert wandb_mode(requested) == expected


def test_wandb_mode_rejects_unknown(monkeypatch):
    with pytest.raises(ValueError):
        wandb_mode("sometimes")


def test_has_api_key_from_netrc(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password x\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert has_api_key()


def test_preview_callback_reads_the_module_layout():
    class _Plain(torch.nn.Module):
        pass

    class _WithLayout(torch.nn.Module):
        layout = VolumeLayout(depth_factor=4.0)

    assert VolumePreviewLogger.layout_of(_Plain()) is DEFAULT_LAYOUT
    assert VolumePreviewLogger.layout_of(_WithLayout()).depth_factor == 4.0

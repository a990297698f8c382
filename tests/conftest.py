"""Shared test setup: real assets from ../shared, no network, W&B offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VRN_SHARED_DIR", ROOT.parent / "shared"))
os.environ.setdefault("VRN_ASSETS_DIR", str(SHARED / "assets"))
os.environ.setdefault("VRN_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("VRN_ROOT", str(ROOT))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED}; set VRN_SHARED_DIR")
    return SHARED


@pytest.fixture(scope="session")
def synthetic_packed(tmp_path_factory) -> Path:
    """A small synthetic packed dataset (12 train / 4 val / 4 test), built once per session."""
    from vrn.data.synthetic import SyntheticFaceConfig, generate_packed

    root = tmp_path_factory.mktemp("synthetic") / "packed"
    generate_packed(root, SyntheticFaceConfig(), {"train": 12, "val": 4, "test": 4}, seed=7, progress=False)
    return root

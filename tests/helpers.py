"""Shared test helpers: compose the real Hydra configs (lightning-hydra-template style), a tiny
training config, and the target-surface-at-landmarks check of the pipeline tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from torch import nn

from data_pipeline.fit import load_fit_mesh
from vrn.checkpoint import save_network
from vrn.conventions import CROP_FACE_SIZE, CROP_SIZE, VolumeLayout
from vrn.geometry.raster import rasterize
from vrn.models import create_model
from vrn.volume.codec import from_bytes
from vrn.volume.surface import front_depth_of_code

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
#: evaluation's own config folder (`python -m vrn.evaluate`)
EVAL_CONF_DIR = CONF_DIR / "eval_data"


def compose_config(
    name: str, overrides: list[str], output_dir: Path | None = None, config_dir: Path = CONF_DIR
) -> DictConfig:
    """Compose ``<config_dir>/<name>.yaml`` with overrides; hydra: interpolations resolvable."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
        HydraConfig().set_config(cfg)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir)
    return cfg


def slab_checkpoint(path: Path, crop_size: int = 64, depth_bins: int = 48, slab: tuple[int, int] = (20, 28)) -> Path:
    """A fast stand-in model: ``vrn_tiny`` on a small layout (``crop_size`` px crops,
    ``depth_bins`` bins, the default face size scaled) whose last convolution is a constant
    (weights 0, bias +8 on bins ``slab``, -8 elsewhere): every face gets a slab-shaped mesh."""
    torch.manual_seed(0)
    net = create_model("vrn_tiny", depth_bins=depth_bins)
    head = net.head[1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-8.0)
        head.bias[slab[0] : slab[1]] = 8.0
    layout = VolumeLayout(crop_size, CROP_FACE_SIZE * crop_size / CROP_SIZE, depth_bins, depth_bins / crop_size)
    return save_network(path, net, {"name": "vrn_tiny", "depth_bins": depth_bins}, layout)


def tiny_train_overrides(packed_root: Path, logger: str) -> list[str]:
    """Overrides of a seconds-long CPU training run of ``vrn_tiny`` on a packed folder."""
    return [
        "data=folder",
        f"data.root={packed_root}",
        "data.num_workers=0",
        "data.batch_size=2",
        "model=vrn_tiny",
        f"logger={logger}",
    ]


def target_surface_at_landmarks(
    stage_dir: Path, samples: list[dict], min_visible: int
) -> tuple[list[float], np.ndarray]:
    """Front depth of each voxelised target at its fitted landmarks' pixels vs the landmarks'
    own depth bins ``d = 2 z``, over the landmarks the mesh itself shows (its z-buffer at that
    pixel within 1 px of the landmark: the far-side jaw in profile is hidden by the cheek).

    Returns:
        per sample the fraction of visible landmarks within 2 depth bins, and all their gaps (bins).
    """
    fracs, gaps = [], []
    for s in samples:
        mesh = load_fit_mesh(stage_dir, s)
        code = from_bytes((stage_dir / s["files"]["volume"]).read_bytes())
        fd = front_depth_of_code(code) + 0.5  # centre of the front voxel
        lm = mesh["landmarks"].astype(np.float64)
        size = code.shape[1]
        r = rasterize(mesh["verts"], mesh["tris"], size, size, keep="front")
        c = np.clip(np.round(lm[:, :2]).astype(int), 0, size - 1)
        d = np.abs(fd[c[:, 1], c[:, 0]] - 2 * lm[:, 2])
        visible = np.abs(r.depth[c[:, 1], c[:, 0]] - lm[:, 2]) < 1.0
        assert visible.sum() >= min_visible, s["id"]
        fracs.append(float(np.mean(d[visible] <= 2.0)))
        gaps.append(d[visible])
    return fracs, np.concatenate(gaps)


def compose_pipeline(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/pipeline/<config_name>.yaml`` as ``python -m data_pipeline.run`` does."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR / "pipeline")):
        return compose(config_name=config_name, overrides=overrides)


def compose_demo(
    input_dir: Path, ckpt: Path | str, out: Path | str, *extra: str, set_output: bool = False
) -> DictConfig:
    """Compose ``conf/demo.yaml`` for an offline run (``detector=tddfa``) on ``input_dir``."""
    overrides = [f"input={input_dir}", f"ckpt={ckpt}", f"output_dir={out}", "detector=tddfa", *extra]
    return compose_config("demo", overrides, output_dir=Path(out) if set_output else None)


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as module ``name`` (registered in ``sys.modules``: dataclasses
    look their module up by name)."""
    path = CONF_DIR.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class GroundTruthNet(nn.Module):
    """Stands in for the network: logits +-20 of a fixed (D, H, W) bool volume, whatever the input."""

    def __init__(self, volume: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("logits", torch.from_numpy(np.where(volume, 20.0, -20.0).astype(np.float32)))
        self.depth_bins = volume.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1, -1).clone()

"""Compose the real Hydra configs in tests (lightning-hydra-template style)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(name: str, overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose ``conf/<name>.yaml`` with overrides; hydra: interpolations resolvable."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
        HydraConfig().set_config(cfg)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir)
    return cfg

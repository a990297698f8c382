"""Weights & Biases in one place: the offline rule, run start/finish and media helpers.

Training (:mod:`vrn.builders`, :mod:`vrn.train`, :mod:`vrn.callbacks`), the demo and the
evaluation all go through this module, so the rule for "online, offline or disabled" is
written once (:func:`wandb_mode`). ``wandb`` itself is imported lazily inside the functions:
importing this module never needs the package.

Coordinates: point clouds and meshes given here are logged as they are; callers flip them
to y-up for 3D viewers (image px are y-down, :mod:`vrn.conventions`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "current_run",
    "finish_run",
    "has_api_key",
    "image_media",
    "is_active",
    "log_image",
    "log_media",
    "log_mesh",
    "log_point_cloud",
    "mesh_media",
    "point_cloud_media",
    "start_run",
    "wandb_mode",
]

MODES = ("online", "offline", "disabled")


def _available() -> bool:
    return importlib.util.find_spec("wandb") is not None


def has_api_key() -> bool:
    """True when W&B can authenticate: ``WANDB_API_KEY`` or a stored ``wandb login`` (netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(requested: str | None = None) -> str:
    """The one W&B mode rule: "disabled", "offline" or "online".

    * "disabled" when ``WANDB_MODE=disabled`` or ``requested == "disabled"``;
    * "offline" when ``WANDB_MODE=offline`` (or ``dryrun``), ``requested == "offline"`` or no API key
      (:func:`has_api_key`) is configured;
    * else "online".

    ``requested`` (None: no preference) is the caller's wish, e.g. a config value; the
    environment and a missing API key can only make it more offline, never more online.
    """
    if requested is not None and str(requested) not in MODES:
        raise ValueError(f"W&B mode {requested!r} not one of {MODES}")
    env = os.environ.get("WANDB_MODE")
    if env == "disabled" or requested == "disabled":
        return "disabled"
    # "dryrun" is wandb's old name for offline (Lightning's WandbLogger(offline=True) sets it)
    if env in ("offline", "dryrun") or requested == "offline" or not has_api_key():
        return "offline"
    return "online"


def is_active() -> bool:
    """True when a W&B run is active in this process (False when wandb is not installed)."""
    return current_run() is not None


def current_run() -> Any:
    """The active ``wandb.Run`` or None (also None when wandb is not installed)."""
    if not _available():
        return None
    import wandb

    return wandb.run


def start_run(
    project: str, out_dir: str | os.PathLike, job_type: str, config: dict[str, Any] | None = None, **kwargs: Any
) -> bool:
    """Start a W&B run in ``out_dir`` unless one is active; True if this call started it.

    The mode comes from :func:`wandb_mode` (``kwargs["mode"]``, if given, is the requested
    mode). Other ``kwargs`` go to ``wandb.init``. The caller that got True calls
    :func:`finish_run`.
    """
    import wandb

    if wandb.run is not None:
        return False
    mode = wandb_mode(kwargs.pop("mode", None))
    if mode == "offline" and not has_api_key():
        log.info("W&B: no API key found, logging offline (sync later with `wandb sync`)")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    wandb.init(project=str(project), dir=str(out_dir), mode=mode, job_type=job_type, config=config, **kwargs)
    return True


def finish_run() -> None:
    """Finish the active W&B run, if any (a no-op without wandb or without a run)."""
    if not _available():
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()


# --------------------------------------------------------------------------------------
# media
# --------------------------------------------------------------------------------------


def point_cloud_media(points_xyz: np.ndarray) -> Any:
    """``wandb.Object3D`` of an (N, 3) float point cloud (logged as given, no axis flip)."""
    import wandb

    return wandb.Object3D(np.asarray(points_xyz))


def image_media(image_rgb: np.ndarray | str | os.PathLike, caption: str | None = None) -> Any:
    """``wandb.Image`` of an (H, W, 3) uint8 RGB array or an image file path."""
    import wandb

    data = str(image_rgb) if isinstance(image_rgb, (str, os.PathLike)) else image_rgb
    return wandb.Image(data, caption=caption)


def mesh_media(path: str | os.PathLike, caption: str | None = None) -> Any:
    """``wandb.Object3D`` of a mesh file (.glb/.obj/.gltf), already in the viewer's frame (y-up)."""
    import wandb

    return wandb.Object3D(str(path), caption=caption)


def log_media(items: dict[str, Any], run: Any = None) -> None:
    """``run.log(items)`` on ``run`` (default: the active run); a no-op without a run or items."""
    run = run if run is not None else current_run()
    if run is None or not items:
        return
    run.log(items)


def log_point_cloud(key: str, points_xyz: np.ndarray, run: Any = None) -> None:
    """Log an (N, 3) point cloud under ``key`` (see :func:`point_cloud_media`)."""
    log_media({key: point_cloud_media(points_xyz)}, run)


def log_image(key: str, image_rgb: np.ndarray | str | os.PathLike, caption: str | None = None, run: Any = None) -> None:
    """Log an (H, W, 3) uint8 RGB image or image file under ``key`` (see :func:`image_media`)."""
    log_media({key: image_media(image_rgb, caption)}, run)


def log_mesh(key: str, path: str | os.PathLike, caption: str | None = None, run: Any = None) -> None:
    """Log a y-up mesh file under ``key`` (see :func:`mesh_media`)."""
    log_media({key: mesh_media(path, caption)}, run)

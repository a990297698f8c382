"""Weights & Biases in one place: the offline rule, run start/finish, run naming and media helpers.

Training (:mod:`vrn.builders`, :mod:`vrn.train`, :mod:`vrn.callbacks`), the demo and the
evaluation all go through this module, so the rule for "online, offline or disabled" is
written once (:func:`wandb_mode`). ``wandb`` itself is imported lazily inside the functions:
importing this module never needs the package.

Run naming (:func:`run_identity`): every job of a Hydra multirun / sweep is one W&B *group*
named ``<task>-<sweep folder name>``, each job *named* from the overrides that the sweep varies
(``lr=0.003``); a single run is named after its run folder. The W&B run id of a training run
is kept in its checkpoints (:data:`CHECKPOINT_RUN_ID_KEY`), so resuming continues that run.

Coordinates: point clouds and meshes given here are logged as they are; callers flip them
to y-up for 3D viewers (image px are y-down, :mod:`vrn.conventions`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_RUN_ID_KEY",
    "MODES",
    "current_run",
    "finish_run",
    "flatten_config",
    "has_api_key",
    "image_media",
    "is_active",
    "log_image",
    "log_media",
    "log_mesh",
    "log_point_cloud",
    "mesh_media",
    "point_cloud_media",
    "run_id_from_checkpoint",
    "run_identity",
    "run_name_from_overrides",
    "start_run",
    "swept_keys",
    "wandb_mode",
]

MODES = ("online", "offline", "disabled")

#: where a training checkpoint keeps the id of its W&B run (written by
#: :class:`vrn.callbacks.RunSummary`, read by ``vrn.train`` on resume)
CHECKPOINT_RUN_ID_KEY = "wandb_run_id"


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
# run naming, flat config, resume
# --------------------------------------------------------------------------------------


def flatten_config(cfg: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """Nested mappings flattened to one level: ``{"model": {"optimizer": {"lr": 1e-3}}}`` ->
    ``{"model.optimizer.lr": 1e-3}``. Lists stay values; an empty mapping stays an empty dict."""
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{sep}{k}" if prefix else str(k)
            if isinstance(v, Mapping) and v:
                walk(v, key)
            else:
                out[key] = v

    walk(cfg, "")
    return out


def _override_key(text: str) -> str:
    """``+model.optimizer.lr=3e-3`` -> ``model.optimizer.lr``."""
    return text.split("=", 1)[0].lstrip("+~")


def swept_keys(sweep_overrides: Iterable[str], sweeper_params: Iterable[str] = ()) -> list[str]:
    """The config keys a multirun varies, in order: the command-line sweep overrides
    (``lr=1e-4,3e-4``, ``range(...)``, ``choice(...)``) and the sweeper's ``params`` keys."""
    keys: list[str] = []
    parsed = OverridesParser.create().parse_overrides(list(sweep_overrides))
    for o in parsed:
        key = _override_key(o.get_key_element())
        if o.is_sweep_override() and key not in keys:
            keys.append(key)
    for k in sweeper_params:
        if _override_key(str(k)) not in keys:
            keys.append(_override_key(str(k)))
    return keys


def run_name_from_overrides(overrides: Sequence[str], keys: Sequence[str] | None = None) -> str:
    """A short run name from a job's overrides: ``["model.optimizer.lr=0.003", "data=folder"]`` with
    ``keys=["model.optimizer.lr"]`` -> ``"lr=0.003"``.

    Only ``keys`` (None: all overrides) are used, each shown by its last dotted part unless two
    keys share it (then in full); pairs are joined with ``,``. Empty string when nothing matches.
    """
    pairs = [(_override_key(o), o.split("=", 1)[1] if "=" in o else "") for o in overrides]
    if keys is not None:
        wanted = set(keys)
        pairs = [(k, v) for k, v in pairs if k in wanted]
    tails = [k.rsplit(".", 1)[-1] for k, _ in pairs]
    shown = [t if tails.count(t) == 1 else k for t, (k, _) in zip(tails, pairs)]
    return ",".join(f"{s}={v}" for s, (_, v) in zip(shown, pairs))


def _sweep_overrides(sweep_dir: Path) -> list[str]:
    """The multirun's command-line overrides, from the sweep folder's ``multirun.yaml``
    (written by Hydra's basic sweeper); [] when there is none."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return []
    try:
        return [str(o) for o in OmegaConf.load(path).hydra.overrides.task]
    except Exception:  # noqa: BLE001 - another sweeper's file: fall back to the job's overrides
        return []


def run_identity(task_name: str | None = None) -> tuple[str | None, str | None]:
    """``(group, name)`` for the W&B run of this Hydra job.

    * Multirun / sweep job: group ``<task>-<sweep folder name>`` (e.g.
      ``train-2026-11-27_19-40-00``), name from the overrides the sweep varies
      (:func:`swept_keys`, :func:`run_name_from_overrides`), else ``job<num>``.
    * Single run: no group, name = the run folder's name.
    * Not under Hydra: ``(None, None)``.

    ``task_name`` defaults to Hydra's job name.
    """
    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    task = task_name or hc.job.name
    if hc.mode != RunMode.MULTIRUN:
        out = hc.runtime.get("output_dir")
        return None, (Path(str(out)).name if out else None)
    sweep_dir = Path(str(hc.sweep.dir))
    params = hc.sweeper.get("params") or {}
    keys = swept_keys(_sweep_overrides(sweep_dir), list(params.keys()))
    name = run_name_from_overrides(list(hc.overrides.task), keys) if keys else ""
    return f"{task}-{sweep_dir.name}", name or f"job{hc.job.num}"


def run_id_from_checkpoint(path: str | os.PathLike | None) -> str | None:
    """The W&B run id kept in a training checkpoint (:data:`CHECKPOINT_RUN_ID_KEY`), or None
    (no path, or a checkpoint written without a W&B run)."""
    if path in (None, ""):
        return None
    state = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
    run_id = state.get(CHECKPOINT_RUN_ID_KEY) if isinstance(state, dict) else None
    return str(run_id) if run_id else None


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

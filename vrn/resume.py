"""Which checkpoint a training run continues from: ``ckpt_path=``, or the run's own ``last.ckpt``
after a cluster requeue (``resume=auto|true|false``), checked before any work."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vrn.checkpoint import verify_checkpoint
from vrn.cli_errors import UserError

log = logging.getLogger(__name__)

__all__ = ["check_resume_checkpoint", "resume_checkpoint"]

#: what a checkpoint of vrn.train holds (Lightning's trainer state)
_TRAINER_KEYS = ("state_dict", "epoch", "global_step")


def check_resume_checkpoint(ckpt_path: str | None) -> Path | None:
    """The ``ckpt_path=`` to resume from, checked before any work.

    Raises:
        UserError: the file is missing, damaged, or not a checkpoint written by ``vrn.train``.
    """
    if ckpt_path in (None, ""):
        return None
    p = Path(str(ckpt_path)).expanduser()
    hint = "give a .ckpt file written by vrn.train (e.g. outputs/train/runs/<run>/checkpoints/last.ckpt)"
    if not p.is_file():
        raise UserError(f"ckpt_path={p} does not exist: {hint}, or drop ckpt_path= to start afresh")
    try:
        verify_checkpoint(p)
        state = torch.load(str(p), map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it means the same thing to the user
        raise UserError(f"ckpt_path={p} cannot be read as a checkpoint ({type(e).__name__}: {e}): {hint}") from e
    missing = [k for k in _TRAINER_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(
            f"ckpt_path={p} is not a training checkpoint (no {', '.join(missing)}; a slim model file of "
            f"Reconstructor.save cannot resume training): {hint}"
        )
    return p


def _under_submitit() -> bool:
    """Whether this job was started by a submitit Hydra launcher (cluster=slurm / cluster=local)."""
    try:
        return "submitit" in str(HydraConfig.get().launcher.get("_target_", ""))
    except ValueError:  # not under Hydra
        return False


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint this run continues from: ``ckpt_path`` when given, else this run's own
    ``last.ckpt`` (``callbacks.last_checkpoint`` dirpath/filename, default
    ``<paths.output_dir>/checkpoints/last.ckpt``) when it exists and ``resume`` allows it:
    ``true`` always, ``auto`` (default) only in a submitit launcher's job (a requeued cluster job
    runs again in the same folder), ``false`` never. A fresh run in a fresh folder gets None.

    Raises:
        UserError: ``resume`` is not auto / true / false.
    """
    if cfg.get("ckpt_path") not in (None, ""):
        return str(cfg.ckpt_path)
    mode = str(cfg.get("resume", "auto")).lower()
    if mode not in ("auto", "true", "false"):
        raise UserError(f"resume={cfg.get('resume')} is not one of auto, true, false")
    if mode == "false" or (mode == "auto" and not _under_submitit()):
        return None
    last_cfg = (cfg.get("callbacks") or {}).get("last_checkpoint") or {}
    folder = last_cfg.get("dirpath") or Path(str(cfg.paths.output_dir)) / "checkpoints"
    last = Path(str(folder)) / f"{last_cfg.get('filename') or 'last'}.ckpt"
    if not last.is_file():
        return None
    log.info(f"resume={mode}: continuing from this run's {last}")
    return str(last)

"""Build the Lightning Trainer, callbacks and loggers from Hydra config."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import WandbLogger

from vrn.cli_errors import UserError, cuda_device_count
from vrn.wandb_logging import flatten_config, has_api_key, run_identity, wandb_mode

log = logging.getLogger(__name__)

__all__ = [
    "FlatWandbLogger",
    "build_callbacks",
    "build_loggers",
    "build_trainer",
    "check_accelerator",
    "drop_logger_callbacks",
    "resolve_gpus_alias",
    "resolve_precision",
]


def resolve_gpus_alias(trainer_cfg: DictConfig) -> DictConfig:
    """Map the removed Lightning 1.x ``gpus=N`` argument onto ``accelerator=gpu, devices=N``.

    Returns a copy without ``gpus``. ``gpus=null`` or absent changes nothing; ``gpus=0``
    means CPU. Emits a deprecation note pointing at ``trainer.devices``.
    """
    cfg = OmegaConf.create(OmegaConf.to_container(trainer_cfg, resolve=True))
    gpus = cfg.get("gpus", None)
    with open_dict(cfg):
        cfg.pop("gpus", None)
        if gpus is None:
            return cfg
        msg = (
            f"trainer.gpus={gpus} is deprecated (Lightning 2 removed `gpus`): "
            f"use trainer.accelerator=gpu trainer.devices={gpus} instead"
        )
        warnings.warn(msg, DeprecationWarning, stacklevel=2)
        log.warning(msg)
        if isinstance(gpus, int) and gpus == 0:
            cfg.accelerator, cfg.devices = "cpu", 1
        else:
            cfg.accelerator, cfg.devices = "gpu", gpus
            n = gpus if isinstance(gpus, int) else len(gpus) if isinstance(gpus, (list, tuple)) else None
            if n is not None and n > 1 and cfg.get("strategy", "auto") == "auto":
                cfg.strategy = "ddp"
    return cfg


def check_accelerator(tcfg: DictConfig, asked: str) -> None:
    """Stop with one line when ``tcfg`` (a resolved trainer config) asks for GPUs this machine lacks.

    ``asked``: how the user asked (``trainer.gpus=2`` or ``trainer.accelerator=gpu``), for the message.
    Without any GPU, the message names ``trainer=cpu``, and also ``trainer=ddp_cpu`` (DDP on 2 CPU
    processes) when the config asks for DDP (a ``ddp*`` strategy or ``devices`` > 1).

    Raises:
        UserError: no CUDA GPU is available, or fewer than ``devices`` asks for.
    """
    if str(tcfg.get("accelerator", "auto")).lower() not in ("gpu", "cuda"):
        return
    devices = tcfg.get("devices", 1)
    want = devices if isinstance(devices, int) else len(devices) if isinstance(devices, (list, tuple)) else None
    n = cuda_device_count()
    if n == 0:
        ddp = "ddp" in str(tcfg.get("strategy", "auto")).lower() or (want is not None and want > 1)
        cpu_ddp = " or trainer=ddp_cpu (DDP on 2 CPU processes)" if ddp else ""
        raise UserError(
            f"{asked} but no CUDA GPU is available on this machine (or torch is a CPU build): "
            f"use trainer.accelerator=cpu (or trainer=cpu){cpu_ddp}"
        )
    if want is not None and want > n:
        raise UserError(f"{asked} asks for {want} GPUs but this machine has {n}: use trainer.devices={n} or fewer")


#: ``trainer.precision`` value that picks the mixed precision the GPU supports (resolve_precision)
AUTO_MIXED = "auto-mixed"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(tcfg: DictConfig) -> DictConfig:
    """Replace ``precision: auto-mixed`` in a resolved trainer config by a Lightning value.

    On CUDA GPUs (``accelerator`` gpu / cuda, or auto with a GPU present): ``bf16-mixed`` when
    the GPU supports bfloat16 (Ampere and newer), else ``16-mixed``. On CPU: ``32-true``
    (CPU autocast is slower than float32 for these convolutions). A ``bf16`` precision on a CPU
    run (``accelerator`` cpu, or auto without a GPU) whose CPU lacks native bfloat16
    (:func:`cpu_has_native_bf16`) becomes ``32-true`` with a warning: emulated there, it trained
    the guided AFLW model at 0.02 steps/s. Any other value is kept. Returns a copy.
    """
    cfg = OmegaConf.create(OmegaConf.to_container(tcfg, resolve=True))
    accel = str(cfg.get("accelerator", "auto")).lower()
    on_gpu = accel in ("gpu", "cuda") or (accel == "auto" and cuda_device_count() > 0)
    precision = str(cfg.get("precision"))
    if precision.startswith("bf16") and not on_gpu and accel in ("cpu", "auto") and not cpu_has_native_bf16():
        log.warning(
            f"trainer.precision={precision}: this CPU has no native bfloat16 (AVX512-BF16 / AMX), where bf16 "
            "is emulated and training runs at a small fraction of float32's speed (docs/benchmarks.md); "
            "training in 32-true instead. Pass trainer.precision=32 to silence this."
        )
        with open_dict(cfg):
            cfg.precision = "32-true"
        return cfg
    if precision != AUTO_MIXED:
        return cfg
    if on_gpu:
        chosen = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    else:
        chosen = "32-true"
    log.info(f"trainer.precision={AUTO_MIXED}: using {chosen}")
    with open_dict(cfg):
        cfg.precision = chosen
    return cfg


def build_callbacks(cfg: DictConfig | None) -> list[pl.Callback]:
    out: list[pl.Callback] = []
    if not cfg:
        return out
    for _name, cb in cfg.items():
        if isinstance(cb, DictConfig) and "_target_" in cb:
            out.append(hydra.utils.instantiate(cb))
    return out


class FlatWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` logging the hyperparameters flat (``model.optimizer.lr``
    keys, :func:`vrn.wandb_logging.flatten_config`), so W&B tables and sweeps can filter and
    group by any config value."""

    def log_hyperparams(self, params: Any) -> None:  # noqa: D102 - see the class
        if isinstance(params, DictConfig):
            params = OmegaConf.to_container(params, resolve=True)
        if isinstance(params, dict):
            params = flatten_config(params)
        super().log_hyperparams(params)


def _wandb_logger_cfg(lg: DictConfig, resume_run_id: str | None = None) -> DictConfig:
    """A resolved copy of a ``WandbLogger`` config with ``offline: null`` decided by
    :func:`vrn.wandb_logging.wandb_mode` (offline without an API key; ``mode: disabled``
    under ``WANDB_MODE=disabled``); creates ``save_dir``.

    ``group: null`` / ``name: null`` become :func:`vrn.wandb_logging.run_identity` (a multirun's
    group, a name from the swept overrides); values set by the user are kept. With
    ``resume_run_id`` (the id kept in the checkpoint being resumed) the run continues that W&B
    run (``id``, ``resume: allow``) and keeps its own group and name unless set here.
    """
    lg = OmegaConf.create(OmegaConf.to_container(lg, resolve=True))
    with open_dict(lg):
        if resume_run_id and not lg.get("id"):
            lg.id, lg.resume = str(resume_run_id), "allow"
        else:
            group, name = run_identity(lg.get("job_type"))
            if lg.get("group") is None:
                lg.group = group
            if lg.get("name") is None:
                lg.name = name
    if lg.get("offline") is None:
        mode = wandb_mode()
        with open_dict(lg):
            lg.offline = mode == "offline"
            if mode == "disabled":
                lg.mode = "disabled"
        if lg.offline and not has_api_key():
            log.info("W&B: no API key found, logging offline (sync later with `wandb sync`)")
    Path(lg.save_dir).mkdir(parents=True, exist_ok=True)
    return lg


def build_loggers(cfg: DictConfig | None, resume_run_id: str | None = None) -> list[Any]:
    """Instantiate loggers; a W&B logger with ``offline: null`` goes offline without an API key,
    and continues the W&B run ``resume_run_id`` when given (see :func:`_wandb_logger_cfg`)."""
    out: list[Any] = []
    if not cfg:
        return out
    for _name, lg in cfg.items():
        if not (isinstance(lg, DictConfig) and "_target_" in lg):
            continue
        if "Wandb" in str(lg._target_):
            lg = _wandb_logger_cfg(lg, resume_run_id)
        out.append(hydra.utils.instantiate(lg))
    return out


def drop_logger_callbacks(callbacks: list[pl.Callback], loggers: list[Any] | bool | None) -> list[pl.Callback]:
    """``callbacks`` without the ones that need a logger (``LearningRateMonitor``) when there
    is none (``logger=none``), logging what was dropped."""
    if loggers:
        return list(callbacks)
    kept = []
    for cb in callbacks:
        if isinstance(cb, LearningRateMonitor):
            log.info(f"no logger configured: dropping {type(cb).__name__} (it needs a logger)")
            continue
        kept.append(cb)
    return kept


def build_trainer(
    cfg: DictConfig, callbacks: list[pl.Callback] | None = None, logger: list[Any] | bool | None = None
) -> pl.Trainer:
    """Instantiate ``pl.Trainer`` from ``cfg`` (the ``trainer`` group), honouring the ``gpus`` alias.

    Without a logger (``logger=none``) the callbacks that need one are dropped
    (:func:`drop_logger_callbacks`) instead of failing when training starts.
    ``precision: auto-mixed`` is resolved by :func:`resolve_precision`.
    """
    tcfg = resolve_gpus_alias(cfg)
    gpus = cfg.get("gpus", None)
    check_accelerator(
        tcfg, f"trainer.gpus={gpus}" if gpus is not None else f"trainer.accelerator={tcfg.get('accelerator')}"
    )
    tcfg = resolve_precision(tcfg)
    if logger is None or logger == []:
        logger = False
    callbacks = drop_logger_callbacks(callbacks or [], logger)
    return hydra.utils.instantiate(tcfg, callbacks=callbacks, logger=logger)

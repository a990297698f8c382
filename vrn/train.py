"""Training entry point: ``python -m vrn.train [overrides]``. Only wiring; see conf/train.yaml.

``last.ckpt`` (:class:`vrn.callbacks.LastCheckpoint`) is the latest state; SIGTERM / SIGINT save
the current step, print the command that resumes it and exit 143 / 130. Expected errors (a bad
config value, a missing or damaged ``ckpt_path``, no GPU) print one line and exit 2
(:mod:`vrn.cli_errors`; ``HYDRA_FULL_ERROR=1`` shows the traceback).
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from vrn.builders import build_callbacks, build_loggers, build_trainer
from vrn.callbacks import LastCheckpoint, TrainingStopped
from vrn.cli_errors import run_cli
from vrn.ddp_jobs import ddp_children_run_this_job, end_ddp_job
from vrn.resume import check_resume_checkpoint, resume_checkpoint
from vrn.wandb_logging import finish_run, run_id_from_checkpoint

log = logging.getLogger(__name__)

__all__ = ["check_resume_checkpoint", "resume_checkpoint", "resume_command", "train"]  # the first two: vrn.resume


def resume_command(ckpt_path: str | Path) -> str:
    """``python -m vrn.train <this run's overrides> ckpt_path=<ckpt_path>``."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra
        overrides = []
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
    return " ".join(["python -m vrn.train", *map(shlex.quote, kept), shlex.quote(f"ckpt_path={ckpt_path}")])


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    """The best checkpoint of the monitored ModelCheckpoint (not ``last.ckpt``), if any."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            return cb.best_model_path
    return None


def _last_checkpoint(trainer: pl.Trainer | None) -> LastCheckpoint | None:
    return next((cb for cb in (trainer.callbacks if trainer else []) if isinstance(cb, LastCheckpoint)), None)


def _stopped(trainer: pl.Trainer | None, default_signum: int) -> TrainingStopped:
    """The :class:`TrainingStopped` of a run that Lightning stopped itself (SIGTERMException)."""
    last = _last_checkpoint(trainer)
    signum = last.signum if last is not None and last.signum is not None else default_signum
    return TrainingStopped(signum, last.stop_path if last is not None else None)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally test) the configured model; returns the final metrics.

    Raises:
        TrainingStopped: SIGTERM / SIGINT during training (the checkpoint of that step is saved).
    """
    ckpt_path = check_resume_checkpoint(resume_checkpoint(cfg)) if cfg.get("train", True) else cfg.get("ckpt_path")
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = build_callbacks(cfg.get("callbacks"))
    # resuming training continues the W&B run whose id the checkpoint keeps (vrn.callbacks.RunSummary)
    resumed_run = run_id_from_checkpoint(ckpt_path) if cfg.get("train", True) else None
    loggers = build_loggers(cfg.get("logger"), resume_run_id=resumed_run)
    trainer = build_trainer(cfg.trainer, callbacks=callbacks, logger=loggers)
    run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(run_cfg, resolve=True))
    ddp_before = ddp_children_run_this_job()
    try:
        if cfg.get("train", True):
            trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
            last = _last_checkpoint(trainer)
            if last is not None and last.signum is not None:  # a signal after the last check: state is saved
                raise TrainingStopped(last.signum, str(last.path))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test", False):
            best = _best_checkpoint(trainer)
            if best is None and not cfg.get("train", True):
                best = cfg.get("ckpt_path")
            trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=False)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        ckpt = _best_checkpoint(trainer)
        if ckpt:
            log.info(f"Best checkpoint: {ckpt}")
        if "val/iou" in metrics:
            log.info(f"val/iou = {metrics['val/iou']:.4f}")
        return metrics
    except SIGTERMException as e:  # Lightning's own SIGTERM stop (a SystemExit with status 0)
        raise _stopped(trainer, signal.SIGTERM) from e
    finally:
        # Hydra's basic launcher runs multirun jobs in one process: close each W&B run.
        finish_run()
        end_ddp_job(trainer, ddp_before)


def _report_stop(stop: TrainingStopped) -> None:
    """Print what was kept and how to resume, on stderr."""
    name = signal.Signals(stop.signum).name
    if stop.ckpt_path:
        print(f"vrn.train: stopped by {name}; checkpoint of the current step: {stop.ckpt_path}", file=sys.stderr)
        print(f"resume with: {resume_command(stop.ckpt_path)}", file=sys.stderr, flush=True)
    else:
        print(f"vrn.train: stopped by {name} before the first training step; nothing saved", file=sys.stderr)


def _main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except TrainingStopped as stop:
        _report_stop(stop)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (setup, data generation)
        print("vrn.train: interrupted (SIGINT) before training started; nothing saved", file=sys.stderr)
        sys.exit(130)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


@hydra.main(version_base="1.3", config_path="../conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    return run_cli("vrn.train", lambda: _main(cfg))


if __name__ == "__main__":
    main()

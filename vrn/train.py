"""Training entry point: ``python -m vrn.train [overrides]``. Only wiring; see conf/train.yaml."""

from __future__ import annotations

import logging
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from vrn.builders import build_callbacks, build_loggers, build_trainer
from vrn.wandb_logging import finish_run

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally test) the configured model; returns the final metrics."""
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = build_callbacks(cfg.get("callbacks"))
    loggers = build_loggers(cfg.get("logger"))
    trainer = build_trainer(cfg.trainer, callbacks=callbacks, logger=loggers)
    run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(run_cfg, resolve=True))
    try:
        if cfg.get("train", True):
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test", False):
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
            if best is None and not cfg.get("train", True):
                best = cfg.get("ckpt_path")
            trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=False)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if ckpt:
            log.info(f"Best checkpoint: {ckpt}")
        if "val/iou" in metrics:
            log.info(f"val/iou = {metrics['val/iou']:.4f}")
        return metrics
    finally:
        # Hydra's basic launcher runs multirun jobs in one process: close each W&B run.
        finish_run()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()

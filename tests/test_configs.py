"""Every shipped config composes and instantiates what it names; the `gpus` alias."""

from __future__ import annotations

import inspect
import warnings

import hydra
import pytest
from omegaconf import OmegaConf

from tests.helpers import CONF_DIR, compose_config
from vrn.builders import build_callbacks, build_loggers, build_trainer, resolve_gpus_alias
from vrn.detectors import DEFAULT_DETECTOR


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUP_OVERRIDES = [
    f"{g}={o}" for g in ("data", "model", "trainer", "callbacks", "logger", "debug", "experiment") for o in _options(g)
]


@pytest.mark.parametrize("override", GROUP_OVERRIDES)
def test_train_config_composes(override, tmp_path):
    cfg = compose_config("train", [override], output_dir=tmp_path)
    if OmegaConf.is_missing(cfg.data, "root"):  # a folder dataset: the user names it
        cfg = compose_config("train", [override, "data.root=/tmp/packed"], output_dir=tmp_path)
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(plain, resolve=True, throw_on_missing=True)  # every interpolation resolves
    assert cfg.model._target_ == "vrn.lit_module.VRNLitModule"
    assert cfg.model.optimizer._partial_ is True
    assert cfg.data._target_.startswith("vrn.data.datamodule.")


def test_hparams_search_composes(tmp_path):
    cfg = compose_config("train", ["hparams_search=lr_sweep"], output_dir=tmp_path)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert "model.optimizer.lr" in cfg.hydra.sweeper.params


@pytest.mark.parametrize("model", _options("model"))
def test_model_configs_instantiate(model, tmp_path):
    cfg = compose_config("train", [f"model={model}"], output_dir=tmp_path)
    lit = hydra.utils.instantiate(cfg.model)
    assert lit.hparams.net["name"] == cfg.model.net.name
    opt = lit.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    assert opt.__class__.__name__ == "RMSprop"
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.model.optimizer.lr)


def test_default_is_synthetic_small_with_wandb(tmp_path):
    cfg = compose_config("train", [], output_dir=tmp_path)
    assert cfg.data._target_.endswith("SyntheticDataModule")
    assert cfg.model.net.name == "vrn_small"
    assert "wandb" in cfg.logger
    cb = cfg.callbacks.model_checkpoint
    assert cb.monitor == "val/iou" and cb.auto_insert_metric_name is False
    # last.ckpt is the latest state, written by its own callback whatever val/iou did
    assert not cb.save_last and cfg.callbacks.last_checkpoint._target_ == "vrn.callbacks.LastCheckpoint"


def test_gpus_alias_maps_to_accelerator_devices(tmp_path):
    cfg = compose_config("train", ["trainer.gpus=2"], output_dir=tmp_path)
    with pytest.warns(DeprecationWarning, match="trainer.devices=2"):
        t = resolve_gpus_alias(cfg.trainer)
    assert "gpus" not in t
    assert t.accelerator == "gpu" and t.devices == 2 and t.strategy == "ddp"
    with pytest.warns(DeprecationWarning):
        t0 = resolve_gpus_alias(compose_config("train", ["trainer.gpus=0"], output_dir=tmp_path).trainer)
    assert t0.accelerator == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t_none = resolve_gpus_alias(compose_config("train", [], output_dir=tmp_path).trainer)
    assert t_none.accelerator == "auto"


def test_gpus_alias_builds_a_cpu_trainer(tmp_path):
    cfg = compose_config("train", ["trainer.gpus=0", "trainer.max_epochs=1"], output_dir=tmp_path)
    with pytest.warns(DeprecationWarning):
        trainer = build_trainer(cfg.trainer)
    assert trainer.accelerator.__class__.__name__ == "CPUAccelerator"


def test_logger_none_builds_a_trainer_without_lr_monitor(tmp_path):
    """`logger=none` with the default callbacks: LearningRateMonitor (needs a logger) is dropped."""
    cfg = compose_config(
        "train", ["logger=none", "trainer.accelerator=cpu", "trainer.max_epochs=1"], output_dir=tmp_path
    )
    callbacks = build_callbacks(cfg.get("callbacks"))
    assert any(type(cb).__name__ == "LearningRateMonitor" for cb in callbacks)  # the default list has one
    loggers = build_loggers(cfg.get("logger"))
    assert loggers == []
    trainer = build_trainer(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert trainer.logger is None
    assert not any(type(cb).__name__ == "LearningRateMonitor" for cb in trainer.callbacks)
    assert any(type(cb).__name__ == "ModelCheckpoint" for cb in trainer.callbacks)


def test_demo_detector_default_is_the_api_default(tmp_path):
    cfg = compose_config("demo", ["input=x.jpg", "ckpt=x.ckpt"], output_dir=tmp_path)
    assert cfg.detector == DEFAULT_DETECTOR


def test_flip_tta_default_is_the_api_default(tmp_path):
    from tests.helpers import EVAL_CONF_DIR
    from vrn.inference import DEFAULT_FLIP_TTA, Reconstructor

    demo = compose_config("demo", ["input=x.jpg", "ckpt=x.ckpt"], output_dir=tmp_path)
    ev = compose_config("evaluate", ["data=folder", "data.root=x"], output_dir=tmp_path, config_dir=EVAL_CONF_DIR)
    default = inspect.signature(Reconstructor).parameters["flip_tta"].default
    assert demo.flip_tta is ev.flip_tta is default is DEFAULT_FLIP_TTA

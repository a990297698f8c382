"""VRNLitModule: loss, metrics, optimiser and scheduler around a registered VRN variant."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vrn.checkpoint import (
    check_network_layout,
    layout_for_network,
    load_network,
    pretrained_for_network,
    resolve_model_file,
)
from vrn.conventions import VolumeLayout
from vrn.losses import volume_bce_loss
from vrn.metrics import GlobalVoxelIoU, SumRatio, front_depth_error_sums
from vrn.models import create_model
from vrn.volume.codec import decode_torch

log = logging.getLogger(__name__)

__all__ = ["VRNLitModule", "volume_bce_loss", "batch_targets", "epoch_metrics"]

#: the stages whose epoch metrics the module keeps
STAGES = ("train", "val", "test")


def batch_targets(batch: dict[str, Any], depth_bins: int) -> torch.Tensor:
    """Decode the batch's compact targets to a dense (B, D, H, W) bool volume on its device."""
    return decode_torch(batch["lo"], batch["hi"], batch.get("extra"), depth_bins)


def epoch_metrics() -> nn.ModuleDict:
    """One stage's epoch metrics, each a sum over the epoch reduced across DDP ranks
    (:mod:`vrn.metrics`): ``loss`` (sample mean), ``iou`` (sum of intersections / sum of
    unions) and ``depth_mae`` (front-depth error, pixel mean)."""
    return nn.ModuleDict({"loss": SumRatio(), "iou": GlobalVoxelIoU(), "depth_mae": SumRatio()})


def _load_init_weights(net: nn.Module, spec: dict[str, Any], layout: VolumeLayout, path: str) -> None:
    """Copy the network weights of checkpoint ``path`` into ``net`` (same spec and layout).

    Raises:
        ValueError: the checkpoint's network differs (both named) or it does not load;
            vrn.conventions.LayoutMismatchError (a ValueError): its volume layout differs.
        FileNotFoundError: no such file.
    """
    if path == "pretrained":  # the shipped model of this run's network
        path = pretrained_for_network(str(spec.get("name")))
    src, src_spec, src_layout = load_network(resolve_model_file(path))
    load_unguided = getattr(net, "load_unguided", None)
    if load_unguided is not None and not getattr(src, "needs_landmarks", False):
        # a guided network started from an unguided one of its size (vrn.models.guidance)
        _check_init_layout(src_layout, layout, path)
        try:
            load_unguided(src.state_dict())
        except ValueError as e:
            raise ValueError(
                f"model.init_weights={path} holds network {src_spec}, which does not fit this run's guided "
                f"{spec}: {e}; start from the unguided variant of the same size (e.g. vrn_medium for "
                f"vrn_medium_guided), or drop init_weights"
            ) from e
        log.info(f"network weights initialised from unguided {path} (heatmap inputs start at zero)")
        return
    if dict(src_spec) != dict(spec):
        raise ValueError(
            f"model.init_weights={path} holds network {src_spec}, but this run builds {spec}: "
            f"choose the matching model= (or its net overrides), or drop init_weights"
        )
    _check_init_layout(src_layout, layout, path)
    net.load_state_dict(src.state_dict())
    log.info(f"network weights initialised from {path}")


def _check_init_layout(src: VolumeLayout, layout: VolumeLayout, path: str) -> None:
    """The init checkpoint's volume numbers must be this run's (source_roi_px comes from this
    run's data, so it may differ)."""
    src.check_matches(layout, f"model.init_weights={path}", "this run")


class VRNLitModule(pl.LightningModule):
    """Trains a VRN variant with per-voxel BCE.

    Args:
        net: model spec ``{"name": <registered variant>, **overrides}``; stored in the
            checkpoint so inference rebuilds the network without Hydra.
        optimizer: partial optimiser (``_partial_: true`` in config), called with params.
        scheduler: optional partial LR scheduler, called with the optimiser.
        scheduler_interval: "epoch" or "step".
        pos_weight: optional BCE weight of occupied voxels.
        compile: ``torch.compile`` the network (GPU runs).
        channels_last: NHWC memory layout for the network and its input (faster convolutions
            under bf16 autocast: 1.2x on the CPU and the H200 measured, docs/benchmarks.md);
            the weights and checkpoints are the same either way.
        train_metrics_every_n_steps: training IoU / depth error are computed on every n-th
            batch only (they cost about as much as a small model's step on CPU); validation
            and test compute them on every batch.

    Logged metrics (``<stage>`` = train, val, test): ``<stage>/loss``, ``<stage>/iou``,
    ``<stage>/depth_mae``. Epoch values are exact over the whole split under DDP (sums
    reduced across ranks, :mod:`vrn.metrics`, docs/ddp.md): loss = mean over samples, IoU =
    sum of voxel intersections / sum of voxel unions over all samples (voxel-weighted, not a
    mean of per-sample IoUs), depth MAE = mean |front depth error| in depth bins over all
    pixels where prediction and target both have a surface. Training's per-step values
    (``train/*_step``) are the batch's, on each rank.
        layout: the crop / volume layout (:class:`vrn.conventions.VolumeLayout` or its dict);
            None = :data:`~vrn.conventions.DEFAULT_LAYOUT` with the network's depth bins.
            Saved in the checkpoint as ``hyper_parameters["layout"]`` (a plain dict) and
            checked against the datamodule's ``layout`` when fitting / testing starts.
        init_weights: a checkpoint (path or URL; a ``vrn.train`` .ckpt, a file of
            ``Reconstructor.save`` or the released .t7; a pretrained model's name; ``pretrained``
            = the shipped model of this run's network, :func:`vrn.checkpoint.pretrained_for_network`)
            whose network weights start this training: fine-tuning / warm start. Only the weights
            are taken (optimiser, epoch and step start fresh; ``ckpt_path`` resumes a run
            instead). Its model spec and layout must equal this model's, except that a guided
            variant starts from its unguided twin (:meth:`vrn.models.guidance.GuidedVRN.load_unguided`).

    Attributes:
        layout: the :class:`~vrn.conventions.VolumeLayout` in use.
        depth_bins: ``layout.depth_bins`` (= the network's output channels).
    """

    def __init__(
        self,
        net: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        pos_weight: float | None = None,
        compile: bool = False,
        channels_last: bool = False,
        train_metrics_every_n_steps: int = 10,
        layout: VolumeLayout | dict[str, Any] | None = None,
        init_weights: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(net, DictConfig):
            net = OmegaConf.to_container(net, resolve=True)
        if isinstance(layout, DictConfig):
            layout = OmegaConf.to_container(layout, resolve=True)  # type: ignore[assignment]
        net = dict(net)
        built = create_model(**net)
        self.layout: VolumeLayout = layout_for_network(built, layout)  # type: ignore[arg-type]
        check_network_layout(built, self.layout, f"model {net.get('name')}")
        if init_weights:
            _load_init_weights(built, net, self.layout, str(init_weights))
        # saved from the current locals: the spec and the layout go into the checkpoint as plain
        # dicts (safe for weights_only loading)
        layout = self.layout.to_dict()  # noqa: F841 - read by save_hyperparameters
        self.save_hyperparameters(logger=False, ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.net: nn.Module = built
        self.depth_bins: int = self.layout.depth_bins
        self.channels_last = bool(channels_last)
        #: a guided variant (vrn.models.guidance): the batches' landmarks go in beside the image
        self.needs_landmarks = bool(getattr(built, "needs_landmarks", False))
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net = torch.compile(self.net)
        self.val_preview: dict[str, torch.Tensor] | None = None
        # torchmetrics states are not saved in checkpoints (persistent=False)
        self.train_metrics = epoch_metrics()
        self.val_metrics = epoch_metrics()
        self.test_metrics = epoch_metrics()

    def stage_metrics(self, stage: str) -> nn.ModuleDict:
        """The epoch metrics of ``stage`` ("train", "val" or "test")."""
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} not one of {STAGES}")
        return getattr(self, f"{stage}_metrics")

    def setup(self, stage: str) -> None:
        """Check the datamodule's layout (when it has one) against the model's.

        Raises:
            vrn.conventions.LayoutMismatchError: naming the dataset, the model and every
                differing value.
        """
        trainer = getattr(self, "_trainer", None)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        data_layout = getattr(dm, "layout", None)
        if isinstance(data_layout, VolumeLayout):
            name = getattr(dm, "root", None) or type(dm).__name__
            data_layout.check_matches(self.layout, f"dataset {name}", f"model {self.hparams.net.get('name')}")
            if stage == "fit" and data_layout.source_roi_px != self.layout.source_roi_px:
                # how the training photos were made is the data's: the checkpoint records it, so
                # inference makes its crops the same way (vrn.conventions)
                self.layout = replace(self.layout, source_roi_px=data_layout.source_roi_px)
                self.hparams["layout"] = self.layout.to_dict()

    def forward(self, image: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """image: (B, 3, H, W) float32 RGB [0, 1] (+ landmarks (B, 68, 2) crop px for a guided
        variant) -> logits (B, D, H, W)."""
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        if self.needs_landmarks:
            return self.net(image, landmarks)
        return self.net(image)

    def _batch_landmarks(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The batch's landmarks for a guided variant (None for an unguided one).

        Raises:
            ValueError: a guided variant on samples without landmarks.
        """
        if not self.needs_landmarks:
            return None
        marks = batch.get("landmarks")
        if marks is None or bool(torch.isnan(marks).all(-1).all(-1).any()):
            ids = [i for i, m in zip(batch.get("id", []), marks if marks is not None else []) if torch.isnan(m).all()]
            raise ValueError(
                f"model {self.hparams.net.get('name')} is guided by 68 landmarks per face, but samples "
                f"{ids[:3] or '(all)'} have none in their manifest rows: train it on a packed set made by "
                f"data_pipeline (its rows carry 'landmarks'), or choose an unguided model="
            )
        return marks

    def _record(self, stage: str, name: str, *update_args: Any) -> None:
        """Add a batch to the epoch metric ``<stage>/<name>`` and log it (the epoch value is
        computed, reduced across ranks, at the epoch's end). Training also logs the batch's
        own value per step (``Metric.forward``)."""
        metric = self.stage_metrics(stage)[name]
        on_step = stage == "train"
        if on_step:
            metric(*update_args)
        else:
            metric.update(*update_args)
        self.log(f"{stage}/{name}", metric, on_step=on_step, on_epoch=True, prog_bar=name != "depth_mae")

    def _step(self, batch: dict[str, Any], stage: str, batch_idx: int = 0) -> torch.Tensor:
        logits = self(batch["image"], self._batch_landmarks(batch))
        target = batch_targets(batch, self.depth_bins)
        # the loss in float32 also under bf16 / fp16 autocast (its sums run over ~7 M voxels a face;
        # autocast would run the fused loss's dot product in the low precision)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = volume_bce_loss(logits.float(), target.float(), self.hparams.pos_weight)
        self._record(stage, "loss", loss.detach() * logits.shape[0], logits.shape[0])
        every = max(1, int(self.hparams.get("train_metrics_every_n_steps", 1)))
        if stage != "train" or batch_idx % every == 0:
            with torch.no_grad():
                pred = logits > 0  # sigmoid(logit) > 0.5
                self._record(stage, "iou", pred, target)
                self._record(stage, "depth_mae", *front_depth_error_sums(pred, target))
        if stage == "val" and self.val_preview is None:
            self.val_preview = {
                "image": batch["image"][:4].detach().cpu(),
                "prob": torch.sigmoid(logits[:4]).detach().float().cpu(),
                "target": target[:4].detach().cpu(),
            }
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", batch_idx)

    def on_validation_epoch_start(self) -> None:
        self.val_preview = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval, "monitor": "val/iou"},
        }

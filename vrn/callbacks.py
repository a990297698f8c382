"""Callbacks: preview panels and 3D point clouds of predictions at each validation epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from vrn.conventions import DEFAULT_LAYOUT, VolumeLayout
from vrn.image_io import write_image_rgb
from vrn.volume.surface import front_depth, front_surface_points
from vrn.wandb_logging import image_media, log_media, point_cloud_media

__all__ = ["VolumePreviewLogger", "preview_panel", "surface_points"]


def _depth_to_rgb(depth: np.ndarray, depth_bins: int) -> np.ndarray:
    """(H, W) front depth bins (-1 empty) -> (H, W, 3) uint8 grey ramp, black where empty."""
    v = np.clip(depth / max(1, depth_bins - 1), 0, 1)
    g = (v * 255).astype(np.uint8)
    g[depth < 0] = 0
    return np.repeat(g[..., None], 3, axis=2)


def preview_panel(image: torch.Tensor, prob: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """One row per sample: input | predicted front depth | target front depth.

    image: (B, 3, H, W) float [0, 1]; prob: (B, D, H, W) float; target: (B, D, H, W) bool.
    Returns (B*H, 3*W, 3) uint8 RGB.
    """
    D = prob.shape[1]
    fp = front_depth(prob > 0.5).numpy()
    ft = front_depth(target.bool()).numpy()
    rows = []
    for i in range(image.shape[0]):
        img = (image[i].permute(1, 2, 0).numpy().clip(0, 1) * 255).astype(np.uint8)
        rows.append(np.concatenate([img, _depth_to_rgb(fp[i], D), _depth_to_rgb(ft[i], D)], axis=1))
    return np.concatenate(rows, axis=0)


def surface_points(
    prob: torch.Tensor, depth_factor: float = DEFAULT_LAYOUT.depth_factor, max_points: int = 20000
) -> np.ndarray:
    """Front-surface point cloud of one predicted volume.

    prob: (D, H, W) float; ``depth_factor``: depth bins per crop px (the volume layout's).
    Returns (N, 3) float32 crop px (x, y, z) with y flipped to point up for 3D viewers
    (W&B Object3D), at most ``max_points`` points (:mod:`vrn.volume.surface` for the z rule).
    """
    pts = front_surface_points(front_depth((prob > 0.5)[None])[0].numpy(), depth_factor).astype(np.float32)
    pts[:, 1] *= -1.0
    if len(pts) > max_points:
        pts = pts[np.linspace(0, len(pts) - 1, max_points).astype(int)]
    return pts


class VolumePreviewLogger(pl.Callback):
    """Each validation epoch: an image panel (input / predicted depth / target depth) and a
    ``wandb.Object3D`` point cloud of the first predicted surface when a W&B logger is
    active; otherwise the panel is written as ``previews/epoch_XXX.png`` in the run folder.

    The volume layout (depth bins per crop px) is the LightningModule's ``layout``
    (:class:`vrn.conventions.VolumeLayout`) when it has one, else
    :data:`vrn.conventions.DEFAULT_LAYOUT`.
    """

    def __init__(self, num_points: int = 20000) -> None:
        self.num_points = num_points

    @staticmethod
    def layout_of(pl_module: pl.LightningModule) -> VolumeLayout:
        """The module's volume layout, or the default one."""
        layout = getattr(pl_module, "layout", None)
        return layout if layout is not None else DEFAULT_LAYOUT

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        preview = getattr(pl_module, "val_preview", None)
        if preview is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        panel = preview_panel(preview["image"], preview["prob"], preview["target"])
        epoch = trainer.current_epoch
        wandb_loggers = [lg for lg in trainer.loggers if lg.__class__.__name__ == "WandbLogger"]
        if wandb_loggers:
            depth_factor = self.layout_of(pl_module).depth_factor
            pts = surface_points(preview["prob"][0], depth_factor, self.num_points)
            for lg in wandb_loggers:
                log_media(
                    {
                        "val/preview": image_media(panel, "input | predicted front depth | target front depth"),
                        "val/surface": point_cloud_media(pts),
                        "epoch": epoch,
                    },
                    run=lg.experiment,
                )
        else:
            out = Path(trainer.default_root_dir) / "previews" / f"epoch_{epoch:03d}.png"
            write_image_rgb(out, panel)

"""Callbacks: the latest state on disk (``last.ckpt``, also on SIGTERM / SIGINT), preview
panels and 3D point clouds of predictions at each validation epoch, and the per-run record of
validation metrics (best / final) that ``python -m vrn.runs compare`` reads."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from vrn.atomic_write import atomic_write
from vrn.conventions import DEFAULT_LAYOUT, VolumeLayout
from vrn.image_io import write_image_rgb
from vrn.volume.surface import front_depth, front_surface_points
from vrn.wandb_logging import CHECKPOINT_RUN_ID_KEY, image_media, log_media, point_cloud_media

log = logging.getLogger(__name__)

__all__ = [
    "LastCheckpoint",
    "RunSummary",
    "TrainingStopped",
    "VolumePreviewLogger",
    "preview_panel",
    "surface_points",
    "wandb_loggers",
]

#: exit status of a run stopped by a signal: 128 + the signal number (SIGINT 130, SIGTERM 143)
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}

#: signals that :class:`LastCheckpoint` defers only when the job already handles them: submitit's
#: checkpoint-and-requeue signal (SIGUSR2, sent by SLURM ``--signal=USR2@<s>`` before the time
#: limit, or by ``kill -USR2`` to a ``cluster=local`` job); not on Windows
HAND_OVER_SIGNALS: tuple[int, ...] = tuple(s for s in (getattr(signal, "SIGUSR2", None),) if s is not None)


class TrainingStopped(Exception):
    """Training stopped on a signal after saving ``ckpt_path`` (None: nothing could be saved)."""

    def __init__(self, signum: int, ckpt_path: str | None) -> None:
        self.signum = int(signum)
        self.ckpt_path = ckpt_path
        name = signal.Signals(self.signum).name
        where = f"checkpoint saved to {ckpt_path}" if ckpt_path else "no checkpoint saved"
        super().__init__(f"training stopped by {name}; {where}")

    @property
    def exit_code(self) -> int:
        return SIGNAL_EXIT.get(signal.Signals(self.signum), 128 + self.signum)


class LastCheckpoint(pl.Callback):
    """Keeps ``<dirpath>/<filename>.ckpt`` the latest training state, whatever the monitored
    metric did (the best checkpoints are a separate ``ModelCheckpoint``).

    It is written (atomically: a temporary file, then a rename) at the end of every training
    epoch, after every validation run inside an epoch (``trainer.val_check_interval``), every
    ``every_n_train_steps`` optimizer steps when > 0, and at the end of training.

    With ``handle_signals`` (default), SIGTERM (timeout, SLURM, Kubernetes) and SIGINT
    (Ctrl-C) during training finish the current batch, save the checkpoint of that step and
    stop with :class:`TrainingStopped` (``vrn.train`` prints the resume command and exits
    143 / 130). A second Ctrl-C interrupts at once, saving nothing more.

    SIGUSR2 (:data:`HAND_OVER_SIGNALS`) is taken over only when a Python handler for it is
    already installed, i.e. in a submitit job (``cluster=slurm`` / ``cluster=local``), whose
    handler requeues the job and exits at once. Then the signal is noted, the current batch
    finishes, ``last.ckpt`` of that step is written (complete: tmp + rename) and only then is
    the previous handler called: submitit requeues and exits (``sys.exit`` on rank 0), and the
    requeued job resumes from exactly that step. Where that handler returns (submitit on ranks
    other than 0), training stops with :class:`TrainingStopped` (exit 140). Without a previous
    handler SIGUSR2 is left alone.

    DDP: SLURM signals every task of the job step, so each rank's handler notes the signal,
    but not necessarily during the same batch. So with more than one process the ranks agree
    every ``signal_sync_every_n_steps`` optimizer steps and at epoch ends (one scalar
    all-reduce, the largest signal number noted on any rank: a host sync, hence not at every
    step) and all of them reach the save (which ends with a barrier) at the same step; a
    signal during validation is then acted on at the next agreement point. A single process
    acts at the first batch end.

    Args:
        dirpath, filename: where the checkpoint goes (``<dirpath>/<filename>.ckpt``).
        every_n_train_steps: also save every N optimizer steps (0: epoch ends only).
        handle_signals: take over SIGTERM / SIGINT (and SIGUSR2 in submitit jobs) as above.
        signal_sync_every_n_steps: under DDP, the ranks agree on a noted signal every N
            optimizer steps (N x a step's time is the longest wait before the save).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        filename: str = "last",
        every_n_train_steps: int = 0,
        handle_signals: bool = True,
        signal_sync_every_n_steps: int = 10,
    ) -> None:
        if int(every_n_train_steps or 0) < 0:
            raise ValueError(f"every_n_train_steps={every_n_train_steps} must be >= 0 (0: at epoch ends only)")
        if int(signal_sync_every_n_steps) < 1:
            raise ValueError(f"signal_sync_every_n_steps={signal_sync_every_n_steps} must be >= 1")
        self.signal_sync_every_n_steps = int(signal_sync_every_n_steps)
        self.dirpath = Path(dirpath)
        self.filename = str(filename)
        self.every_n_train_steps = int(every_n_train_steps or 0)
        self.handle_signals = bool(handle_signals)
        #: the signal received during training (None: none)
        self.signum: int | None = None
        #: the checkpoint written for that signal
        self.stop_path: str | None = None
        self._previous: dict[int, Any] = {}
        #: the HAND_OVER_SIGNALS handled now (their previous handler runs after the save)
        self._hand_over: set[int] = set()
        #: training is running and a signal can wait for the current batch's end
        self._deferring = False

    @property
    def path(self) -> Path:
        return self.dirpath / f"{self.filename}.ckpt"

    @property
    def state_key(self) -> str:
        return f"LastCheckpoint[{self.path.name}]"

    # ---- saving -----------------------------------------------------------------------
    def _can_save(self, trainer: pl.Trainer) -> bool:
        return not trainer.fast_dev_run and not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING

    def save(self, trainer: pl.Trainer) -> Path:
        """Write the checkpoint of the trainer's current state; returns its path."""
        path = self.path
        tmp = path.with_name(f".{path.name}.tmp")
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, path)
        trainer.strategy.barrier("LastCheckpoint.save")
        return path

    def _stop(self, trainer: pl.Trainer) -> None:
        """Save the current step; then hand a HAND_OVER_SIGNALS signal to the job's previous
        handler (submitit: requeue and ``sys.exit``), or stop with :class:`TrainingStopped`."""
        assert self.signum is not None
        signum = self.signum
        self.stop_path = str(self.save(trainer))
        previous = self._previous.get(signum) if signum in self._hand_over else None
        if callable(previous):
            name = signal.Signals(signum).name
            log.warning(
                f"{name}: {self.stop_path} saved at global step {trainer.global_step}; "
                f"handing over to the job's own {name} handler (submitit: requeue)"
            )
            self._deferring = False
            previous(signum, None)  # may exit (SystemExit): the checkpoint is complete by now
        raise TrainingStopped(signum, self.stop_path)

    def _pending(self, trainer: pl.Trainer) -> int | None:
        """The signal to stop for at this point, the same on every rank: under DDP the largest
        signal number any rank noted (a rank that noted none adopts it). Every rank must call
        this at the same point (an all-reduce when ``trainer.world_size`` > 1)."""
        if self.handle_signals and trainer.world_size > 1:
            noted = torch.tensor([self.signum or 0], dtype=torch.int32, device=trainer.strategy.root_device)
            agreed = int(trainer.strategy.reduce(noted, reduce_op="max").item())
            if agreed and self.signum is None:
                self.signum = agreed  # another rank's signal: stop at the same step
            return agreed or None
        return self.signum

    # ---- signals ----------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in self._hand_over and not self._deferring:
            # training is over (or cannot save here): what the job would have done without us
            self._previous[signum](signum, frame)
            return
        first = self.signum is None
        if self.signum not in self._hand_over:  # a pending requeue wins over a later stop signal
            self.signum = signum
        if signum == signal.SIGINT:
            # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if first:
            then = " (then the job's own handler)" if signum in self._hand_over else ""
            log.warning(f"{signal.Signals(signum).name} received: saving a checkpoint after the current batch{then}")
        previous = self._previous.get(signum)
        if signum == signal.SIGTERM and callable(previous):
            previous(signum, frame)  # Lightning's own handler (tells DDP workers)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signum, self.stop_path = None, None
        self._deferring = not trainer.fast_dev_run
        if not self.handle_signals:
            return
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._on_signal)
            for s in HAND_OVER_SIGNALS:
                previous = signal.getsignal(s)
                if callable(previous):  # submitit's checkpoint_and_try_requeue; else left alone
                    self._previous[s] = previous
                    self._hand_over.add(s)
                    signal.signal(s, self._on_signal)
        except ValueError:  # not the main thread
            return

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._can_save(trainer):
            return
        # every rank has the same global_step: under DDP they all reach the all-reduce together
        sync = trainer.world_size == 1 or trainer.global_step % self.signal_sync_every_n_steps == 0
        if sync and self._pending(trainer) is not None:
            self._stop(trainer)
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self.save(trainer)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # (under DDP the ranks may run different numbers of validation batches: no all-reduce
        # here, the next training batch end or epoch end acts on the signal)
        if self.signum is not None and trainer.world_size == 1 and self._can_save(trainer):
            self._stop(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a validation inside the epoch (val_check_interval); the epoch's end saves in on_train_epoch_end
        if self._can_save(trainer) and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._can_save(trainer):
            self.save(trainer)
            if self._pending(trainer) is not None:
                self._stop(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a requeue signal noted after the last batch: hand it over now (state saved first). The
        # condition depends on nothing rank-specific: under DDP every rank reaches the all-reduce.
        if self._can_save(trainer) and self._pending(trainer) in HAND_OVER_SIGNALS:
            self._stop(trainer)
        self._deferring = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning stops on SIGTERM itself at some points (SIGTERMException): save there too
        if isinstance(exception, SIGTERMException) and self.signum is not None and self.stop_path is None:
            if self._can_save(trainer):
                self.stop_path = str(self.save(trainer))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # (Lightning restores every handler in its own teardown; undo ours only if still in place)
        for s, h in self._previous.items():
            if signal.getsignal(s) == self._on_signal and h is not None:
                try:
                    signal.signal(s, h)
                except ValueError:  # not the main thread
                    pass
        self._previous, self._hand_over, self._deferring = {}, set(), False


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
        wandb_lgs = wandb_loggers(trainer)
        if wandb_lgs:
            depth_factor = self.layout_of(pl_module).depth_factor
            pts = surface_points(preview["prob"][0], depth_factor, self.num_points)
            for lg in wandb_lgs:
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


def wandb_loggers(trainer: pl.Trainer) -> list[Any]:
    """The trainer's W&B loggers (Lightning's ``WandbLogger`` and subclasses, by class name so
    that wandb need not be installed)."""
    return [lg for lg in trainer.loggers if any(c.__name__ == "WandbLogger" for c in type(lg).__mro__)]


def _batch_len(batch: Any) -> int:
    """Samples in a training batch: dim 0 of its first tensor (dicts, lists and tuples searched)."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.ndim else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        n = _batch_len(item)
        if n:
            return n
    return 0


class RunSummary(pl.Callback):
    """The record of a run that comparing runs needs, whatever logger is configured.

    After every validation (not the sanity check) rank 0 rewrites, in ``dirpath``:

    * ``metrics.jsonl``: one JSON object per validation so far, ``{"epoch", "step", "val/...": ...}``
      (every scalar ``val/`` metric of ``trainer.callback_metrics``);
    * ``summary.json``: ``{"metric", "mode", "best": {"value", "epoch", "step"}, "final": {...},
      "validations"}`` for the monitored metric (``final`` is the latest validation);

    Each ``metrics.jsonl`` row also has ``train/samples_per_sec``: training samples (all
    ranks) per wall-clock second since the previous validation ended (data loading
    included, validation excluded), and ``train/wall_s``: training wall time so far in this
    process (both absent for a segment with no training batch).

    and sets ``best/<metric with / as _>`` (``best/val_iou``), ``best/epoch`` and ``best/step``
    in the summary of each W&B run. The history and the best are part of the checkpoint, so a
    resumed run's files cover the whole training. Checkpoints also keep the W&B run id
    (:data:`vrn.wandb_logging.CHECKPOINT_RUN_ID_KEY`), which ``vrn.train`` uses to continue
    that run on resume.

    Args:
        dirpath: the run folder.
        monitor: the metric to rank by (``optimized_metric``; the best checkpoint's monitor).
        mode: ``max`` (IoU) or ``min`` (a loss).
    """

    METRICS_FILE = "metrics.jsonl"
    SUMMARY_FILE = "summary.json"

    def __init__(self, dirpath: str | os.PathLike, monitor: str = "val/iou", mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"RunSummary mode={mode!r} must be 'max' or 'min'")
        self.dirpath = Path(dirpath)
        self.monitor = str(monitor)
        self.mode = mode
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self._segment_start: float | None = None
        self._segment_samples = 0
        self._segment_rate: float | None = None
        self._train_wall_s = 0.0

    @property
    def summary_key(self) -> str:
        """W&B summary key of the best value: ``best/val_iou`` for ``val/iou``."""
        return "best/" + self.monitor.replace("/", "_")

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best["value"] if self.mode == "max" else value < self.best["value"]

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` holds (see the class)."""
        last = self.history[-1] if self.history else None
        final = None
        if last is not None and self.monitor in last:
            final = {"value": last[self.monitor], "epoch": last["epoch"], "step": last["step"]}
        return {
            "metric": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "final": final,
            "validations": len(self.history),
        }

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._segment_start is None:
            self._segment_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._segment_samples += _batch_len(batch) * int(trainer.world_size)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._segment_rate = None
        if trainer.sanity_checking or self._segment_start is None or not self._segment_samples:
            return
        seconds = time.perf_counter() - self._segment_start
        self._train_wall_s += seconds
        self._segment_rate = self._segment_samples / max(seconds, 1e-9)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        # the next training segment starts with its first batch (loader start-up included)
        self._segment_start, self._segment_samples = None, 0
        record: dict[str, Any] = {"epoch": int(trainer.current_epoch), "step": int(trainer.global_step)}
        if self._segment_rate is not None:
            record["train/samples_per_sec"] = round(self._segment_rate, 2)
            record["train/wall_s"] = round(self._train_wall_s, 2)
        for k, v in sorted(trainer.callback_metrics.items()):
            if k.startswith("val/") and (not torch.is_tensor(v) or v.numel() == 1):
                record[k] = None if math.isnan(float(v)) else float(v)  # NaN: no value (strict JSON null)
        self.history.append(record)
        value = record.get(self.monitor)
        if value is not None and self._better(value):
            self.best = {"value": value, "epoch": record["epoch"], "step": record["step"]}
        if not trainer.is_global_zero:
            return
        lines = "".join(json.dumps(r) + "\n" for r in self.history)
        atomic_write(self.dirpath / self.METRICS_FILE, lines.encode(), fsync=False)
        summary = json.dumps(self.summary(), indent=2) + "\n"
        atomic_write(self.dirpath / self.SUMMARY_FILE, summary.encode(), fsync=False)
        if self.best is not None:
            b = self.best
            best = {self.summary_key: b["value"], "best/epoch": b["epoch"], "best/step": b["step"]}
            for lg in wandb_loggers(trainer):
                lg.experiment.summary.update(best)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        run_id = next((lg.version for lg in wandb_loggers(trainer) if lg.version), None)
        if run_id:
            checkpoint[CHECKPOINT_RUN_ID_KEY] = str(run_id)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "best": self.best, "monitor": self.monitor}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("monitor", self.monitor) != self.monitor:
            return  # ranked by another metric before: start this record afresh
        self.history = list(state_dict.get("history", []))
        self.best = state_dict.get("best")

"""LightningDataModules over packed folders (real data) and the synthetic-face cache."""

from __future__ import annotations

import math
import os
import signal
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from lightning_fabric.utilities.seed import pl_worker_init_function
import torch
from torch.utils.data import DataLoader, Dataset

from vrn.conventions import VolumeLayout
from vrn.data.augment import AugmentConfig, augment_sample
from vrn.data.epoch_sampling import EpochClock, EpochShuffleSampler, ResumableLoader, trainer_progress
from vrn.data.packed import PackedReader
from vrn.data.sharding import eval_shard_sampler
from vrn.face_models.landmarks68 import N_LANDMARKS
from vrn.nme import bucket_names, yaw_bucket, yaw_from_rotation
from vrn.data.synthetic import SyntheticFaceConfig, cache_name, generate_packed

try:  # POSIX file locks: one process builds a shared synthetic cache, the others wait for it
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["VolumeDataset", "collate_volumes", "yaw_balanced_index", "PackedDataModule", "SyntheticDataModule"]


class VolumeDataset(Dataset):
    """Samples of a packed folder as tensors.

    Each item is a dict: ``image`` (3, H, W) float32 RGB [0, 1]; ``lo``/``hi`` (H, W) uint8
    first depth run per column; ``extra`` (K, 3) int64 further runs (pixel, lo, hi); ``landmarks`` (68, 2) float32 x, y
    crop px of the row's landmarks after the augmentation (NaN when the row has none: the
    guided variants need them, :mod:`vrn.models.guidance`); ``id`` str.
    Dense targets are decoded on the training device (see ``vrn.lit_module.batch_targets``).

    Augmentation of sample ``i`` draws from ``default_rng([seed, epoch, i])`` with the epoch of
    ``epoch_clock`` (set by :class:`vrn.data.epoch_sampling.EpochShuffleSampler`): the same in
    a run resumed at an epoch boundary as in an uninterrupted one, different every epoch.

    ``rows`` (optional, (N,) int): the reader rows that make up the dataset, repeats allowed
    (:func:`yaw_balanced_index`); item ``i`` is row ``rows[i]``, and a repeated row draws its
    own augmentation (the draw uses ``i``, not the row).
    """

    def __init__(self, reader: PackedReader, augment: AugmentConfig | None = None, seed: int = 0,
                 rows: np.ndarray | None = None) -> None:
        self.reader = reader
        self.augment = augment
        self.seed = seed
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        if self.rows is not None and len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= len(reader)):
            raise ValueError(f"rows must index the reader's {len(reader)} rows, got {self.rows.min()}..{self.rows.max()}")
        self.epoch_clock = EpochClock()

    def __len__(self) -> int:
        return len(self.reader) if self.rows is None else len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.reader[i if self.rows is None else int(self.rows[i])]
        image = s.image.astype(np.float32) / 255.0
        code = s.code
        marks = _row_landmarks_xy(s.row)
        if self.augment is not None and self.augment.enabled:
            rng = np.random.default_rng([self.seed, self.epoch_clock.get(), i])
            image, code, marks = augment_sample(image, code, self.augment, rng, marks)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "lo": torch.from_numpy(np.ascontiguousarray(code.lo)),
            "hi": torch.from_numpy(np.ascontiguousarray(code.hi)),
            "extra": torch.from_numpy(code.extra.astype(np.int64)).reshape(-1, 3),
            "landmarks": torch.from_numpy(np.ascontiguousarray(marks, np.float32)),
            "id": str(s.row.get("id", i)),
        }


def _row_landmarks_xy(row: dict[str, Any]) -> np.ndarray:
    """A manifest row's 68 landmarks (x, y crop px) as (68, 2) float32; NaN when it has none."""
    marks = row.get("landmarks")
    if marks is not None:
        a = np.asarray(marks, np.float32)
        if a.ndim == 2 and a.shape[0] == N_LANDMARKS and a.shape[1] >= 2:
            return np.ascontiguousarray(a[:, :2])
    return np.full((N_LANDMARKS, 2), np.nan, np.float32)


class WorkerInit:
    """``worker_init_fn`` of the training / evaluation loaders: the workers ignore SIGTERM and
    SIGINT, so a signal sent to every process of a run (``pkill -f``, Ctrl-C in a terminal,
    SLURM at a job's end) reaches only the main process, which saves ``last.ckpt`` and exits
    (:class:`vrn.callbacks.LastCheckpoint`); without this a worker dies first and the run ends
    with "DataLoader worker ... is killed by signal". The workers still stop when the loader
    shuts down or the main process dies (PyTorch's own checks), and SIGKILL works as ever.
    Then, under ``seed_everything(workers=True)``, Lightning's per-worker seeding (which
    Lightning adds only to loaders without a ``worker_init_fn``).

    Args:
        rank: the process's global rank (Lightning's seeding mixes it in).
    """

    def __init__(self, rank: int = 0) -> None:
        self.rank = int(rank)

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if os.environ.get("PL_SEED_WORKERS") == "1":
            pl_worker_init_function(worker_id, rank=self.rank)


def yaw_balanced_index(rows: list[dict[str, Any]], bucket_weights: Sequence[float] | None = None) -> np.ndarray:
    """Row indices with the rows of the rarer |yaw| buckets repeated, so that every bucket of
    the benchmark's split ([0, 30], (30, 60], (60, 90], :data:`vrn.nme.YAW_BUCKETS`) contributes
    about as many samples per epoch as the largest one (``data.yaw_balance=true``), or
    ``bucket_weights`` times as many (``data.yaw_bucket_weights``).

    Each bucket's rows are repeated ``max(1, round(w_bucket * n_largest / n_bucket))`` times
    (whole repeats, no random draws, so an epoch is still a fixed list that shuffles, shards and
    resumes like the plain one). The yaw is the row's ``yaw`` or that of its ``rotation`` (crop
    frame).

    Args:
        rows: manifest rows of one split.
        bucket_weights: one weight > 0 per bucket of :data:`vrn.nme.YAW_BUCKETS`, in that
            order; None weighs them equally. E.g. (1, 1, 1.5) draws the profiles half as often
            again as the other buckets.
    Returns:
        (M,) int64 row indices, each row 1 or more times, in row order.
    Raises:
        ValueError: a row has neither ``yaw`` nor ``rotation``; bad ``bucket_weights``.
    """
    names_in_order = bucket_names()
    if bucket_weights is None:
        bucket_weights = [1.0] * len(names_in_order)
    weights = [float(w) for w in bucket_weights]
    if len(weights) != len(names_in_order) or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(
            f"data.yaw_bucket_weights must be {len(names_in_order)} positive numbers, one per |yaw| bucket "
            f"{names_in_order}; got {list(bucket_weights)}"
        )
    weight_of = dict(zip(names_in_order, weights, strict=True))
    names = []
    for i, row in enumerate(rows):
        if row.get("yaw") is not None:
            yaw = float(row["yaw"])
        elif row.get("rotation") is not None:
            yaw = yaw_from_rotation(np.asarray(row["rotation"], np.float64))
        else:
            raise ValueError(
                f"data.yaw_balance=true needs each row's head pose, but row {i} (id {row.get('id', i)!r}) has "
                f"neither 'yaw' nor 'rotation'; repack with the data pipeline or set data.yaw_balance=false"
            )
        names.append(yaw_bucket(yaw))
    counts = Counter(names)
    largest = max(counts.values(), default=0)
    repeats = np.array([max(1, round(weight_of[b] * largest / counts[b])) for b in names], np.int64)
    return np.repeat(np.arange(len(rows), dtype=np.int64), repeats)


def collate_volumes(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images, run maps and (when every item has them) landmarks; keep the
    variable-length extra runs as a list."""
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "lo": torch.stack([it["lo"] for it in items]),
        "hi": torch.stack([it["hi"] for it in items]),
        "extra": [it["extra"] for it in items],
        "id": [it["id"] for it in items],
    }
    if all("landmarks" in it for it in items):
        batch["landmarks"] = torch.stack([it["landmarks"] for it in items])
    return batch


class PackedDataModule(pl.LightningDataModule):
    """Train/val/test loaders over a packed folder (``data=folder``, ``data=300w_lp``).

    Args:
        root: packed folder (``meta.json``, ``manifest.jsonl``, ``index.npy``, ``*.bin``).
        batch_size, num_workers, pin_memory: loader settings.
        augment: training augmentation (AugmentConfig fields as a dict), or None.
        splits: names of the train/val/test splits in the manifest.
        seed: augmentation seed.
        yaw_balance: repeat the training rows of the rarer |yaw| buckets so that every bucket
            contributes about equally per epoch (:func:`yaw_balanced_index`); val / test are
            never changed.
        yaw_bucket_weights: with ``yaw_balance``, each bucket's share relative to the others
            (one weight per :data:`vrn.nme.YAW_BUCKETS` bucket); None = equal.

    Attributes:
        layout: the crop / volume layout recorded in the folder's ``meta.json``
            (:attr:`vrn.data.packed.PackedReader.layout`); None until the folder exists.
            :class:`vrn.lit_module.VRNLitModule` checks it against the model's.
    """

    def __init__(self, root: str, batch_size: int = 8, num_workers: int = 0, pin_memory: bool = False,
                 augment: dict[str, Any] | None = None, train_split: str = "train", val_split: str = "val",
                 test_split: str = "test", seed: int = 0, yaw_balance: bool = False,
                 yaw_bucket_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.root = root
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.augment = AugmentConfig(**augment) if augment else None
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.seed = seed
        self.yaw_balance = bool(yaw_balance)
        self.yaw_bucket_weights = None if yaw_bucket_weights is None else [float(w) for w in yaw_bucket_weights]
        if self.yaw_bucket_weights is not None and not self.yaw_balance:
            raise ValueError("data.yaw_bucket_weights only applies with data.yaw_balance=true; set both or neither")
        self._sets: dict[str, VolumeDataset] = {}

    def _check_root(self) -> Path:
        root = Path(os.path.expanduser(str(self.root)))
        if not (root / "meta.json").is_file():
            raise FileNotFoundError(
                f"data.root={root} is not a packed dataset (no meta.json). Build one with "
                f"`python -m data_pipeline.run input_dir=... output_dir=...`, or use data=synthetic."
            )
        return root

    def setup(self, stage: str | None = None) -> None:
        root = self._check_root()
        for key, split in self.splits.items():
            if key not in self._sets:
                reader = PackedReader(root, split=split)
                aug = self.augment if key == "train" else None
                rows = (
                    yaw_balanced_index(reader.rows, self.yaw_bucket_weights)
                    if key == "train" and self.yaw_balance
                    else None
                )
                self._sets[key] = VolumeDataset(reader, aug, seed=self.seed, rows=rows)
        if len(self._sets["train"]) == 0:
            raise ValueError(f"{root} has no samples in split '{self.splits['train']}'")

    @property
    def layout(self) -> VolumeLayout | None:
        if self._sets:
            return next(iter(self._sets.values())).reader.layout
        root = Path(os.path.expanduser(str(self.root)))
        return PackedReader(root).layout if (root / "meta.json").is_file() else None

    def _loader(self, key: str, shuffle: bool) -> DataLoader:
        ds = self._sets[key]
        # val / test under DDP: each rank its own block, no padded duplicates (vrn.data.sharding);
        # training: shuffled by (seed, epoch), sharded over DDP ranks (vrn.data.epoch_sampling)
        if key == "train":
            trainer = self.trainer
            world, rank = (int(trainer.world_size), int(trainer.global_rank)) if trainer is not None else (1, 0)
            epoch_fn = (lambda: int(trainer.current_epoch)) if trainer is not None else None
            sampler = EpochShuffleSampler(ds, int(self.seed or 0), world, rank, epoch_fn) if shuffle else None
        else:
            sampler = eval_shard_sampler(ds, self.trainer, f"split '{self.splits[key]}'")
        # the training loader's place in the epoch goes into checkpoints (exact mid-epoch resume)
        loader_cls, extra = DataLoader, {}
        if isinstance(sampler, EpochShuffleSampler) and self.trainer is not None:
            loader_cls, extra = ResumableLoader, {"progress_fn": lambda: trainer_progress(self.trainer)}
        return loader_cls(ds, batch_size=self.batch_size, shuffle=shuffle and sampler is None, sampler=sampler, **extra,
                          num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=collate_volumes,
                          persistent_workers=self.num_workers > 0, drop_last=False,
                          worker_init_fn=WorkerInit(self.trainer.global_rank if self.trainer is not None else 0))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


class SyntheticDataModule(PackedDataModule):
    """Synthetic Surrey-Face-Model faces, generated once into a packed cache (``data=synthetic``).

    The cache folder name encodes the generation settings, so changing any of them builds a
    new cache; the same settings always give the same bytes (deterministic by seed).

    Args:
        cache_dir: where generated datasets live.
        num_train, num_val, num_test: sample counts per split.
        generator: keyword arguments of :class:`vrn.data.synthetic.SyntheticFaceConfig`.
        gen_seed: seed of the generator.
        num_gen_workers: processes used to generate.
        other args: see :class:`PackedDataModule`.
    """

    def __init__(self, cache_dir: str, num_train: int = 512, num_val: int = 64, num_test: int = 64,
                 generator: dict[str, Any] | None = None, gen_seed: int = 0, num_gen_workers: int = 0,
                 **kw: Any) -> None:
        self.gen_cfg = SyntheticFaceConfig(**(generator or {}))
        self.counts = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}
        self.gen_seed = int(gen_seed)
        self.num_gen_workers = int(num_gen_workers)
        root = Path(os.path.expanduser(cache_dir)) / cache_name(self.gen_cfg, self.counts, self.gen_seed)
        super().__init__(root=str(root), **kw)

    def prepare_data(self) -> None:
        root = Path(self.root)
        if (root / "meta.json").is_file():
            return
        # jobs of a parallel sweep (cluster=local / SLURM arrays) and the nodes of a multi-node run
        # share the cache: the first one generates it under an exclusive lock, the others wait
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.with_name(root.name + ".lock"), "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not (root / "meta.json").is_file():
                generate_packed(root, self.gen_cfg, self.counts, seed=self.gen_seed, workers=self.num_gen_workers)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # idempotent; covers direct use without a Trainer
        super().setup(stage)

"""The packed dataset format: what the data pipeline's ``pack`` stage and the synthetic
generator write, and what :class:`PackedReader` reads.

A packed folder holds::

    meta.json        format version, crop size, depth bins/factor, image codec, split counts
    manifest.jsonl   one JSON row per sample: id, split, subject, provenance, ...
    index.npy        (N, 4) int64: image offset, image bytes, target offset, target bytes
    images.bin       concatenated encoded crops (PNG or JPEG bytes, RGB content)
    targets.bin      concatenated :func:`vrn.volume.codec.to_bytes` blobs

``images.bin`` and ``targets.bin`` are read through ``np.memmap`` so many DataLoader
workers share the page cache. A folder is written under ``<root>.partial`` and renamed
into place on success, so a reader never sees half a dataset.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from vrn.conventions import DEFAULT_LAYOUT, VolumeLayout
from vrn.image_io import check_rgb_image, decode_image_rgb, encode_image_rgb
from vrn.volume.codec import VolumeCode, from_bytes, to_bytes

__all__ = ["PackedWriter", "PackedReader", "FORMAT_VERSION", "PackedFormatError"]

FORMAT_VERSION = 1


class PackedFormatError(ValueError):
    """A folder that is not a readable packed dataset."""


class PackedWriter:
    """Write samples into a packed folder atomically.

    Usage::

        with PackedWriter(root, image_codec=".jpg") as w:
            w.add(image_rgb, code, {"id": ..., "split": "train", "subject": ...})
    """

    def __init__(self, root: str | os.PathLike, image_codec: str = ".png", jpeg_quality: int = 95,
                 extra_meta: dict[str, Any] | None = None, overwrite: bool = False,
                 layout: VolumeLayout = DEFAULT_LAYOUT) -> None:
        self.root = Path(root)
        if self.root.exists() and not overwrite:
            raise FileExistsError(f"Packed dataset already exists at {self.root}; pass overwrite=True to replace it")
        self.tmp = self.root.with_name(self.root.name + ".partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.image_codec = image_codec
        self.jpeg_quality = jpeg_quality
        self.extra_meta = dict(extra_meta or {})
        self.layout = layout
        self._img = open(self.tmp / "images.bin", "wb")
        self._tgt = open(self.tmp / "targets.bin", "wb")
        self._man = open(self.tmp / "manifest.jsonl", "w")
        self._index: list[tuple[int, int, int, int]] = []
        self._splits: dict[str, int] = {}
        self._done = False

    def add(self, image_rgb: np.ndarray, code: VolumeCode, row: dict[str, Any]) -> None:
        """Append one sample. image_rgb: (H, W, 3) uint8 RGB crop; row: manifest fields (id, split...)."""
        check_rgb_image(image_rgb)
        if image_rgb.shape[:2] != (self.layout.crop_size,) * 2 or code.shape != (self.layout.depth_bins,) + (self.layout.crop_size,) * 2:
            raise ValueError(f"sample does not match the dataset layout {self.layout}: image {image_rgb.shape}, "
                             f"volume {code.shape}")
        ib = encode_image_rgb(image_rgb, self.image_codec, self.jpeg_quality)
        tb = to_bytes(code)
        io_, to_ = self._img.tell(), self._tgt.tell()
        self._img.write(ib)
        self._tgt.write(tb)
        self._index.append((io_, len(ib), to_, len(tb)))
        split = str(row.get("split", "train"))
        self._splits[split] = self._splits.get(split, 0) + 1
        self._man.write(json.dumps({**row, "split": split, "index": len(self._index) - 1}) + "\n")

    def close(self) -> Path:
        """Finish: write index and meta, then move the folder into place."""
        if self._done:
            return self.root
        for f in (self._img, self._tgt, self._man):
            f.close()
        np.save(self.tmp / "index.npy", np.asarray(self._index, dtype=np.int64).reshape(-1, 4))
        meta = {
            "format": "vrn-packed", "version": FORMAT_VERSION, "layout": self.layout.to_dict(),
            "image_codec": self.image_codec, "num_samples": len(self._index), "splits": self._splits,
            **self.extra_meta,
        }
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if self.root.exists():
            shutil.rmtree(self.root)
        os.replace(self.tmp, self.root)
        self._done = True
        return self.root

    def abort(self) -> None:
        for f in (self._img, self._tgt, self._man):
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def __enter__(self) -> "PackedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class PackedSample:
    image: np.ndarray  # (H, W, 3) uint8 RGB, crop px
    code: VolumeCode
    row: dict[str, Any]


class PackedReader:
    """Random access to a packed folder (lazy memmaps: safe to pickle into DataLoader workers)."""

    def __init__(self, root: str | os.PathLike, split: str | Iterable[str] | None = None) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise PackedFormatError(
                f"{self.root} is not a packed vrn dataset (no meta.json). Build one with "
                f"`python -m data_pipeline.run` or `python -m vrn.data.synthetic`."
            )
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("version") != FORMAT_VERSION:
            raise PackedFormatError(f"{self.root}: packed format version {self.meta.get('version')} "
                                    f"is not {FORMAT_VERSION}; rebuild the dataset")
        # datasets written before layouts were recorded kept the three volume numbers at the top level
        self.layout = VolumeLayout.from_dict(self.meta.get("layout", self.meta))
        rows = [json.loads(line) for line in (self.root / "manifest.jsonl").read_text().splitlines() if line]
        if split is not None:
            wanted = {split} if isinstance(split, str) else set(split)
            rows = [r for r in rows if r["split"] in wanted]
        self.rows = rows
        self.index = np.load(self.root / "index.npy")
        self._images: np.memmap | None = None
        self._targets: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _maps(self) -> tuple[np.memmap, np.memmap]:
        if self._images is None:
            self._images = np.memmap(self.root / "images.bin", dtype=np.uint8, mode="r")
            self._targets = np.memmap(self.root / "targets.bin", dtype=np.uint8, mode="r")
        return self._images, self._targets  # type: ignore[return-value]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = state["_targets"] = None
        return state

    def __getitem__(self, i: int) -> PackedSample:
        row = self.rows[i]
        io_, ib, to_, tb = (int(v) for v in self.index[row["index"]])
        images, targets = self._maps()
        image = decode_image_rgb(np.asarray(images[io_:io_ + ib]))
        code = from_bytes(bytes(targets[to_:to_ + tb]))
        return PackedSample(image, code, row)

    def bytes_per_sample(self) -> float:
        return float(self.index[:, 1].sum() + self.index[:, 3].sum()) / max(1, len(self.index))

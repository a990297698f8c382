"""The packed dataset format: what the data pipeline's ``pack`` stage and the synthetic
generator write, and what :class:`PackedReader` reads.

A packed folder holds::

    meta.json        format version, crop size, depth bins/factor, image codec, split counts
    manifest.jsonl   one JSON row per sample: id, split, subject, provenance, ...
    index.npy        (N, 6) int64: image offset, image bytes, target offset, target bytes,
                     CRC-32 of the image bytes, CRC-32 of the target bytes
                     (format version 1: (N, 4), no checksums)
    images.bin       concatenated encoded crops (PNG or JPEG bytes, RGB content)
    targets.bin      concatenated :func:`vrn.volume.codec.to_bytes` blobs

``images.bin`` and ``targets.bin`` are read through ``np.memmap`` so many DataLoader
workers share the page cache. A folder is written under ``<root>.partial`` and renamed
into place on success, so a reader never sees half a dataset; a failed write removes the
``.partial`` folder and re-raises the original error.

Integrity. :class:`PackedReader` checks at construction that ``meta.json``,
``manifest.jsonl`` and ``index.npy`` parse and that every index entry lies inside
``images.bin`` / ``targets.bin`` (a truncated file stops there, naming it); every sample
read is checked against its CRC-32s (version 2) and, for JPEG / PNG, its end marker
(both versions), so a damaged sample raises :class:`PackedSampleError` naming its id
instead of training on a broken crop. Version 1 folders stay readable (one warning per
folder per process: no checksums).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vrn.conventions import DEFAULT_LAYOUT, VolumeLayout
from vrn.image_io import ImageReadError, check_encoded_complete, check_rgb_image, decode_image_rgb, encode_image_rgb
from vrn.volume.codec import VolumeCode, from_bytes, to_bytes

__all__ = [
    "PackedWriter",
    "write_subset",
    "merge_packed",
    "resplit_packed",
    "PackedReader",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "PackedFormatError",
    "PackedSampleError",
]

log = logging.getLogger(__name__)

#: the version new folders are written with (2: per-sample CRC-32s in ``index.npy``)
FORMAT_VERSION = 2
#: versions :class:`PackedReader` reads (1: no checksums)
READABLE_VERSIONS = (1, 2)
#: index columns per version
_INDEX_COLS = {1: 4, 2: 6}
#: folders whose "no checksums" warning was given in this process
_WARNED_V1: set[str] = set()

_REBUILD = "rebuild it (python -m data_pipeline.run ... or python -m vrn.data.synthetic)"


class PackedFormatError(ValueError):
    """A folder that is not a readable packed dataset (the message names the file)."""


class PackedSampleError(ValueError):
    """One sample of a packed dataset whose bytes are damaged (the message names its id)."""


def _crc32(data: bytes | np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B")) & 0xFFFFFFFF


class PackedWriter:
    """Write samples into a packed folder atomically.

    Usage::

        with PackedWriter(root, image_codec=".jpg") as w:
            w.add(image_rgb, code, {"id": ..., "split": "train", "subject": ...})

    Any error (in ``add``, ``close`` or the ``with`` body) removes ``<root>.partial`` and
    propagates unchanged.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_codec: str = ".png",
        jpeg_quality: int = 95,
        extra_meta: dict[str, Any] | None = None,
        overwrite: bool = False,
        layout: VolumeLayout = DEFAULT_LAYOUT,
    ) -> None:
        self.root = Path(root)
        if self.root.exists() and not overwrite:
            raise FileExistsError(f"Packed dataset already exists at {self.root}; pass overwrite=True to replace it")
        self.tmp = self.root.with_name(self.root.name + ".partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.image_codec = image_codec
        self.jpeg_quality = jpeg_quality
        self.extra_meta = dict(extra_meta or {})
        self.layout = layout
        self._files: list[Any] = []
        self._index: list[tuple[int, int, int, int, int, int]] = []
        self._splits: dict[str, int] = {}
        self._done = False
        try:
            self.tmp.mkdir(parents=True)
            self._img = self._open("images.bin", "wb")
            self._tgt = self._open("targets.bin", "wb")
            self._man = self._open("manifest.jsonl", "w")
        except BaseException:
            self.abort()
            raise

    def _open(self, name: str, mode: str) -> Any:
        f = open(self.tmp / name, mode)
        self._files.append(f)
        return f

    def add(self, image_rgb: np.ndarray, code: VolumeCode, row: dict[str, Any]) -> None:
        """Append one sample. image_rgb: (H, W, 3) uint8 RGB crop; row: manifest fields (id, split...)."""
        check_rgb_image(image_rgb)
        if (
            image_rgb.shape[:2] != (self.layout.crop_size,) * 2
            or code.shape != (self.layout.depth_bins,) + (self.layout.crop_size,) * 2
        ):
            raise ValueError(
                f"sample does not match the dataset layout {self.layout}: image {image_rgb.shape}, volume {code.shape}"
            )
        self.add_encoded(encode_image_rgb(image_rgb, self.image_codec, self.jpeg_quality), to_bytes(code), row)

    def add_encoded(self, ib: bytes | np.ndarray, tb: bytes, row: dict[str, Any]) -> None:
        """Append one sample already encoded: ``ib`` the crop in this writer's ``image_codec``,
        ``tb`` a :func:`vrn.volume.codec.to_bytes` blob (copied as they are, e.g. from
        :meth:`PackedReader.encoded`); row: manifest fields."""
        ib = bytes(ib)
        io_, to_ = self._img.tell(), self._tgt.tell()
        self._img.write(ib)
        self._tgt.write(tb)
        self._index.append((io_, len(ib), to_, len(tb), _crc32(ib), _crc32(tb)))
        split = str(row.get("split", "train"))
        self._splits[split] = self._splits.get(split, 0) + 1
        self._man.write(json.dumps({**row, "split": split, "index": len(self._index) - 1}) + "\n")

    def close(self) -> Path:
        """Finish: write index and meta, then move the folder into place (on any error:
        remove ``<root>.partial`` and re-raise)."""
        if self._done:
            return self.root
        try:
            for f in self._files:
                f.close()
            np.save(self.tmp / "index.npy", np.asarray(self._index, dtype=np.int64).reshape(-1, 6))
            meta = {
                "format": "vrn-packed",
                "version": FORMAT_VERSION,
                "layout": self.layout.to_dict(),
                "image_codec": self.image_codec,
                "num_samples": len(self._index),
                "splits": self._splits,
                **self.extra_meta,
            }
            (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            if self.root.exists():
                shutil.rmtree(self.root)
            os.replace(self.tmp, self.root)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.root

    def abort(self) -> None:
        """Drop the partial folder. Never raises (a full disk makes closing a file fail too):
        the error being handled stays the one reported."""
        for f in self._files:
            with contextlib.suppress(Exception):
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def __enter__(self) -> PackedWriter:
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


def _read_meta(root: Path) -> dict[str, Any]:
    p = root / "meta.json"
    if not p.is_file():
        raise PackedFormatError(
            f"{root} is not a packed vrn dataset (no meta.json). Build one with "
            f"`python -m data_pipeline.run` or `python -m vrn.data.synthetic`."
        )
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackedFormatError(f"{p} is damaged (not valid JSON: {e}); {_REBUILD}.") from e
    if not isinstance(meta, dict):
        raise PackedFormatError(f"{p} is damaged (not a JSON object); {_REBUILD}.")
    if meta.get("version") not in READABLE_VERSIONS:
        raise PackedFormatError(
            f"{root}: packed format version {meta.get('version')} is not one of {READABLE_VERSIONS}; {_REBUILD}."
        )
    return meta


def _read_manifest(root: Path) -> list[dict[str, Any]]:
    p = root / "manifest.jsonl"
    if not p.is_file():
        raise PackedFormatError(f"{p} is missing; {_REBUILD}.")
    rows = []
    try:
        lines = p.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise PackedFormatError(f"{p} is damaged (not UTF-8 text: {e}); {_REBUILD}.") from e
    for k, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PackedFormatError(f"{p} line {k} is damaged (not valid JSON: {e}); {_REBUILD}.") from e
        if not isinstance(row, dict) or not isinstance(row.get("index"), int) or "split" not in row:
            raise PackedFormatError(f"{p} line {k} is damaged (no 'index' / 'split'); {_REBUILD}.")
        rows.append(row)
    return rows


def _read_index(root: Path, version: int, n_rows: int) -> np.ndarray:
    p = root / "index.npy"
    try:
        index = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise PackedFormatError(f"{p} is missing or damaged ({type(e).__name__}: {e}); {_REBUILD}.") from e
    cols = _INDEX_COLS[version]
    if index.ndim != 2 or index.shape[1] != cols or not np.issubdtype(index.dtype, np.integer):
        raise PackedFormatError(
            f"{p} is damaged: shape {index.shape} {index.dtype}, expected (N, {cols}) integers for format "
            f"version {version}; {_REBUILD}."
        )
    if len(index) < n_rows:
        raise PackedFormatError(
            f"{p} is damaged: {len(index)} entries but manifest.jsonl has {n_rows} rows; {_REBUILD}."
        )
    if (index[:, :4] < 0).any():
        raise PackedFormatError(f"{p} is damaged: negative offsets or sizes; {_REBUILD}.")
    return index


def _check_extent(root: Path, name: str, offsets: np.ndarray, sizes: np.ndarray) -> None:
    """Every (offset, size) of the index lies inside ``root/name``."""
    p = root / name
    if not p.is_file():
        raise PackedFormatError(f"{p} is missing; {_REBUILD}.")
    need = int((offsets + sizes).max()) if len(offsets) else 0
    have = p.stat().st_size
    if need > have:
        raise PackedFormatError(
            f"{p} is truncated: {have} bytes, but index.npy needs {need}; restore the file or {_REBUILD}."
        )


class PackedReader:
    """Random access to a packed folder (lazy memmaps: safe to pickle into DataLoader workers).

    Raises:
        PackedFormatError: at construction, a missing / unparsable ``meta.json``,
            ``manifest.jsonl`` or ``index.npy``, or a truncated ``images.bin`` / ``targets.bin``
            (the message names the file).
        PackedSampleError: on ``reader[i]``, a sample whose bytes fail their checks (id named).
    """

    def __init__(self, root: str | os.PathLike, split: str | Iterable[str] | None = None) -> None:
        self.root = Path(root)
        self.meta = _read_meta(self.root)
        self.version = int(self.meta["version"])
        # datasets written before layouts were recorded kept the three volume numbers at the top level
        self.layout = VolumeLayout.from_dict(self.meta.get("layout", self.meta))
        rows = _read_manifest(self.root)
        self.index = _read_index(self.root, self.version, len(rows))
        bad = [r["index"] for r in rows if not 0 <= r["index"] < len(self.index)]
        if bad:
            raise PackedFormatError(
                f"{self.root / 'manifest.jsonl'} is damaged: index {bad[0]} is outside index.npy "
                f"({len(self.index)} entries); {_REBUILD}."
            )
        _check_extent(self.root, "images.bin", self.index[:, 0], self.index[:, 1])
        _check_extent(self.root, "targets.bin", self.index[:, 2], self.index[:, 3])
        if self.version < 2 and str(self.root.absolute()) not in _WARNED_V1:
            _WARNED_V1.add(str(self.root.absolute()))
            log.warning(
                f"{self.root}: packed format version {self.version} has no per-sample checksums; damaged samples "
                f"are caught only when they fail to decode. Rebuild it to get version {FORMAT_VERSION}."
            )
        if split is not None:
            wanted = {split} if isinstance(split, str) else set(split)
            rows = [r for r in rows if r["split"] in wanted]
        self.rows = rows
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("version", int(state["meta"]["version"]))  # readers pickled before versions were kept
        self.__dict__.update(state)

    def _damaged(self, row: dict[str, Any], what: str) -> PackedSampleError:
        return PackedSampleError(
            f"{self.root}: sample '{row.get('id')}' (index {row['index']}) is damaged: {what}. "
            f"Restore the dataset from a good copy or {_REBUILD}."
        )

    def encoded(self, i: int) -> tuple[np.ndarray, bytes, dict[str, Any]]:
        """Sample ``i`` as stored: (encoded image bytes (uint8 array), target codec bytes, manifest row),
        checked against its CRC-32s (version 2).

        Raises:
            PackedSampleError: the bytes fail their checksums.
        """
        row = self.rows[i]
        entry = self.index[row["index"]]
        io_, ib, to_, tb = (int(v) for v in entry[:4])
        images, targets = self._maps()
        img_bytes = np.asarray(images[io_ : io_ + ib])
        tgt_bytes = bytes(targets[to_ : to_ + tb])
        if self.version >= 2:
            if _crc32(img_bytes) != int(entry[4]):
                raise self._damaged(row, "its image bytes in images.bin fail their CRC-32 check")
            if _crc32(tgt_bytes) != int(entry[5]):
                raise self._damaged(row, "its target bytes in targets.bin fail their CRC-32 check")
        return img_bytes, tgt_bytes, row

    def __getitem__(self, i: int) -> PackedSample:
        img_bytes, tgt_bytes, row = self.encoded(i)
        try:
            check_encoded_complete(img_bytes)
            image = decode_image_rgb(img_bytes)
        except ImageReadError as e:
            raise self._damaged(row, f"its image in images.bin does not decode ({e})") from e
        try:
            code = from_bytes(tgt_bytes)
        except Exception as e:  # noqa: BLE001 - any codec error means damaged bytes: re-raised with the id
            raise self._damaged(row, f"its target in targets.bin does not decode ({type(e).__name__}: {e})") from e
        return PackedSample(image, code, row)

    def bytes_per_sample(self) -> float:
        return float(self.index[:, 1].sum() + self.index[:, 3].sum()) / max(1, len(self.index))


_FORMAT_KEYS = {"format", "version", "layout", "image_codec", "num_samples", "splits"}


def _copy_samples(
    sources: list[tuple[PackedReader, list[int]]],
    dst: str | os.PathLike,
    extra_meta: dict[str, Any],
    overwrite: bool,
    manifest_fields: Iterable[str] | None,
    jpeg_quality: int | None,
) -> Path:
    """Write the chosen samples of one or more readers (same layout and image codec) into ``dst``."""
    first = sources[0][0]
    codec = first.meta.get("image_codec", ".png")
    for r, _ in sources[1:]:
        if r.layout != first.layout or r.meta.get("image_codec", ".png") != codec:
            raise ValueError(
                f"cannot merge {r.root} (layout {r.layout}, codec {r.meta.get('image_codec')}) with "
                f"{first.root} (layout {first.layout}, codec {codec}): layouts and image codecs must match"
            )
    if jpeg_quality is not None and codec != ".jpg":
        raise ValueError(f"jpeg_quality applies to JPEG folders only; {first.root} stores {codec!r} images")
    fields = None if manifest_fields is None else {"id", "split", *manifest_fields}
    if jpeg_quality is not None:
        extra_meta = {**extra_meta, "reencoded_jpeg_quality": int(jpeg_quality)}
    with PackedWriter(
        dst,
        image_codec=codec,
        jpeg_quality=int(jpeg_quality or 95),
        extra_meta=extra_meta,
        overwrite=overwrite,
        layout=first.layout,
    ) as w:
        for reader, keep in sources:
            for i in keep:
                ib, tb, row = reader.encoded(i)
                if jpeg_quality is not None:
                    ib = encode_image_rgb(decode_image_rgb(ib.tobytes()), codec, int(jpeg_quality))
                row = {k: v for k, v in row.items() if k != "index" and (fields is None or k in fields)}
                w.add_encoded(ib, tb, row)
    return Path(dst)


def write_subset(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    counts: dict[str, int],
    seed: int = 0,
    overwrite: bool = False,
    part: tuple[int, int] | None = None,
    manifest_fields: Iterable[str] | None = None,
    jpeg_quality: int | None = None,
) -> Path:
    """Copy a random subset of a packed folder into a new one.

    For moving a training set somewhere with a size limit (a rented GPU machine, a laptop):
    ``counts`` gives the samples to keep per split (more than a split has keeps all of it);
    the layout, image codec and pipeline provenance are kept, ``meta.json["subset_of"]``
    records the source, seed and part. The output is written in the current format version.

    Args:
        part: ``(k, n)``: keep only the k-th (0-based) of n disjoint, near-equal parts of the
            chosen samples of every split (parts of one seed never overlap: send a large set
            in pieces, then :func:`merge_packed` them).
        manifest_fields: keep only these manifest fields (plus ``id`` and ``split``, all
            training reads); None keeps every field (provenance, landmarks, ...).
        jpeg_quality: re-encode JPEG crops at this quality (smaller, lossy); None copies the
            bytes unchanged.
    Raises:
        PackedFormatError: ``src`` is not a readable packed folder.
        ValueError: a split in ``counts`` is not in ``src``; a bad ``part``.
    """
    reader = PackedReader(src)
    if part is not None and not (int(part[1]) >= 1 and 0 <= int(part[0]) < int(part[1])):
        raise ValueError(f"part must be (k, n) with 0 <= k < n, got {part}")
    rng = np.random.default_rng(seed)
    by_split: dict[str, list[int]] = {}
    for i, row in enumerate(reader.rows):
        by_split.setdefault(str(row["split"]), []).append(i)
    unknown = sorted(set(counts) - set(by_split))
    if unknown:
        raise ValueError(f"{src} has no split {unknown[0]!r}; its splits: {sorted(by_split)}")
    keep: list[int] = []
    for split, n in counts.items():
        idx = np.asarray(by_split[split])
        chosen = rng.choice(idx, size=min(int(n), len(idx)), replace=False)
        if part is not None:
            chosen = np.array_split(chosen, int(part[1]))[int(part[0])]
        keep.extend(sorted(chosen.tolist()))
    extra = {k: v for k, v in reader.meta.items() if k not in _FORMAT_KEYS}
    extra["subset_of"] = {"root": str(Path(src).absolute()), "seed": seed, "counts": dict(counts)}
    if part is not None:
        extra["subset_of"]["part"] = [int(part[0]), int(part[1])]
    return _copy_samples([(reader, keep)], dst, extra, overwrite, manifest_fields, jpeg_quality)


def merge_packed(srcs: Iterable[str | os.PathLike], dst: str | os.PathLike, overwrite: bool = False) -> Path:
    """Concatenate packed folders (same layout and image codec) into one, bytes unchanged.

    The inverse of sending a set in parts (:func:`write_subset` with ``part``); also joins
    datasets from several pipeline runs. Sample ids must be unique across the inputs.
    ``meta.json["merged_from"]`` lists the inputs; the first input's provenance is kept.

    Raises:
        PackedFormatError: an input is not a readable packed folder.
        ValueError: no inputs, layouts or codecs differ, or an id occurs twice.
    """
    readers = [PackedReader(s) for s in srcs]
    if not readers:
        raise ValueError("merge_packed: give at least one packed folder to merge")
    seen: set[str] = set()
    for r in readers:
        ids = {str(row["id"]) for row in r.rows}
        dup = seen & ids
        if dup:
            raise ValueError(f"merge_packed: sample id {sorted(dup)[0]!r} of {r.root} is already in an earlier input")
        seen |= ids
    extra = {k: v for k, v in readers[0].meta.items() if k not in _FORMAT_KEYS and k != "merged_from"}
    extra["merged_from"] = [str(Path(r.root).absolute()) for r in readers]
    return _copy_samples([(r, list(range(len(r)))) for r in readers], dst, extra, overwrite, None, None)


def resplit_packed(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    split_of_id: Mapping[str, str],
    default: str | None = "train",
    overwrite: bool = False,
) -> Path:
    """Copy a packed folder with each sample's split replaced, bytes unchanged.

    For continuing a model on the split it was trained with after the data was rebuilt under
    another split rule (e.g. AFLW packed before pack version 2): ``split_of_id`` gives the
    split of the listed sample ids, every other sample gets ``default``.
    ``meta.json["resplit_of"]`` records the source and the counts moved.

    Args:
        split_of_id: sample id -> split name.
        default: split of the samples not in ``split_of_id``; None: every sample must be listed.
    Raises:
        PackedFormatError: ``src`` is not a readable packed folder.
        ValueError: ``default`` is None and a sample is not listed.
    """
    reader = PackedReader(src)
    ids = [str(row["id"]) for row in reader.rows]
    if default is None:
        missing = [i for i in ids if i not in split_of_id]
        if missing:
            raise ValueError(f"resplit_packed: {len(missing)} samples of {src} have no split (first: {missing[0]!r})")
    new_split = [str(split_of_id.get(i, default)) for i in ids]
    moved = sum(str(row["split"]) != s for row, s in zip(reader.rows, new_split, strict=True))
    extra = {k: v for k, v in reader.meta.items() if k not in _FORMAT_KEYS and k != "resplit_of"}
    extra["resplit_of"] = {
        "root": str(Path(src).absolute()),
        "listed": int(sum(i in split_of_id for i in ids)),
        "unlisted_to": default,
        "moved": int(moved),
    }
    codec = reader.meta.get("image_codec", ".png")
    with PackedWriter(dst, image_codec=codec, extra_meta=extra, overwrite=overwrite, layout=reader.layout) as w:
        for i, split in enumerate(new_split):
            ib, tb, row = reader.encoded(i)
            w.add_encoded(ib, tb, {**{k: v for k, v in row.items() if k != "index"}, "split": split})
    return Path(dst)

"""The stage API of the data pipeline (crop, fit, voxelize, reap, pack); the runner that
drives stages is :mod:`data_pipeline.runner`.

A *map* stage turns the items of its input (image files for ``crop``, the samples of the
previous stage's manifest for the others) into samples, one item at a time, in parallel.
A *reduce* stage (``pack``) turns a whole manifest into one output, at once.

Layout of a map stage's ``output_dir``::

    stage.json      the stage name, version and parameters (a rerun with other parameters
                    into the same folder is refused: see :class:`StageConfigError`)
    items/          the stage's per-sample outputs (crops, meshes, volumes, ...)
    done/<id>.json  one record per finished item, written LAST: {"id", "ok", "reason",
                    "detail", "samples", "files"}; an item is done iff its record exists
                    and every file it lists exists
    manifest.json   rebuilt from the records of the current items (sorted by id) at the
                    end of every run: header ("stage", "version", "params", "input_dir"
                    relative to this folder, "upstream_stage"), "samples" (ok),
                    "failures" (this stage's and every upstream stage's, each with its reason)
    timing.json     how long this run took (items processed now, ms per item / sample);
                    the only file that differs between two runs with the same inputs
    .tmp/           temporary files; removed at the start of every run

Writes are atomic and deterministic (see :mod:`data_pipeline.runner` for crash safety):
write through :class:`ItemContext`, serialise with :func:`dumps_json` / :func:`npz_bytes`.

Paths. ``files`` entries and ``source_image`` are stored relative to the stage's own
``output_dir``; when a stage reads its input manifest, the runner rebases the upstream
samples' ``files`` onto its own folder, so every stage resolves every path the same way
(``output_dir / rel``) and a whole pipeline folder can be moved.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from vrn.atomic_write import atomic_write

__all__ = [
    "Item",
    "ItemContext",
    "ItemFailure",
    "Stage",
    "StageConfigError",
    "PipelineInputError",
    "PipelineRunError",
    "load_manifest",
    "dumps_json",
    "npz_bytes",
    "load_npz",
    "safe_id",
    "MANIFEST",
    "STAGE_FILE",
    "TIMING_FILE",
    "DONE_DIR",
    "ITEMS_DIR",
    "TMP_DIR",
    "LOCK_FILE",
]

MANIFEST = "manifest.json"
STAGE_FILE = "stage.json"
TIMING_FILE = "timing.json"
DONE_DIR = "done"
ITEMS_DIR = "items"
TMP_DIR = ".tmp"
LOCK_FILE = ".lock"


class ItemFailure(Exception):
    """Raised by :meth:`Stage.process` for an expected, recorded failure (no face, ...).

    Args:
        reason: a short code counted in summaries (``"no_face"``, ``"fit_failed"``, ...).
        detail: a human sentence.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class StageConfigError(ValueError):
    """The output folder holds a run of this stage with different parameters."""


class PipelineInputError(ValueError):
    """A missing or unusable input folder / manifest (message says what to do)."""


class PipelineRunError(RuntimeError):
    """A *run* fault (disk full, quota, permission, out of memory, a missing or damaged
    asset): the run stops, the item at hand is not recorded, a plain rerun redoes it. Its
    message is one line naming the cause."""


# --------------------------------------------------------------------------------------
# deterministic, atomic file writing
# --------------------------------------------------------------------------------------


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps_json(obj: Any, indent: int | None = 1) -> bytes:
    """Deterministic JSON bytes (sorted keys, numpy arrays as lists, NaN refused)."""
    return (json.dumps(obj, sort_keys=True, indent=indent, default=_json_default, allow_nan=False) + "\n").encode()


def npz_bytes(**arrays: Any) -> bytes:
    """An ``.npz`` archive (readable by ``np.load``) whose bytes depend only on the arrays.

    ``np.savez`` stamps the current time into every zip entry; this writes entries with a
    fixed timestamp, in sorted key order, uncompressed.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            arr = np.asanyarray(arrays[key])
            if arr.dtype == object:
                raise TypeError(f"npz array {key!r} has dtype object")
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    return buf.getvalue()


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load an ``.npz`` file into a plain dict (file closed on return)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_id(rel_path: str) -> str:
    """A file-name-safe item id from a relative path: ``"a/b c.jpg"`` -> ``"a__b_c"``."""
    stem = os.path.splitext(rel_path)[0].replace("\\", "/")
    return "__".join(_SAFE.sub("_", part) for part in stem.split("/") if part)


# --------------------------------------------------------------------------------------
# items, contexts, stages
# --------------------------------------------------------------------------------------


@dataclass
class Item:
    """One unit of work: a unique, file-name-safe ``id`` and a JSON-able payload."""

    id: str
    data: dict[str, Any] = field(default_factory=dict)


class ItemContext:
    """What :meth:`Stage.process` may touch: paths relative to the stage's output folder
    and atomic writers that record every file they write (for the done-record)."""

    def __init__(self, out_dir: Path, item_id: str) -> None:
        self.out_dir = out_dir
        self.item_id = item_id
        self.tmp_dir = out_dir / TMP_DIR
        self.written: list[str] = []

    def path(self, rel: str) -> Path:
        """Absolute path of a file given relative to the output folder (``../crop/x`` too)."""
        return self.out_dir / rel

    def write_bytes(self, rel: str, data: bytes) -> str:
        atomic_write(self.out_dir / rel, data, self.tmp_dir, fsync=False)
        self.written.append(rel)
        return rel

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, dumps_json(obj))

    def write_npz(self, rel: str, **arrays: Any) -> str:
        return self.write_bytes(rel, npz_bytes(**arrays))

    def write_shared(self, rel: str, data: bytes) -> str:
        """A file many items share, named by its content (e.g. ``topology/<sha256>.npy``):
        written atomically when missing, left alone when present (same name, same bytes),
        recorded in this item's done-record like its own files."""
        path = self.out_dir / rel
        if not path.is_file():
            atomic_write(path, data, self.tmp_dir, fsync=False)
        self.written.append(rel)
        return rel


class Stage:
    """Base class of a pipeline stage. Subclasses set ``name`` and implement
    :meth:`process` (map stages) or :meth:`reduce` (``kind = "reduce"``).

    A stage object is pickled into worker processes before :meth:`setup` runs there, so
    ``__init__`` must stay light (no models): load them in :meth:`setup`.
    """

    name: ClassVar[str] = "stage"
    version: ClassVar[int] = 1
    kind: ClassVar[str] = "map"
    #: the stage reads a manifest from ``input_dir`` (False: crop reads image files)
    needs_manifest: ClassVar[bool] = True
    #: worth a process pool (False: cheap per item, always runs in-process)
    parallel: ClassVar[bool] = True
    #: the stage whose output this one expects (for error messages)
    previous: ClassVar[str | None] = None

    def params(self) -> dict[str, Any]:
        """JSON-able parameters that define the outputs (stored in ``stage.json``)."""
        return {}

    def setup(self) -> None:
        """Load models etc.; called once per process before the first item."""

    def list_items(self, input_dir: Path, upstream: dict[str, Any] | None, out_dir: Path) -> list[Item]:
        """Default: one item per upstream sample (the sample dict as payload)."""
        assert upstream is not None
        return [Item(s["id"], s) for s in upstream["samples"]]

    def process(self, item: Item, ctx: ItemContext) -> list[dict[str, Any]]:
        """Do one item; write outputs through ``ctx``; return its samples (JSON-able).

        Raise :class:`ItemFailure` for an expected failure; any other exception is
        recorded as ``"<stage>_error"``, except a run fault (disk full, permission, out of
        memory, a missing asset: see :mod:`data_pipeline.runner`), which stops the run with
        :class:`PipelineRunError` and records nothing for the item.
        """
        raise NotImplementedError

    def finalize(self, manifest: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """Adjust the manifest before it is written (e.g. add a summary)."""
        return manifest

    def reduce(self, upstream: dict[str, Any], input_dir: Path, out_dir: Path, progress: bool) -> dict[str, Any]:
        """Reduce stages: build the whole output atomically; return a summary dict."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------
# manifests
# --------------------------------------------------------------------------------------


def load_manifest(folder: str | os.PathLike, expected_from: str | None = None) -> dict[str, Any]:
    """Read ``folder/manifest.json``; raise :class:`PipelineInputError` saying what to run."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        hint = (
            f"run the '{expected_from}' stage first (python -m data_pipeline.{expected_from}) or "
            if expected_from
            else ""
        )
        raise PipelineInputError(
            f"input_dir={folder} has no {MANIFEST}: {hint}point input_dir at the output_dir of the previous stage."
        )
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:  # pragma: no cover - files are written atomically
        raise PipelineInputError(f"{p} is not valid JSON ({e}); rerun the stage that wrote it.") from e

"""One runner for every data-pipeline stage (crop, fit, voxelize, reap, pack).

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
                    end of every run: header, "samples" (ok), "failures" (this stage's and
                    every upstream stage's, each with its reason)
    timing.json     how long this run took (items processed now, ms per item / sample);
                    the only file that differs between two runs with the same inputs
    .tmp/           temporary files; removed at the start of every run

Crash safety. Every file is written to ``.tmp/`` and moved into place with
``os.replace`` (atomic on one filesystem), outputs first, the item's done-record last, the
manifest after all items. A SIGKILL at any moment therefore leaves only complete files
under their final names: at worst an item's outputs without its record, which the next run
redoes (same inputs, same bytes). Worker processes die with the runner (Linux
``PR_SET_PDEATHSIG``), and an ``flock`` on ``output_dir/.lock`` refuses a second run on
the same folder while one is alive. Everything written is deterministic (sorted JSON,
zip entries with fixed timestamps), so a killed and resumed run ends byte-identical to an
uninterrupted one (``timing.json`` and Hydra's ``.logs/`` aside).

Paths. ``files`` entries and ``source_image`` are stored relative to the stage's own
``output_dir``; when a stage reads its input manifest, the runner rebases the upstream
samples' ``files`` onto its own folder, so every stage resolves every path the same way
(``output_dir / rel``) and a whole pipeline folder can be moved.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import zipfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from vrn.atomic_write import atomic_write

log = logging.getLogger("data_pipeline")

__all__ = [
    "Item", "ItemContext", "ItemFailure", "Stage", "StageConfigError", "PipelineInputError", "run_stage",
    "load_manifest", "dumps_json", "npz_bytes", "load_npz", "safe_id", "MANIFEST",
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
        recorded as ``"<stage>_error"``.
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
        hint = f"run the '{expected_from}' stage first (python -m data_pipeline.{expected_from}) or " \
            if expected_from else ""
        raise PipelineInputError(
            f"input_dir={folder} has no {MANIFEST}: {hint}point input_dir at the output_dir of the previous stage.")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:  # pragma: no cover - files are written atomically
        raise PipelineInputError(f"{p} is not valid JSON ({e}); rerun the stage that wrote it.") from e


def _rebase(rel: str, src_dir: Path, dst_dir: Path) -> str:
    return os.path.relpath(os.path.normpath(src_dir / rel), dst_dir).replace(os.sep, "/")


def _rebase_sample(sample: dict[str, Any], src_dir: Path, dst_dir: Path) -> dict[str, Any]:
    s = dict(sample)
    if "files" in s:
        s["files"] = {k: _rebase(v, src_dir, dst_dir) for k, v in s["files"].items()}
    return s


def _record_valid(rec: dict[str, Any], out_dir: Path) -> bool:
    return all((out_dir / f).is_file() for f in rec.get("files", []))


# --------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _set_pdeathsig() -> None:
    """Linux: get SIGKILL when the parent dies, so no orphan keeps writing."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _set_torch_threads(n: int | None) -> int | None:
    """Set torch's intra-op threads (the same count in and out of the pool keeps float
    results identical); returns the previous count (None when unchanged)."""
    torch = sys.modules.get("torch")  # stages that never import torch do not pay for it
    if n and torch is not None:
        old = torch.get_num_threads()
        torch.set_num_threads(int(n))
        return old
    return None


def _worker_init(stage: Stage, out_dir: str, torch_threads: int | None) -> None:
    _set_pdeathsig()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    stage.setup()
    _set_torch_threads(torch_threads)
    _WORKER["stage"] = stage
    _WORKER["out_dir"] = Path(out_dir)


def _do_item(stage: Stage, out_dir: Path, item: Item) -> tuple[str, dict[str, Any], float]:
    ctx = ItemContext(out_dir, item.id)
    t0 = time.perf_counter()
    try:
        samples = stage.process(item, ctx)
        rec: dict[str, Any] = {"id": item.id, "ok": True, "reason": None, "detail": None, "samples": samples}
    except ItemFailure as e:
        rec = {"id": item.id, "ok": False, "reason": e.reason, "detail": e.detail, "samples": []}
    except Exception as e:  # recorded, the run goes on
        rec = {"id": item.id, "ok": False, "reason": f"{stage.name}_error",
               "detail": f"{type(e).__name__}: {e}", "samples": []}
    elapsed = time.perf_counter() - t0
    if "source_image" in item.data:
        rec["source_image"] = item.data["source_image"]
    rec["files"] = sorted(set(ctx.written)) if rec["ok"] else []
    # the done-record is the last write of the item
    atomic_write(out_dir / DONE_DIR / f"{item.id}.json", dumps_json(rec), out_dir / TMP_DIR, fsync=False)
    return item.id, rec, elapsed


def _worker_item(item: Item) -> tuple[str, dict[str, Any], float]:
    return _do_item(_WORKER["stage"], _WORKER["out_dir"], item)


# --------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _folder_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineInputError(
                f"another pipeline run is writing to {path.parent} (lock {path}); wait for it "
                f"or choose another output_dir") from None
        yield
    finally:
        f.close()


def _check_stage_file(stage: Stage, out_dir: Path, fingerprint: dict[str, Any]) -> None:
    p = out_dir / STAGE_FILE
    if p.is_file():
        old = json.loads(p.read_text())
        if old != json.loads(dumps_json(fingerprint)):
            diff = sorted(k for k in set(old.get("params", {})) | set(fingerprint["params"])
                          if old.get("params", {}).get(k) != fingerprint["params"].get(k))
            raise StageConfigError(
                f"output_dir={out_dir} holds a '{old.get('stage')}' run (version {old.get('version')}) with "
                f"different parameters ({', '.join(diff) or 'stage/version'}). Use a new output_dir, or pass "
                f"overwrite=true to delete its contents and start over.")
    else:
        atomic_write(p, dumps_json(fingerprint), out_dir / TMP_DIR, fsync=False)


def _clear_folder(out_dir: Path) -> None:
    for child in out_dir.iterdir():
        if child.name in (LOCK_FILE, ".logs"):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, dynamic_ncols=True, leave=True)


def run_stage(stage: Stage, input_dir: str | os.PathLike, output_dir: str | os.PathLike, n_jobs: int = 1,
              progress: bool = True, overwrite: bool = False, retry_failed: bool = False,
              torch_threads: int | None = None) -> dict[str, Any]:
    """Run ``stage`` from ``input_dir`` into ``output_dir``; returns the manifest written.

    Args:
        stage: the stage (its parameters go to ``stage.json``).
        input_dir: the previous stage's output folder (``crop``: a folder of photos).
        output_dir: this stage's folder (created).
        n_jobs: worker processes (1: in this process).
        progress: show a progress bar.
        overwrite: delete ``output_dir``'s previous contents first.
        retry_failed: redo items whose record says they failed (default: keep them).
        torch_threads: torch threads per process (default: cores // n_jobs when n_jobs > 1,
            else torch's default).

    Raises:
        PipelineInputError: missing input folder / manifest.
        StageConfigError: ``output_dir`` holds a run with other parameters.
    """
    in_dir = Path(os.path.expanduser(str(input_dir))).absolute()
    out_dir = Path(os.path.expanduser(str(output_dir))).absolute()
    if not in_dir.is_dir():
        raise PipelineInputError(f"input_dir={in_dir} does not exist or is not a folder; check the path.")
    if out_dir == in_dir:
        raise PipelineInputError(f"output_dir must differ from input_dir ({in_dir}).")
    n_jobs = max(1, int(n_jobs))
    if stage.kind == "reduce":
        return _run_reduce(stage, in_dir, out_dir, progress, overwrite)

    out_dir.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out_dir / LOCK_FILE):
        if overwrite:
            _clear_folder(out_dir)
        shutil.rmtree(out_dir / TMP_DIR, ignore_errors=True)  # leftovers of a killed run
        (out_dir / TMP_DIR).mkdir()
        (out_dir / DONE_DIR).mkdir(exist_ok=True)
        upstream = None
        if stage.needs_manifest:
            upstream = load_manifest(in_dir, stage.previous)
            upstream = {**upstream, "samples": [_rebase_sample(s, in_dir, out_dir) for s in upstream["samples"]]}
        fingerprint = {"stage": stage.name, "version": stage.version, "params": stage.params()}
        _check_stage_file(stage, out_dir, fingerprint)

        items = stage.list_items(in_dir, upstream, out_dir)
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise PipelineInputError(f"{stage.name}: duplicate item ids {dup} (two inputs map to one id)")

        records: dict[str, dict[str, Any]] = {}
        pending: list[Item] = []
        for it in items:
            rp = out_dir / DONE_DIR / f"{it.id}.json"
            rec = None
            if rp.is_file():
                with contextlib.suppress(json.JSONDecodeError, OSError):
                    rec = json.loads(rp.read_text())
            if rec is not None and _record_valid(rec, out_dir) and (rec["ok"] or not retry_failed):
                records[it.id] = rec
            else:
                pending.append(it)

        t0 = time.perf_counter()
        item_s: list[float] = []
        n_samples_now = 0
        bar = _progress(len(pending), stage.name, progress)
        bar.set_postfix(skipped=len(records))
        # a pool costs seconds to start: cheap stages and short runs stay in this process
        in_process = n_jobs == 1 or not stage.parallel or len(pending) < 2 * n_jobs
        threads = torch_threads or (max(1, (os.cpu_count() or 1) // n_jobs) if n_jobs > 1 else None)
        try:
            if pending and in_process:
                stage.setup()
                previous = _set_torch_threads(threads)
                try:
                    for it in pending:
                        iid, rec, el = _do_item(stage, out_dir, it)
                        records[iid] = rec
                        item_s.append(el)
                        n_samples_now += len(rec["samples"])
                        bar.update(1)
                finally:
                    _set_torch_threads(previous)
            elif pending:
                ctx = get_context("spawn")
                with ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=_worker_init,
                                         initargs=(stage, str(out_dir), threads)) as ex:
                    # bounded submission keeps memory flat on 100k-item folders
                    it_iter = iter(pending)
                    futs = set()
                    for it in it_iter:
                        futs.add(ex.submit(_worker_item, it))
                        if len(futs) >= 4 * n_jobs:
                            break
                    while futs:
                        done, futs = wait(futs, return_when=FIRST_COMPLETED)
                        for f in done:
                            iid, rec, el = f.result()
                            records[iid] = rec
                            item_s.append(el)
                            n_samples_now += len(rec["samples"])
                            bar.update(1)
                            nxt = next(it_iter, None)
                            if nxt is not None:
                                futs.add(ex.submit(_worker_item, nxt))
        except BrokenProcessPool as e:
            raise RuntimeError(f"{stage.name}: a worker process died ({e}); finished items are kept, "
                               f"rerun the same command to resume") from e
        finally:
            bar.close()
        wall = time.perf_counter() - t0

        manifest = _build_manifest(stage, in_dir, out_dir, upstream, [records[i] for i in sorted(records)])
        manifest = stage.finalize(manifest, out_dir)
        atomic_write(out_dir / MANIFEST, dumps_json(manifest), out_dir / TMP_DIR, fsync=False)
        timing = {
            "stage": stage.name, "n_jobs": n_jobs, "processed_items": len(pending),
            "skipped_items": len(items) - len(pending), "samples_processed": n_samples_now,
            "wall_s": round(wall, 3),
            "ms_per_item": round(1000 * sum(item_s) / len(item_s), 2) if item_s else None,
            "ms_per_sample": round(1000 * sum(item_s) / n_samples_now, 2) if n_samples_now else None,
        }
        atomic_write(out_dir / TIMING_FILE, dumps_json(timing), out_dir / TMP_DIR, fsync=False)
        shutil.rmtree(out_dir / TMP_DIR, ignore_errors=True)
    c = manifest["counts"]
    log.info(f"[{stage.name}] {c['items']} items: {c['ok_items']} ok, {c['failed_items']} failed "
             f"({len(pending)} run now, {len(items) - len(pending)} already done); {c['samples']} samples "
             f"-> {out_dir}")
    if timing["ms_per_sample"] is not None:
        log.info(f"[{stage.name}] {timing['ms_per_sample']:.1f} ms per sample ({timing['ms_per_item']:.1f} ms "
                 f"per item, n_jobs={n_jobs}, wall {wall:.1f} s)")
    return manifest


def _build_manifest(stage: Stage, in_dir: Path, out_dir: Path, upstream: dict[str, Any] | None,
                    records: list[dict[str, Any]]) -> dict[str, Any]:
    samples = [s for r in records if r["ok"] for s in r["samples"]]
    own = [{"id": r["id"], "stage": stage.name, "reason": r["reason"], "detail": r["detail"],
            **({"source_image": r["source_image"]} if "source_image" in r else {})}
           for r in records if not r["ok"]]
    upstream_failures = list(upstream.get("failures", [])) if upstream else []
    failures = sorted(upstream_failures + own, key=lambda f: (f["id"], f["stage"]))
    return {
        "stage": stage.name,
        "version": stage.version,
        "params": stage.params(),
        "input_dir": os.path.relpath(in_dir, out_dir).replace(os.sep, "/"),
        "upstream_stage": upstream.get("stage") if upstream else None,
        "counts": {"items": len(records), "ok_items": sum(r["ok"] for r in records),
                   "failed_items": sum(not r["ok"] for r in records), "samples": len(samples),
                   "failures_total": len(failures)},
        "samples": samples,
        "failures": failures,
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_reduce(stage: Stage, in_dir: Path, out_dir: Path, progress: bool, overwrite: bool) -> dict[str, Any]:
    """A reduce stage writes ``out_dir`` as a whole (atomically, by its own writer); it is
    done when ``out_dir/meta.json`` records the same input manifest hash and parameters."""
    upstream = load_manifest(in_dir, stage.previous)
    fingerprint = {"stage": stage.name, "version": stage.version, "params": stage.params(),
                   "input_manifest_sha256": _sha256(in_dir / MANIFEST)}
    lock = out_dir.parent / f".{out_dir.name}{LOCK_FILE}"
    with _folder_lock(lock):
        meta_p = out_dir / "meta.json"
        if meta_p.is_file() and not overwrite:
            meta = json.loads(meta_p.read_text())
            old = meta.get("pipeline", {}).get("fingerprint")
            if old == json.loads(dumps_json(fingerprint)):
                log.info(f"[{stage.name}] {out_dir} is up to date (same input manifest and parameters): skipped")
                return meta
        upstream = {**upstream, "samples": [_rebase_sample(s, in_dir, in_dir) for s in upstream["samples"]]}
        t0 = time.perf_counter()
        summary = stage.reduce({**upstream, "_fingerprint": fingerprint}, in_dir, out_dir, progress)
        wall = time.perf_counter() - t0
    n = max(1, int(summary.get("num_samples", 0)))
    log.info(f"[{stage.name}] wrote {out_dir} in {wall:.1f} s ({1000 * wall / n:.1f} ms per sample)")
    return summary

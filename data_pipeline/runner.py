"""The runner of every data-pipeline stage: :func:`run_stage`.

A *map* stage (:class:`~data_pipeline.stage.Stage` with ``kind = "map"``) is run item by
item, in this process or in a pool of worker processes, both through one submit / collect
loop (:func:`_run_pending`); a *reduce* stage (``pack``) writes its whole output at once
(:func:`_run_reduce`). The folder layout, crash-safety and path rules are described in
:mod:`data_pipeline.stage`.

Crash safety. Every file is written to ``.tmp/`` and moved into place with
``os.replace`` (atomic on one filesystem), outputs first, the item's done-record last, the
manifest after all items. A SIGKILL at any moment therefore leaves only complete files
under their final names: at worst an item's outputs without its record, which the next run
redoes (same inputs, same bytes). Worker processes die with the runner (Linux
``PR_SET_PDEATHSIG``), and an ``flock`` on ``output_dir/.lock`` refuses a second run on
the same folder while one is alive. Everything written is deterministic (sorted JSON,
zip entries with fixed timestamps), so a killed and resumed run ends byte-identical to an
uninterrupted one (``timing.json`` and Hydra's ``.logs/`` aside).

Faults by kind. An *item* fault (this input is bad: :class:`~data_pipeline.stage.ItemFailure`
or any other exception of ``Stage.process``) is recorded in the item's done-record and the
run goes on. A *run* fault (:func:`run_fault`: disk full ``ENOSPC`` / quota ``EDQUOT``,
permission, read-only filesystem, I/O error, out of memory, a missing or damaged asset
:class:`vrn.assets.AssetNotFoundError`, a worker killed) stops the run with
:class:`~data_pipeline.stage.PipelineRunError`, one line naming the cause; the item at hand
gets no done-record and no manifest is written, so the same command, rerun once the cause
is fixed, redoes it. Records that older runs wrote for run faults (``detail`` naming one)
are redone too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from data_pipeline.stage import (
    DONE_DIR,
    LOCK_FILE,
    MANIFEST,
    STAGE_FILE,
    TIMING_FILE,
    TMP_DIR,
    Item,
    ItemContext,
    ItemFailure,
    PipelineInputError,
    PipelineRunError,
    Stage,
    StageConfigError,
    dumps_json,
    load_manifest,
)
from vrn.assets import AssetNotFoundError, sha256_of
from vrn.atomic_write import atomic_write

log = logging.getLogger("data_pipeline")

__all__ = ["run_stage", "run_fault"]

#: errno values that mean "the machine / filesystem", not "this input"
RUN_FAULT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOMEM, errno.EIO}
)
#: texts of the same faults when a library re-raised them as another exception type
RUN_FAULT_TEXTS = ("No space left on device", "Disk quota exceeded", "Read-only file system", "out of memory")
#: what a done-record's ``detail`` says when an older runner recorded a run fault as an item failure
_OLD_RUN_FAULT_DETAILS = RUN_FAULT_TEXTS + ("[Errno 28]", "[Errno 122]", "MemoryError", "AssetNotFoundError")


def run_fault(exc: BaseException) -> str | None:
    """One line naming the cause when ``exc`` (or an exception it was raised from) is a run
    fault (module doc); None for an item fault."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ItemFailure):
            return None
        if isinstance(e, AssetNotFoundError):
            return f"{type(e).__name__}: {' '.join(str(e).split())}"
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return f"out of memory ({type(e).__name__}: {' '.join(str(e).split()) or 'no detail'})"
        if isinstance(e, OSError) and e.errno in RUN_FAULT_ERRNOS:
            where = f" ({e.filename})" if e.filename else ""
            return f"{e.strerror or os.strerror(e.errno)}{where} [errno {errno.errorcode.get(e.errno, e.errno)}]"
        text = str(e)
        for t in RUN_FAULT_TEXTS:
            if t in text:
                return f"{t} ({type(e).__name__}: {' '.join(text.split())})"
        e = e.__cause__ or e.__context__
    return None


def _stop(stage: Stage, cause: str, item_id: str | None = None) -> PipelineRunError:
    at = f" at item '{item_id}' (not recorded)" if item_id is not None else ""
    return PipelineRunError(
        f"{stage.name}: the run stopped{at}: {cause.rstrip('.')}. Fix the cause (free disk space, check permissions / "
        f"memory / assets) and rerun the same command: finished items are kept, the rest is redone."
    )


#: one finished item: (item id, its done-record, seconds spent in ``Stage.process``)
ItemResult = tuple[str, dict[str, Any], float]


# --------------------------------------------------------------------------------------
# paths and records
# --------------------------------------------------------------------------------------


def _rebase(rel: str, src_dir: Path, dst_dir: Path) -> str:
    """A path relative to ``src_dir`` -> the same file relative to ``dst_dir`` (POSIX)."""
    return os.path.relpath(os.path.normpath(src_dir / rel), dst_dir).replace(os.sep, "/")


def _rebase_sample(sample: dict[str, Any], src_dir: Path, dst_dir: Path) -> dict[str, Any]:
    """A copy of ``sample`` whose ``files`` are relative to ``dst_dir`` instead of ``src_dir``."""
    s = dict(sample)
    if "files" in s:
        s["files"] = {k: _rebase(v, src_dir, dst_dir) for k, v in s["files"].items()}
    return s


def _record_valid(rec: dict[str, Any], out_dir: Path) -> bool:
    """Every file a done-record lists (relative to ``out_dir``) exists."""
    return all((out_dir / f).is_file() for f in rec.get("files", []))


# --------------------------------------------------------------------------------------
# one item (runs in this process or in a worker)
# --------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _set_pdeathsig() -> None:
    """Linux: get SIGKILL when the parent dies, so no orphan keeps writing."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
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
    """Pool initializer: die with the parent, ignore Ctrl-C, set the stage up once."""
    _set_pdeathsig()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    try:
        stage.setup()
    except Exception as e:  # a run fault (missing asset, ...) reaches the parent with its cause
        cause = run_fault(e)
        if cause is None:
            raise
        _WORKER["setup_error"] = _stop(stage, cause)
    _set_torch_threads(torch_threads)
    _WORKER["stage"] = stage
    _WORKER["out_dir"] = Path(out_dir)


def _do_item(stage: Stage, out_dir: Path, item: Item) -> ItemResult:
    """Process one item and write its done-record (the item's last write)."""
    ctx = ItemContext(out_dir, item.id)
    t0 = time.perf_counter()
    try:
        samples = stage.process(item, ctx)
        rec: dict[str, Any] = {"id": item.id, "ok": True, "reason": None, "detail": None, "samples": samples}
    except ItemFailure as e:
        rec = {"id": item.id, "ok": False, "reason": e.reason, "detail": e.detail, "samples": []}
    except Exception as e:  # an item fault is recorded and the run goes on; a run fault stops it
        cause = run_fault(e)
        if cause is not None:
            raise _stop(stage, cause, item.id) from e
        rec = {
            "id": item.id,
            "ok": False,
            "reason": f"{stage.name}_error",
            "detail": f"{type(e).__name__}: {e}",
            "samples": [],
        }
    elapsed = time.perf_counter() - t0
    if "source_image" in item.data:
        rec["source_image"] = item.data["source_image"]
    rec["files"] = sorted(set(ctx.written)) if rec["ok"] else []
    atomic_write(out_dir / DONE_DIR / f"{item.id}.json", dumps_json(rec), out_dir / TMP_DIR, fsync=False)
    return item.id, rec, elapsed


def _worker_item(item: Item) -> ItemResult:
    if "setup_error" in _WORKER:
        raise _WORKER["setup_error"]
    return _do_item(_WORKER["stage"], _WORKER["out_dir"], item)


# --------------------------------------------------------------------------------------
# executors: one submit(item) -> Future interface for serial and parallel runs
# --------------------------------------------------------------------------------------

Submit = Callable[[Item], "Future[ItemResult]"]


@contextlib.contextmanager
def _inline_executor(stage: Stage, out_dir: Path, threads: int | None) -> Iterator[Submit]:
    """Serial mode: ``submit`` runs the item at once in this process and returns a done
    future (an exception of the runner itself propagates from ``submit``, as in a loop)."""
    stage.setup()
    previous = _set_torch_threads(threads)

    def submit(item: Item) -> Future[ItemResult]:
        fut: Future[ItemResult] = Future()
        fut.set_result(_do_item(stage, out_dir, item))
        return fut

    try:
        yield submit
    finally:
        _set_torch_threads(previous)


@contextlib.contextmanager
def _pool_executor(stage: Stage, out_dir: Path, n_jobs: int, threads: int | None) -> Iterator[Submit]:
    """Parallel mode: ``n_jobs`` spawned worker processes, each set up once."""
    with ProcessPoolExecutor(
        n_jobs, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(stage, str(out_dir), threads)
    ) as ex:
        yield lambda item: ex.submit(_worker_item, item)


def _run_pending(submit: Submit, pending: list[Item], window: int, on_result: Callable[[ItemResult], None]) -> None:
    """The one submit / collect loop: at most ``window`` items in flight (bounded
    submission keeps memory flat on 100k-item folders); ``on_result`` per finished item."""
    todo = iter(pending)
    futs = {submit(it) for it in itertools.islice(todo, window)}
    while futs:
        done, futs = wait(futs, return_when=FIRST_COMPLETED)
        for f in done:
            on_result(f.result())
            nxt = next(todo, None)
            if nxt is not None:
                futs.add(submit(nxt))


@dataclass
class _Progress:
    """What this run did: the new done-records and the time spent per item."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    item_s: list[float] = field(default_factory=list)
    n_samples: int = 0

    def add(self, result: ItemResult) -> None:
        iid, rec, elapsed = result
        self.records[iid] = rec
        self.item_s.append(elapsed)
        self.n_samples += len(rec["samples"])


def _progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, dynamic_ncols=True, leave=True)


def _process_items(
    stage: Stage,
    out_dir: Path,
    pending: list[Item],
    n_jobs: int,
    torch_threads: int | None,
    progress: bool,
    skipped: int,
) -> _Progress:
    """Run the pending items in this process or in a pool; returns their records."""
    done = _Progress()
    bar = _progress_bar(len(pending), stage.name, progress)
    bar.set_postfix(skipped=skipped)
    # a pool costs seconds to start: cheap stages and short runs stay in this process
    in_process = n_jobs == 1 or not stage.parallel or len(pending) < 2 * n_jobs
    threads = torch_threads or (max(1, (os.cpu_count() or 1) // n_jobs) if n_jobs > 1 else None)

    def on_result(result: ItemResult) -> None:
        done.add(result)
        bar.update(1)

    try:
        if pending:
            executor = (
                _inline_executor(stage, out_dir, threads)
                if in_process
                else _pool_executor(stage, out_dir, n_jobs, threads)
            )
            with executor as submit:
                _run_pending(submit, pending, 1 if in_process else 4 * n_jobs, on_result)
    except BrokenProcessPool as e:
        raise _stop(
            stage, f"a worker process died (killed for memory? its setup failed? see the log above): {e}"
        ) from e
    finally:
        bar.close()
    return done


# --------------------------------------------------------------------------------------
# the output folder
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _folder_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``; :class:`PipelineInputError` when another run holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineInputError(
                f"another pipeline run is writing to {path.parent} (lock {path}); wait for it "
                f"or choose another output_dir"
            ) from None
        yield
    finally:
        f.close()


def _check_stage_file(stage: Stage, out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Write ``stage.json``, or refuse (:class:`StageConfigError`) when it records other parameters."""
    p = out_dir / STAGE_FILE
    if p.is_file():
        old = json.loads(p.read_text())
        if old != json.loads(dumps_json(fingerprint)):
            diff = sorted(
                k
                for k in set(old.get("params", {})) | set(fingerprint["params"])
                if old.get("params", {}).get(k) != fingerprint["params"].get(k)
            )
            raise StageConfigError(
                f"output_dir={out_dir} holds a '{old.get('stage')}' run (version {old.get('version')}) with "
                f"different parameters ({', '.join(diff) or 'stage/version'}). Use a new output_dir, or pass "
                f"overwrite=true to delete its contents and start over."
            )
    else:
        atomic_write(p, dumps_json(fingerprint), out_dir / TMP_DIR, fsync=False)


def _clear_folder(out_dir: Path) -> None:
    """Delete everything in ``out_dir`` but the lock and Hydra's ``.logs/``."""
    for child in out_dir.iterdir():
        if child.name in (LOCK_FILE, ".logs"):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _prepare_folder(out_dir: Path, overwrite: bool) -> None:
    """Start a run in ``out_dir`` (lock held): clear if asked, fresh ``.tmp/``, ``done/``."""
    if overwrite:
        _clear_folder(out_dir)
    shutil.rmtree(out_dir / TMP_DIR, ignore_errors=True)  # leftovers of a killed run
    (out_dir / TMP_DIR).mkdir()
    (out_dir / DONE_DIR).mkdir(exist_ok=True)


def _read_upstream(stage: Stage, in_dir: Path, out_dir: Path) -> dict[str, Any] | None:
    """The input manifest with its samples' ``files`` rebased onto ``out_dir`` (None: no manifest needed)."""
    if not stage.needs_manifest:
        return None
    upstream = load_manifest(in_dir, stage.previous)
    return {**upstream, "samples": [_rebase_sample(s, in_dir, out_dir) for s in upstream["samples"]]}


def _list_items(stage: Stage, in_dir: Path, upstream: dict[str, Any] | None, out_dir: Path) -> list[Item]:
    """The stage's items; :class:`PipelineInputError` on duplicate ids."""
    items = stage.list_items(in_dir, upstream, out_dir)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise PipelineInputError(f"{stage.name}: duplicate item ids {dup} (two inputs map to one id)")
    return items


def _split_done(items: list[Item], out_dir: Path, retry_failed: bool) -> tuple[dict[str, dict[str, Any]], list[Item]]:
    """``(records of the items already done, items still to do)``: an item is done iff its
    record parses, every file it lists exists and (with ``retry_failed``) it succeeded; a
    failure record whose ``detail`` names a run fault (written by older runners) is redone."""
    records: dict[str, dict[str, Any]] = {}
    pending: list[Item] = []
    for it in items:
        rp = out_dir / DONE_DIR / f"{it.id}.json"
        rec = None
        if rp.is_file():
            with contextlib.suppress(json.JSONDecodeError, OSError):
                rec = json.loads(rp.read_text())
        if rec is not None and not rec.get("ok") and any(t in str(rec.get("detail")) for t in _OLD_RUN_FAULT_DETAILS):
            rec = None
        if rec is not None and _record_valid(rec, out_dir) and (rec["ok"] or not retry_failed):
            records[it.id] = rec
        else:
            pending.append(it)
    return records, pending


def _build_manifest(
    stage: Stage, in_dir: Path, out_dir: Path, upstream: dict[str, Any] | None, records: list[dict[str, Any]]
) -> dict[str, Any]:
    """The stage's manifest from its done-records (sorted by id) and the upstream failures."""
    samples = [s for r in records if r["ok"] for s in r["samples"]]
    own = [
        {
            "id": r["id"],
            "stage": stage.name,
            "reason": r["reason"],
            "detail": r["detail"],
            **({"source_image": r["source_image"]} if "source_image" in r else {}),
        }
        for r in records
        if not r["ok"]
    ]
    upstream_failures = list(upstream.get("failures", [])) if upstream else []
    failures = sorted(upstream_failures + own, key=lambda f: (f["id"], f["stage"]))
    return {
        "stage": stage.name,
        "version": stage.version,
        "params": stage.params(),
        "input_dir": os.path.relpath(in_dir, out_dir).replace(os.sep, "/"),
        "upstream_stage": upstream.get("stage") if upstream else None,
        "counts": {
            "items": len(records),
            "ok_items": sum(r["ok"] for r in records),
            "failed_items": sum(not r["ok"] for r in records),
            "samples": len(samples),
            "failures_total": len(failures),
        },
        "samples": samples,
        "failures": failures,
    }


def _timing(stage: Stage, n_jobs: int, n_items: int, n_pending: int, done: _Progress, wall: float) -> dict[str, Any]:
    """The ``timing.json`` record of this run."""
    item_s = done.item_s
    return {
        "stage": stage.name,
        "n_jobs": n_jobs,
        "processed_items": n_pending,
        "skipped_items": n_items - n_pending,
        "samples_processed": done.n_samples,
        "wall_s": round(wall, 3),
        "ms_per_item": round(1000 * sum(item_s) / len(item_s), 2) if item_s else None,
        "ms_per_sample": round(1000 * sum(item_s) / done.n_samples, 2) if done.n_samples else None,
    }


def _log_run(stage: Stage, manifest: dict[str, Any], timing: dict[str, Any], out_dir: Path) -> None:
    c = manifest["counts"]
    run_now, skipped = timing["processed_items"], timing["skipped_items"]
    log.info(
        f"[{stage.name}] {c['items']} items: {c['ok_items']} ok, {c['failed_items']} failed "
        f"({run_now} run now, {skipped} already done); {c['samples']} samples -> {out_dir}"
    )
    if timing["ms_per_sample"] is not None:
        log.info(
            f"[{stage.name}] {timing['ms_per_sample']:.1f} ms per sample ({timing['ms_per_item']:.1f} ms "
            f"per item, n_jobs={timing['n_jobs']}, wall {timing['wall_s']:.1f} s)"
        )


# --------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------


def run_stage(
    stage: Stage,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    n_jobs: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    retry_failed: bool = False,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """Run ``stage`` from ``input_dir`` into ``output_dir``; returns the manifest written
    (reduce stages: their summary).

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
        PipelineRunError: a run fault (:func:`run_fault`) stopped the run; rerun to resume.
    """
    in_dir = Path(os.path.expanduser(str(input_dir))).absolute()
    out_dir = Path(os.path.expanduser(str(output_dir))).absolute()
    if not in_dir.is_dir():
        raise PipelineInputError(f"input_dir={in_dir} does not exist or is not a folder; check the path.")
    if out_dir == in_dir:
        raise PipelineInputError(f"output_dir must differ from input_dir ({in_dir}).")
    n_jobs = max(1, int(n_jobs))
    try:
        if stage.kind == "reduce":
            return _run_reduce(stage, in_dir, out_dir, progress, overwrite)
        out_dir.mkdir(parents=True, exist_ok=True)
        with _folder_lock(out_dir / LOCK_FILE):
            manifest, timing = _run_map(
                stage, in_dir, out_dir, n_jobs, progress, overwrite, retry_failed, torch_threads
            )
    except (PipelineRunError, PipelineInputError, StageConfigError):
        raise
    except Exception as e:  # setup, manifest, reduce: a run fault gets its one line, anything else goes up
        cause = run_fault(e)
        if cause is None:
            raise
        raise _stop(stage, cause) from e
    _log_run(stage, manifest, timing, out_dir)
    return manifest


def _run_map(
    stage: Stage,
    in_dir: Path,
    out_dir: Path,
    n_jobs: int,
    progress: bool,
    overwrite: bool,
    retry_failed: bool,
    torch_threads: int | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A map stage, the folder lock held: skip the done items, run the rest, write the
    manifest and ``timing.json``; returns ``(manifest, timing)``."""
    _prepare_folder(out_dir, overwrite)
    upstream = _read_upstream(stage, in_dir, out_dir)
    _check_stage_file(stage, out_dir, {"stage": stage.name, "version": stage.version, "params": stage.params()})
    items = _list_items(stage, in_dir, upstream, out_dir)
    records, pending = _split_done(items, out_dir, retry_failed)

    t0 = time.perf_counter()
    done = _process_items(stage, out_dir, pending, n_jobs, torch_threads, progress, skipped=len(records))
    wall = time.perf_counter() - t0
    records.update(done.records)

    manifest = _build_manifest(stage, in_dir, out_dir, upstream, [records[i] for i in sorted(records)])
    manifest = stage.finalize(manifest, out_dir)
    atomic_write(out_dir / MANIFEST, dumps_json(manifest), out_dir / TMP_DIR, fsync=False)
    timing = _timing(stage, n_jobs, len(items), len(pending), done, wall)
    atomic_write(out_dir / TIMING_FILE, dumps_json(timing), out_dir / TMP_DIR, fsync=False)
    shutil.rmtree(out_dir / TMP_DIR, ignore_errors=True)
    return manifest, timing


def _run_reduce(stage: Stage, in_dir: Path, out_dir: Path, progress: bool, overwrite: bool) -> dict[str, Any]:
    """A reduce stage writes ``out_dir`` as a whole (atomically, by its own writer); it is
    done when ``out_dir/meta.json`` records the same input manifest hash and parameters."""
    upstream = load_manifest(in_dir, stage.previous)
    fingerprint = {
        "stage": stage.name,
        "version": stage.version,
        "params": stage.params(),
        "input_manifest_sha256": sha256_of(in_dir / MANIFEST),
    }
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

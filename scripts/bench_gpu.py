#!/usr/bin/env python
"""GPU check: one prepared run that measures what a GPU session needs to know, as one table.

    VRN_ASSETS_DIR=../shared/assets python scripts/bench_gpu.py --device cuda [--budget-s 420]
        [--packed DIR] [--aflw DIR] [--workers 0,4,8] [--json out.json]
    python scripts/bench_gpu.py --device cpu --quick      # the test suite's run (tiny model, CPU)
    python scripts/bench_gpu.py --device cpu --model vrn_medium --batches 4,16 --rows "train bf16-mixed bs" \
        --budget-s 600                                    # CPU: bf16 autocast vs fp32 ("train fp32")

Rows (every row is measured under a guard: a failure, e.g. torch.compile missing, becomes a
row with the error; once ``--budget-s`` seconds are spent the remaining rows say "skipped"):

* ``fast_dev_run``: the real ``python -m vrn.train model=vrn_unguided trainer=gpu
  trainer.fast_dev_run=true data=folder data.root=<packed>`` (a subprocess; one train, val and
  test batch); wall time and exit status.
* ``train <variant> bs<B>``: training throughput of ``vrn_unguided`` (forward, the project's
  loss on targets decoded on the device, backward, RMSprop) on one batch of the packed set
  kept on the device, samples/s and peak memory, at batch 8 and 16, for fp32, bf16-mixed
  (autocast), bf16-mixed + channels_last, bf16-mixed + channels_last + torch.compile.
* ``dataloader workers=<N>``: samples/s the training DataLoader of the packed set delivers
  (decode, augmentation, collate, copy to the device) with N worker processes.
* ``demo batched``: ``python -m vrn.demo`` on a folder of photos (pretrained model, detector
  tddfa, bf16 on CUDA, batch 8), wall time and faces/s.
* ``aflw_real``: with ``--aflw DIR`` (a packed AFLW set), a few hundred steps of
  ``python -m vrn.train experiment=aflw_real model=vrn_unguided trainer=gpu
  trainer.precision=bf16-mixed``, samples/s over the whole run (startup included).

Without ``--packed`` a small synthetic packed set is generated first
(:func:`vrn.data.synthetic.generate_packed`). ``--quick`` shrinks everything (``vrn_tiny``,
batches 1 and 2, two steps, one demo photo) so the whole table runs on a CPU in about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from vrn.atomic_write import atomic_write
from vrn.bench_timing import cpu_model
from vrn.conventions import DEPTH_BINS
from vrn.data.datamodule import PackedDataModule, VolumeDataset, collate_volumes
from vrn.data.packed import PackedReader
from vrn.data.synthetic import SyntheticFaceConfig, generate_packed
from vrn.losses import volume_bce_loss
from vrn.models import create_model
from vrn.volume.codec import decode_torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "images"
#: training variants: name -> (autocast bf16, channels_last, torch.compile)
VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "fp32": (False, False, False),
    "bf16-mixed": (True, False, False),
    "bf16-mixed+channels_last": (True, True, False),
    "bf16-mixed+channels_last+compile": (True, True, True),
}


@dataclass
class Row:
    """One line of the table (None: not measured for this row)."""

    name: str
    batch: int | None = None
    samples_per_s: float | None = None
    peak_mem_gib: float | None = None
    wall_s: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """What to run: the full GPU check or the ``--quick`` CPU run of the test suite."""

    model: str  # registered variant of the training rows
    batches: tuple[int, int]  # the two batch sizes of the training rows
    steps: int  # timed training steps per row
    # untimed steps first (compilation, cuDNN autotuning, allocator warm-up)
    warmup: int
    workers: tuple[int, ...]  # DataLoader worker counts
    loader_batches: int  # timed DataLoader batches per row
    n_train: int  # training faces of the generated synthetic set (without --packed)
    demo_images: int | None  # None: every photo of the folder
    train_crop: int | None  # centre crop of the training rows' batch (None: the full 192 px)

    @staticmethod
    def make(quick: bool, workers: tuple[int, ...] | None) -> Plan:
        if quick:
            return Plan("vrn_tiny", (1, 2), 1, 2, workers or (0, 1), 3, 6, 1, 64)
        return Plan("vrn_unguided", (8, 16), 10, 3, workers or (0, 4, 8), 20, 96, None, None)


class Budget:
    """Wall-clock budget of the whole check (seconds since construction)."""

    def __init__(self, seconds: float) -> None:
        self.t0 = time.perf_counter()
        self.seconds = float(seconds)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def guarded(rows: list[Row], name: str, budget: Budget, fn: Callable[[], Row]) -> None:
    """Append ``fn()``'s row, or a row saying why there is none (budget spent, or the error)."""
    if budget.left() <= 0:
        rows.append(Row(name, note=f"skipped: time budget ({budget.seconds:.0f} s) spent"))
    else:
        t0 = time.perf_counter()
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001 - one failing measurement must not hide the others
            msg = " ".join(str(e).split())[:200]
            row = Row(name, wall_s=time.perf_counter() - t0, note=f"error: {type(e).__name__}: {msg}")
        rows.append(row)
    r = rows[-1]
    print(f"[{r.name}: {r.note or 'ok'}]", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    """GPU name and memory, torch / CUDA / cuDNN versions, CPU model and cores."""
    cpu = cpu_model()
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = p.name
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------


def make_packed(root: Path, plan: Plan) -> Path:
    """A small synthetic packed set (train / val / test) for the check."""
    n = plan.n_train
    counts = {"train": n, "val": max(2, n // 8), "test": max(2, n // 8)}
    workers = min(8, os.cpu_count() or 1) if n > 16 else 0
    return generate_packed(root, SyntheticFaceConfig(), counts, seed=0, workers=workers, progress=False)


def device_batch(packed: Path, batch: int, device: torch.device, crop: int | None = None) -> dict[str, Any]:
    """``batch`` training samples of the packed set (repeated when it has fewer), on ``device``.

    Args:
        crop: keep only the centre ``crop`` x ``crop`` pixels (images, run maps and the extra
            runs re-indexed): the ``--quick`` CPU run's smaller problem. None: the full crop.
    Returns:
        ``image`` (B, 3, S, S) float32, ``lo``/``hi`` (B, S, S) uint8, ``extra`` list of (K, 3) int64.
    """
    ds = VolumeDataset(PackedReader(packed, split="train"))
    b = collate_volumes([ds[i % len(ds)] for i in range(batch)])
    image, lo, hi, extra = b["image"], b["lo"], b["hi"], b["extra"]
    if crop is not None:
        size = image.shape[-1]
        o = (size - crop) // 2
        image = image[..., o : o + crop, o : o + crop].contiguous()
        lo = lo[:, o : o + crop, o : o + crop].contiguous()
        hi = hi[:, o : o + crop, o : o + crop].contiguous()
        cropped = []
        for e in extra:
            r, c = e[:, 0] // size - o, e[:, 0] % size - o
            keep = (r >= 0) & (r < crop) & (c >= 0) & (c < crop)
            cropped.append(torch.stack([r[keep] * crop + c[keep], e[keep, 1], e[keep, 2]], dim=1))
        extra = cropped
    return {
        "image": image.to(device),
        "lo": lo.to(device),
        "hi": hi.to(device),
        "extra": [e.to(device) for e in extra],
    }


def train_throughput(
    model: str,
    batch: dict[str, Any],
    device: torch.device,
    bf16: bool,
    channels_last: bool,
    compile_net: bool,
    steps: int,
    warmup: int,
    compile_backend: str = "inductor",
) -> tuple[float, float | None]:
    """Samples/s of full training steps on one device-resident batch, and peak memory (GiB).

    Args:
        batch: ``image`` (B, 3, S, S) float32, ``lo``/``hi`` (B, S, S) uint8, ``extra`` list.
        bf16: autocast to bfloat16 (Lightning's ``bf16-mixed``).
    Returns:
        (samples per second, peak allocated GiB on CUDA or None on the CPU).
    """
    torch.manual_seed(0)
    net = create_model(model).to(device).train()
    x = batch["image"]
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.RMSprop(net.parameters(), lr=1e-4)
    run_net = torch.compile(net, backend=compile_backend) if compile_net else net
    n = x.shape[0]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = run_net(x)
        # the loss in float32, as vrn.lit_module computes it under mixed precision
        target = decode_torch(batch["lo"], batch["hi"], batch["extra"], DEPTH_BINS, dtype=torch.float32)
        loss = volume_bce_loss(logits.float(), target)
        loss.backward()
        opt.step()

    for _ in range(max(1, warmup)):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return n * steps / dt, peak


def loader_rate(packed: Path, batch: int, workers: int, device: torch.device, batches: int) -> float:
    """Samples/s of the training DataLoader (augmentation on) incl. the copy to ``device``;
    the first batch (worker start-up) is not timed."""
    aug = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / "augment" / "default.yaml"))
    dm = PackedDataModule(
        str(packed), batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda", augment=aug
    )
    dm.setup("fit")
    loader = dm.train_dataloader()

    def batches_forever() -> Any:
        while True:
            yield from loader

    it = batches_forever()
    next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        b = next(it)
        img = b["image"].to(device, non_blocking=True)
        b["lo"].to(device, non_blocking=True)
        n += img.shape[0]
    _sync(device)
    return n / (time.perf_counter() - t0)


def run_cli(args: list[str], timeout_s: float, log: Path) -> tuple[float, int, str]:
    """Run ``python <args>`` from the repo root; (wall s, exit status, last line of its output)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(
                [sys.executable, *args], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=max(1.0, timeout_s)
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - t0
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return wall, rc, (lines[-1][:200] if lines else "")


def _cli_row(name: str, wall: float, rc: int, last: str, log: Path, **kw: Any) -> Row:
    if rc != 0:
        what = "timed out" if rc == 124 else f"exit {rc}"
        return Row(name, wall_s=wall, note=f"error: {what}: {last} (log {log})")
    return Row(name, wall_s=wall, **kw)


# --------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------


def row_names(plan: Plan) -> list[str]:
    """Every row the check prints, in order (the test checks them all)."""
    names = ["fast_dev_run"]
    names += [f"train {v} bs{b}" for v in VARIANTS for b in plan.batches]
    names += [f"dataloader workers={w}" for w in plan.workers]
    names += ["demo batched", "aflw_real"]
    return names


def run_check(
    device: torch.device,
    plan: Plan,
    budget: Budget,
    work: Path,
    packed: Path | None = None,
    aflw: Path | None = None,
    images: Path = DEFAULT_IMAGES,
    aflw_steps: int = 300,
    only: str | None = None,
) -> list[Row]:
    """Every row of the table (see the module doc); ``only``: just the rows whose name contains it."""
    rows: list[Row] = []
    jobs: dict[str, Callable[[], Row]] = {}
    cuda = device.type == "cuda"
    if packed is None:
        t0 = time.perf_counter()
        packed = make_packed(work / "packed", plan)
        print(f"[synthetic packed set: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    hydra_dir = work / "runs"

    # 1. the real training CLI, one batch of each stage
    def fast_dev_run() -> Row:
        model = "vrn_unguided" if not plan.model.endswith("tiny") else plan.model
        args = [
            "-m",
            "vrn.train",
            f"model={model}",
            f"trainer={'gpu' if cuda else 'cpu'}",
            "trainer.fast_dev_run=true",
            "data=folder",
            f"data.root={packed}",
            f"data.batch_size={plan.batches[0]}",
            "data.num_workers=2",
            "logger=none",
            f"hydra.run.dir={hydra_dir / 'fast_dev_run'}",
        ]
        log = work / "fast_dev_run.log"
        wall, rc, last = run_cli(args, budget.left(), log)
        return _cli_row("fast_dev_run", wall, rc, last, log, batch=plan.batches[0], note=f"{model}, exit 0")

    jobs["fast_dev_run"] = fast_dev_run

    # 2. training throughput variants
    batches: dict[int, dict[str, Any]] = {}  # one device batch per size, built by its first row
    for variant, (bf16, cl, comp) in VARIANTS.items():
        for b in plan.batches:
            name = f"train {variant} bs{b}"

            def measure(name: str = name, b: int = b, bf16: bool = bf16, cl: bool = cl, comp: bool = comp) -> Row:
                # on a CPU --quick run the eager backend exercises torch.compile's path without a C++ build
                backend = "inductor" if cuda else "eager"
                t0 = time.perf_counter()
                if b not in batches:
                    batches[b] = device_batch(packed, b, device, plan.train_crop)
                sps, peak = train_throughput(
                    plan.model, batches[b], device, bf16, cl, comp, plan.steps, plan.warmup, backend
                )
                note = plan.model + (f", {plan.train_crop} px centre crop" if plan.train_crop else "")
                note += f", compile backend={backend}" if comp else ""
                return Row(name, b, sps, peak, time.perf_counter() - t0, note)

            jobs[name] = measure

    # 3. DataLoader feed rate
    for w in plan.workers:
        name = f"dataloader workers={w}"

        def feed(w: int = w, name: str = name) -> Row:
            t0 = time.perf_counter()
            sps = loader_rate(packed, plan.batches[-1], w, device, plan.loader_batches)
            return Row(name, plan.batches[-1], sps, None, time.perf_counter() - t0, "augmentation on, to device")

        jobs[name] = feed

    # 4. the batched demo
    def demo() -> Row:
        photos = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if plan.demo_images is not None:
            photos = [p for p in photos if p.name == "AFLW_image00046.jpg"] or photos[: plan.demo_images]
        src = work / "demo_in"
        src.mkdir(exist_ok=True)
        for p in photos:
            (src / p.name).unlink(missing_ok=True)
            (src / p.name).symlink_to(p.resolve())
        out = work / "demo_out"
        args = [
            "-m",
            "vrn.demo",
            f"input={src}",
            f"output_dir={out}",
            f"device={'cuda' if cuda else 'cpu'}",
            f"precision={'bf16' if cuda else '32'}",
            "detector=tddfa",
            f"batch_size={8 if cuda else 2}",
            f"num_workers={4 if cuda else 0}",
            f"post_threads={4 if cuda else 0}",
            "turntable=false",
            "formats=[ply]",
            f"hydra.run.dir={hydra_dir / 'demo'}",
        ]
        log = work / "demo.log"
        wall, rc, last = run_cli(args, budget.left(), log)
        faces = len(list(out.rglob("*.ply"))) if out.is_dir() else 0
        return _cli_row(
            "demo batched",
            wall,
            rc,
            last,
            log,
            samples_per_s=faces / wall if wall > 0 else None,
            note=f"{len(photos)} photos, {faces} faces (faces/s incl. start-up)",
        )

    jobs["demo batched"] = demo

    # 5. real faces, the AFLW experiment
    def aflw_real() -> Row:
        if aflw is None:
            return Row("aflw_real", note="skipped: no --aflw DIR")
        bs = 16 if cuda else plan.batches[0]
        args = [
            "-m",
            "vrn.train",
            "experiment=aflw_real",
            f"model={'vrn_unguided' if cuda else plan.model}",
            f"trainer={'gpu' if cuda else 'cpu'}",
            *(["trainer.precision=bf16-mixed"] if cuda else []),
            f"data.root={aflw}",
            f"data.batch_size={bs}",
            f"data.num_workers={8 if cuda else 0}",
            f"trainer.max_steps={aflw_steps}",
            "trainer.max_time=null",
            "trainer.limit_val_batches=0",
            "logger=none",
            "callbacks=none",
            f"hydra.run.dir={hydra_dir / 'aflw_real'}",
        ]
        log = work / "aflw_real.log"
        wall, rc, last = run_cli(args, budget.left(), log)
        return _cli_row(
            "aflw_real",
            wall,
            rc,
            last,
            log,
            batch=bs,
            samples_per_s=aflw_steps * bs / wall,
            note=f"{aflw_steps} steps, samples/s incl. start-up",
        )

    jobs["aflw_real"] = aflw_real

    # run order: the torch.compile rows (minutes of compilation on a GPU) after every other
    # measurement but the optional AFLW run, so a spent budget skips the fewest rows
    names = row_names(plan)
    assert list(jobs) == names, (list(jobs), names)
    late = [n for n in names if "+compile" in n] + ["aflw_real"]
    for name in [n for n in names if n not in late] + late:
        if only is not None and only not in name:
            continue
        guarded(rows, name, budget, jobs[name])
        if cuda:
            torch.cuda.empty_cache()
    return sorted(rows, key=lambda r: names.index(r.name))


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| row | batch | samples/s | peak GPU mem (GiB) | wall (s) | note |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r.name} | {_num(r.batch, 'd')} | {_num(r.samples_per_s, '.3g')} | {_num(r.peak_mem_gib, '.2f')} | "
            f"{_num(r.wall_s, '.1f')} | {r.note.replace('|', '/')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny model and batches (the test suite's CPU run)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining rows after this many seconds")
    ap.add_argument("--packed", type=Path, default=None, help="a packed folder (default: generate a synthetic one)")
    ap.add_argument("--aflw", type=Path, default=None, help="a packed AFLW folder: adds the aflw_real timing row")
    ap.add_argument("--aflw-steps", type=int, default=300)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="photos for the demo row")
    ap.add_argument("--workers", default=None, help="DataLoader worker counts, e.g. 0,4,8")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--model", default=None, help="registered variant of the training rows (default: vrn_unguided)")
    ap.add_argument("--batches", default=None, help="the two batch sizes of the training rows, e.g. 4,16")
    ap.add_argument("--rows", default=None, help="run only the rows whose name contains this, e.g. 'train fp32'")
    ap.add_argument("--work", type=Path, default=None, help="folder for logs and outputs (default: a new temp folder)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"error: --device cuda but torch {torch.__version__} sees no CUDA device "
            f"(CUDA build: {torch.version.cuda}); install a CUDA build of torch or use --device cpu",
            file=sys.stderr,
        )
        return 2
    for what, p in (("--packed", args.packed), ("--aflw", args.aflw)):
        if p is not None and not (p / "meta.json").is_file():
            ap.error(f"{what} {p} is not a packed folder (no meta.json)")
    try:
        workers = tuple(int(w) for w in args.workers.split(",")) if args.workers else None
    except ValueError:
        ap.error(f"--workers must be comma-separated integers, got {args.workers!r}")
    device = torch.device(args.device)
    plan = Plan.make(args.quick, workers)
    if args.model:
        plan = replace(plan, model=args.model)
    if args.batches:
        try:
            b0, b1 = (int(b) for b in args.batches.split(","))
        except ValueError:
            ap.error(f"--batches must be two comma-separated integers, got {args.batches!r}")
        plan = replace(plan, batches=(b0, b1))
    budget = Budget(args.budget_s)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    info = machine_info(device)
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    work = args.work if args.work is not None else Path(tempfile.mkdtemp(prefix="vrn_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = run_check(device, plan, budget, work, args.packed, args.aflw, args.images, args.aflw_steps, args.rows)
    print()
    print(markdown_table(rows))
    print(f"\ntotal {budget.elapsed():.0f} s (budget {budget.seconds:.0f} s); logs and outputs in {work}")
    if args.json is not None:
        payload = {"command": command, "machine": info, "rows": [asdict(r) for r in rows]}
        atomic_write(args.json, json.dumps(payload, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

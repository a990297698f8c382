"""Prepare ``gpu_carry/`` for scripts/device_aflw_real.sh on a lent GPU machine without network
(64 MiB of files per call): the training set in parts, the wheels its image lacks, the Cython
kernel for its Python, and optional warm-start weights; prints what each call carries.

    python scripts/prepare_device_carry.py /data/aflw_vrn/packed --parts 2 --train 7600 --val 300 \\
        --python312 /path/to/python3.12-venv/bin/python [--init <ckpt>]

Then, per part K (docs/benchmarks.md, "Running the AFLW experiment on a rented device"):
call K < N-1: ``scripts/device_aflw_real.sh stage gpu_carry/pK``; last call: stage the last part,
then ``scripts/device_aflw_real.sh train ...``. ``--init pretrained`` is not needed: the shipped
model travels with the repository (``model.init_weights=pretrained``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vrn.checkpoint import load_network, save_network
from vrn.data.packed import write_subset

ROOT = Path(__file__).resolve().parents[1]
#: what the device image lacks of our dependencies (pure-Python wheels)
WHEELS = ("hydra-core==1.3.2", "omegaconf==2.3.0", "antlr4-python3-runtime==4.9.3")
#: the tool's limit per call
CALL_LIMIT = 64 * 2**20


def tree_bytes(path: Path) -> int:
    """Bytes of a file or of every file below a folder."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def repo_bytes() -> int:
    """Bytes of what a call always sends: the tracked files and the untracked ones git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return sum((ROOT / f).stat().st_size for f in out.decode().split("\0") if f and (ROOT / f).is_file())


def build_kernel(python312: str, out_dir: Path) -> Path:
    """The Cython rasteriser built by another Python (the device's version) from a clean copy."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(
            ROOT / "vrn" / "geometry", src / "vrn" / "geometry", ignore=shutil.ignore_patterns("*.so", "*.c")
        )
        shutil.copy(ROOT / "setup.py", src / "setup.py")
        subprocess.run([python312, "setup.py", "build_ext", "--inplace"], cwd=src, check=True, capture_output=True)
        (so,) = (src / "vrn" / "geometry").glob("_raster*.so")
        dest = out_dir / so.name
        shutil.copy(so, dest)
    subprocess.run(["strip", "--strip-debug", str(dest)], check=False)
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("packed", type=Path, help="the packed AFLW set (python -m data_pipeline.run --config-name aflw)")
    ap.add_argument("--out", type=Path, default=ROOT / "gpu_carry")
    ap.add_argument("--parts", type=int, default=2, help="one part per call")
    ap.add_argument("--train", type=int, default=7600)
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--jpeg-quality", type=int, default=85, help="re-encode the crops (0: copy the bytes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None, help="a checkpoint whose network weights start the run (slimmed)")
    ap.add_argument("--python312", default=None, help="a Python of the device's version with cython + numpy")
    ap.add_argument("--no-wheels", action="store_true", help="skip pip wheel (no network here)")
    ap.add_argument(
        "--manifest-fields",
        nargs="*",
        default=[],
        help="manifest fields kept besides id and split: 'landmarks' for the guided models (about 1.5 KB a row)",
    )
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    shared: list[Path] = []
    if not args.no_wheels:
        whl = out / "whl"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(whl), *WHEELS], check=True)
        shared.append(whl)
    if args.python312:
        shared.append(build_kernel(args.python312, out))
    if args.init:
        net, spec, layout = load_network(args.init)
        shared.append(save_network(out / "init" / "init.ckpt", net, spec, layout).parent)
    parts = []
    for k in range(args.parts):
        dst = out / f"p{k}"
        if dst.exists():
            shutil.rmtree(dst)
        parts.append(
            write_subset(
                args.packed,
                dst,
                {"train": args.train, "val": args.val},
                seed=args.seed,
                part=(k, args.parts),
                manifest_fields=tuple(args.manifest_fields),
                jpeg_quality=args.jpeg_quality or None,
            )
        )
    base = repo_bytes() + sum(tree_bytes(p) for p in shared)
    rel = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in shared]
    for k, part in enumerate(parts):
        total = base + tree_bytes(part)
        flag = "OK" if total < CALL_LIMIT else "OVER THE 64 MiB LIMIT: use more parts"
        carry = [str(part.relative_to(ROOT)) if part.is_relative_to(ROOT) else str(part), *rel]
        print(f"call {k + 1}: carry {carry}: {total / 2**20:.1f} MiB {flag}")


if __name__ == "__main__":
    main()

r"""Copy a random subset of a packed dataset, or merge packed folders (vrn.data.packed).

For carrying a training set to a machine with a size limit, e.g. a rented GPU that takes at
most 64 MiB of files per call. About 2,000 AFLW faces fit at ~20 KB each with their full
manifest rows; with ``--slim`` (manifest: id and split only) and ``--jpeg-quality 85`` a face
is ~14 KB. A larger set travels in disjoint parts, one per call, merged on the far side:

    python scripts/pack_subset.py /data/aflw_vrn/packed gpu_data/aflw_2k --train 2000 --val 160
    python scripts/pack_subset.py /data/aflw_vrn/packed gpu_data/p0 --train 12000 --val 400 \
        --part 0/3 --slim --jpeg-quality 85
    python scripts/pack_subset.py --merge /data/aflw_12k gpu_data/p0 gpu_data/p1 gpu_data/p2
"""

from __future__ import annotations

import argparse

from vrn.data.packed import PackedReader, merge_packed, write_subset


def _part(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--part takes K/N (e.g. 0/3), got {text!r}") from e
    return k, n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", nargs="?", help="packed folder to read")
    ap.add_argument("dst", nargs="?", help="packed folder to write (must not exist unless --overwrite)")
    ap.add_argument("--train", type=int, default=0, help="train samples to keep")
    ap.add_argument("--val", type=int, default=0, help="val samples to keep")
    ap.add_argument("--test", type=int, default=0, help="test samples to keep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--part", type=_part, default=None, help="K/N: write only the K-th (0-based) of N disjoint parts")
    ap.add_argument("--slim", action="store_true", help="manifest rows keep only id and split")
    ap.add_argument("--jpeg-quality", type=int, default=None, help="re-encode JPEG crops at this quality")
    ap.add_argument("--merge", nargs="+", metavar=("DST", "SRC"), help="write DST = the SRC folders concatenated")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.merge:
        if len(args.merge) < 2 or args.src or args.dst:
            ap.error("--merge takes DST SRC [SRC ...] and no positional src/dst")
        out = merge_packed(args.merge[1:], args.merge[0], overwrite=args.overwrite)
    else:
        if not (args.src and args.dst):
            ap.error("give src and dst (or --merge DST SRC ...)")
        counts = {s: n for s, n in (("train", args.train), ("val", args.val), ("test", args.test)) if n > 0}
        if not counts:
            ap.error("give at least one of --train / --val / --test")
        out = write_subset(
            args.src,
            args.dst,
            counts,
            seed=args.seed,
            overwrite=args.overwrite,
            part=args.part,
            manifest_fields=() if args.slim else None,
            jpeg_quality=args.jpeg_quality,
        )
    r = PackedReader(out)
    mb = (r.index[:, 1].sum() + r.index[:, 3].sum()) / 2**20
    print(f"{out}: {len(r)} samples {r.meta['splits']}, {mb:.1f} MiB")


if __name__ == "__main__":
    main()

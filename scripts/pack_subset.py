"""Copy a random subset of a packed dataset, bytes unchanged (vrn.data.packed.write_subset).

For carrying a training set to a machine with a size limit, e.g. a rented GPU that takes at
most 64 MiB of files (about 2,000 AFLW faces at ~20 KB each with their manifest rows, beside the 15 MB of model assets):

    python scripts/pack_subset.py /data/aflw_vrn/packed gpu_data/aflw_2k --train 2000 --val 160
"""

from __future__ import annotations

import argparse

from vrn.data.packed import PackedReader, write_subset


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="packed folder to read")
    ap.add_argument("dst", help="packed folder to write (must not exist unless --overwrite)")
    ap.add_argument("--train", type=int, default=0, help="train samples to keep")
    ap.add_argument("--val", type=int, default=0, help="val samples to keep")
    ap.add_argument("--test", type=int, default=0, help="test samples to keep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    counts = {s: n for s, n in (("train", args.train), ("val", args.val), ("test", args.test)) if n > 0}
    if not counts:
        ap.error("give at least one of --train / --val / --test")
    out = write_subset(args.src, args.dst, counts, seed=args.seed, overwrite=args.overwrite)
    r = PackedReader(out)
    mb = (r.index[:, 1].sum() + r.index[:, 3].sum()) / 2**20
    print(f"{out}: {len(r)} samples {r.meta['splits']}, {mb:.1f} MiB")


if __name__ == "__main__":
    main()

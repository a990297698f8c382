r"""Copy a packed dataset with the train/val split given by a list of ids (vrn.data.packed.resplit_packed).

The shipped AFLW model's stages before session 12 trained and were chosen on the split of the
first AFLW pack (pack version 1: a seeded shuffle of the sorted subjects, which a rebuild cannot
reproduce). Its 949 val ids are in ``docs/results/aflw_split_v1_val_ids.txt``; to continue that
model with a clean val split, rebuild the AFLW pack and move exactly those faces to val:

    python -m data_pipeline.run --config-name aflw input_dir=../shared/data/aflw_crops output_dir=/data/aflw_vrn
    python scripts/resplit_pack.py /data/aflw_vrn/packed /data/aflw_vrn/packed_v1split \
        --val-ids docs/results/aflw_split_v1_val_ids.txt

Every sample not listed goes to ``train`` (``--others``); listed ids missing from the pack are
reported and skipped. Bytes are copied unchanged; ``meta.json["resplit_of"]`` records the source.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vrn.data.packed import PackedReader, resplit_packed


def read_ids(path: Path) -> list[str]:
    """One sample id per line; blank lines and ``#`` comments skipped."""
    if not path.is_file():
        raise SystemExit(f"resplit_pack: {path}: no such file (one sample id per line)")
    return [s for line in path.read_text().splitlines() if (s := line.split("#", 1)[0].strip())]


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="packed folder to read")
    ap.add_argument("dst", type=Path, help="packed folder to write (must not exist unless --overwrite)")
    ap.add_argument("--val-ids", type=Path, required=True, help="text file: the ids of the val split, one per line")
    ap.add_argument("--others", default="train", help="split of every sample not listed (default train)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    ids = read_ids(args.val_ids)
    out = resplit_packed(args.src, args.dst, {i: "val" for i in ids}, default=args.others, overwrite=args.overwrite)
    written = PackedReader(out)  # the same samples as src: its ids say which listed ones were there
    have = {str(r["id"]) for r in written.rows}
    missing = [i for i in ids if i not in have]
    splits = written.meta.get("splits", {})
    print(f"{out}: {splits}; {len(ids) - len(missing)} of {len(ids)} listed ids found in {args.src}")
    if missing:
        print(f"  not in the pack (skipped): {len(missing)}, e.g. {', '.join(missing[:5])}")
    return out


if __name__ == "__main__":
    main()

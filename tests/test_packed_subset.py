"""write_subset / scripts/pack_subset.py: a smaller packed folder with the same bytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vrn.data.packed import PackedReader, write_subset

ROOT = Path(__file__).resolve().parents[1]


def test_subset_keeps_bytes_counts_and_layout(synthetic_packed, tmp_path):
    src = PackedReader(synthetic_packed)
    out = write_subset(synthetic_packed, tmp_path / "sub", {"train": 5, "val": 2}, seed=1)
    sub = PackedReader(out)
    assert sub.meta["splits"] == {"train": 5, "val": 2}
    assert sub.layout == src.layout and sub.meta["image_codec"] == src.meta["image_codec"]
    assert sub.meta["subset_of"]["seed"] == 1
    by_id = {row["id"]: i for i, row in enumerate(src.rows)}
    assert len({row["id"] for row in sub.rows}) == 7  # no sample twice
    for i, row in enumerate(sub.rows):
        ib, tb, _ = sub.encoded(i)
        ib0, tb0, row0 = src.encoded(by_id[row["id"]])
        assert row0["split"] == row["split"]
        assert np.array_equal(ib, ib0) and tb == tb0
        a, b = sub[i], src[by_id[row["id"]]]
        assert np.array_equal(a.image, b.image)
    # a different seed picks a different subset; asking for more than a split has keeps it whole
    other = PackedReader(write_subset(synthetic_packed, tmp_path / "sub2", {"train": 5, "val": 99}, seed=2))
    assert {r["id"] for r in other.rows if r["split"] == "train"} != {
        r["id"] for r in sub.rows if r["split"] == "train"
    }
    assert other.meta["splits"]["val"] == sum(r["split"] == "val" for r in src.rows)


def test_subset_unknown_split_and_cli(synthetic_packed, tmp_path):
    with pytest.raises(ValueError, match="no split 'holdout'"):
        write_subset(synthetic_packed, tmp_path / "bad", {"holdout": 3})
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "pack_subset.py"),
            str(synthetic_packed),
            str(tmp_path / "cli"),
            "--train",
            "3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "3 samples" in r.stdout
    assert PackedReader(tmp_path / "cli").meta["splits"] == {"train": 3}

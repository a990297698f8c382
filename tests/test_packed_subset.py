"""write_subset / merge_packed / scripts/pack_subset.py: smaller packed folders (same bytes, or
re-encoded), sent in parts and merged back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vrn.data.packed import PackedReader, PackedWriter, merge_packed, resplit_packed, write_subset
from vrn.volume.codec import from_bytes

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    """``python scripts/<name> args...`` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True, cwd=ROOT
    )


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
    r = _script("pack_subset.py", str(synthetic_packed), str(tmp_path / "cli"), "--train", "3")
    assert r.returncode == 0, r.stderr
    assert "3 samples" in r.stdout
    assert PackedReader(tmp_path / "cli").meta["splits"] == {"train": 3}


def _ids(root) -> list[str]:
    return [str(r["id"]) for r in PackedReader(root).rows]


def test_parts_are_disjoint_and_merge_back_to_the_subset(synthetic_packed, tmp_path):
    counts = {"train": 7, "val": 3}
    whole = write_subset(synthetic_packed, tmp_path / "whole", counts, seed=3)
    parts = [write_subset(synthetic_packed, tmp_path / f"p{k}", counts, seed=3, part=(k, 3)) for k in range(3)]
    sizes = [len(PackedReader(p)) for p in parts]
    assert sum(sizes) == 10 and max(sizes) - min(sizes) <= 2
    part_ids = [set(_ids(p)) for p in parts]
    assert not (part_ids[0] & part_ids[1]) and not (part_ids[1] & part_ids[2]) and not (part_ids[0] & part_ids[2])
    merged = merge_packed(parts, tmp_path / "merged")
    assert sorted(_ids(merged)) == sorted(_ids(whole))
    m, w = PackedReader(merged), PackedReader(whole)
    assert m.meta["splits"] == w.meta["splits"] == counts
    assert len(m.meta["merged_from"]) == 3 and m.meta["subset_of"]["part"] == [0, 3]
    by_id = {row["id"]: i for i, row in enumerate(w.rows)}
    for i, row in enumerate(m.rows):
        ib, tb, r = m.encoded(i)
        ib0, tb0, r0 = w.encoded(by_id[row["id"]])
        assert np.array_equal(ib, ib0) and tb == tb0 and r["split"] == r0["split"]
    with pytest.raises(ValueError, match="already in an earlier input"):
        merge_packed([parts[0], whole], tmp_path / "dup")
    assert not (tmp_path / "dup").exists() and not (tmp_path / "dup.partial").exists()
    with pytest.raises(ValueError, match="part must be"):
        write_subset(synthetic_packed, tmp_path / "bad", counts, part=(3, 3))


def test_slim_manifest_and_jpeg_reencoding(synthetic_packed, tmp_path):
    src = PackedReader(synthetic_packed)
    jpg = tmp_path / "jpg"
    with PackedWriter(jpg, image_codec=".jpg", jpeg_quality=98, layout=src.layout) as w:
        for i in range(4):
            s = src[i]
            _, tb, row = src.encoded(i)
            w.add(s.image, from_bytes(tb), {k: v for k, v in row.items() if k != "index"})
    slim = PackedReader(write_subset(jpg, tmp_path / "slim", {"train": 99}, manifest_fields=(), jpeg_quality=60))
    full = PackedReader(jpg, split="train")
    assert len(slim) == len(full) > 0
    assert all(set(r) == {"id", "split", "index"} for r in slim.rows)
    assert set(full.rows[0]) - {"id", "split", "index"}  # the source had more fields
    assert slim.meta["reencoded_jpeg_quality"] == 60
    assert slim.index[:, 1].sum() < full.index[:, 1].sum()  # smaller images
    for i in range(len(slim)):
        a, b = slim[i], full[i]
        assert slim.encoded(i)[1] == full.encoded(i)[1]  # targets copied unchanged
        assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() < 6  # lossy, but the same picture
    if src.meta.get("image_codec") != ".jpg":
        with pytest.raises(ValueError, match="JPEG folders only"):
            write_subset(synthetic_packed, tmp_path / "png_q", {"train": 2}, jpeg_quality=80)


def test_cli_parts_and_merge(synthetic_packed, tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return _script("pack_subset.py", *args)

    for k in range(2):
        r = cli(str(synthetic_packed), str(tmp_path / f"p{k}"), "--train", "6", "--part", f"{k}/2", "--slim")
        assert r.returncode == 0, r.stderr
        assert "3 samples" in r.stdout
    r = cli("--merge", str(tmp_path / "all"), str(tmp_path / "p0"), str(tmp_path / "p1"))
    assert r.returncode == 0, r.stderr
    assert "6 samples" in r.stdout and len(set(_ids(tmp_path / "all"))) == 6
    r = cli(str(synthetic_packed), str(tmp_path / "x"), "--train", "2", "--part", "two")
    assert r.returncode != 0 and "--part takes K/N" in r.stderr


def test_merge_refuses_different_layouts(synthetic_packed, tmp_path):
    import json

    a = write_subset(synthetic_packed, tmp_path / "a", {"train": 2}, seed=1, part=(0, 2))
    b = write_subset(synthetic_packed, tmp_path / "b", {"train": 2}, seed=1, part=(1, 2))
    meta = json.loads((b / "meta.json").read_text())
    meta["layout"]["depth_factor"] = 1.0  # another volume layout
    (b / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="layouts and image codecs must match"):
        merge_packed([a, b], tmp_path / "ab")
    assert not (tmp_path / "ab").exists() and not (tmp_path / "ab.partial").exists()
    with pytest.raises(ValueError, match="at least one"):
        merge_packed([], tmp_path / "none")


def test_resplit_moves_exactly_the_listed_ids(synthetic_packed, tmp_path):
    src = PackedReader(synthetic_packed)
    ids = [str(r["id"]) for r in src.rows]
    chosen = [ids[0], ids[5], ids[-1]]  # whatever their splits were
    out = resplit_packed(synthetic_packed, tmp_path / "re", {i: "val" for i in chosen})
    re = PackedReader(out)
    assert re.meta["splits"] == {"train": len(ids) - 3, "val": 3}
    assert [str(r["id"]) for r in re.rows] == ids  # same order, same samples
    assert {str(r["id"]) for r in re.rows if r["split"] == "val"} == set(chosen)
    new = ["val" if i in chosen else "train" for i in ids]
    moved = sum(r["split"] != n for r, n in zip(src.rows, new, strict=True))
    assert re.meta["resplit_of"]["moved"] == moved and re.meta["resplit_of"]["listed"] == 3
    for i in range(len(ids)):
        ib, tb, row = re.encoded(i)
        ib0, tb0, row0 = src.encoded(i)
        assert np.array_equal(ib, ib0) and tb == tb0
        assert {k: v for k, v in row.items() if k != "split"} == {k: v for k, v in row0.items() if k != "split"}
    # every sample must be listed when there is no default
    with pytest.raises(ValueError, match="have no split"):
        resplit_packed(synthetic_packed, tmp_path / "strict", {ids[0]: "val"}, default=None)
    assert not (tmp_path / "strict").exists()


def test_resplit_cli_reads_an_id_file(synthetic_packed, tmp_path):
    ids = [str(r["id"]) for r in PackedReader(synthetic_packed).rows]
    f = tmp_path / "val_ids.txt"
    f.write_text(f"# val faces\n{ids[1]}\n\n{ids[2]}  # second\nnot_a_sample\n")
    r = _script("resplit_pack.py", str(synthetic_packed), str(tmp_path / "cli"), "--val-ids", str(f))
    assert r.returncode == 0, r.stderr
    assert "2 of 3 listed ids found" in r.stdout and "not_a_sample" in r.stdout
    assert PackedReader(tmp_path / "cli").meta["splits"] == {"train": len(ids) - 2, "val": 2}

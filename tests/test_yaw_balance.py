"""data.yaw_balance: the rarer |yaw| buckets' training rows repeated (vrn.data.datamodule.yaw_balanced_index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vrn.data.datamodule import PackedDataModule, VolumeDataset, yaw_balanced_index
from vrn.data.packed import PackedReader
from vrn.nme import yaw_bucket, yaw_from_rotation


def _yaw_rotation(yaw_deg: float) -> list[list[float]]:
    """A pure yaw in the crop frame (yaw_from_rotation reads asin(-R[2, 0]))."""
    a = np.radians(yaw_deg)
    c, s = np.cos(a), np.sin(a)
    return [[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]


def test_rarer_buckets_are_repeated_to_the_largest():
    rows = [{"id": f"f{i}", "yaw": 10.0 - i} for i in range(6)]  # [0, 30]: 6 rows
    rows += [{"id": f"m{i}", "rotation": _yaw_rotation(45.0 if i else -40.0)} for i in range(3)]  # (30, 60]: 3
    rows += [{"id": f"p{i}", "yaw": -75.0 + i} for i in range(2)]  # (60, 90]: 2
    assert yaw_from_rotation(np.array(_yaw_rotation(45.0))) == pytest.approx(45.0)
    idx = yaw_balanced_index(rows)
    counts = np.bincount(idx, minlength=len(rows))
    assert counts.tolist() == [1] * 6 + [2] * 3 + [3] * 2
    assert np.all(np.diff(idx) >= 0)  # row order kept; the sampler shuffles
    per_bucket = {}
    for i in idx:
        r = rows[i]
        yaw = r["yaw"] if "yaw" in r else yaw_from_rotation(np.array(r["rotation"]))
        per_bucket[yaw_bucket(yaw)] = per_bucket.get(yaw_bucket(yaw), 0) + 1
    assert per_bucket == {"[0, 30]": 6, "(30, 60]": 6, "(60, 90]": 6}


def test_bucket_weights_scale_each_buckets_share():
    rows = [{"id": f"f{i}", "yaw": 5.0} for i in range(8)]  # [0, 30]: 8 rows
    rows += [{"id": f"m{i}", "yaw": 40.0} for i in range(4)]  # (30, 60]: 4
    rows += [{"id": f"p{i}", "yaw": 80.0} for i in range(2)]  # (60, 90]: 2
    counts = np.bincount(yaw_balanced_index(rows, [1.0, 0.5, 2.0]), minlength=len(rows))
    # round(w * 8 / n): frontal 1, (30, 60] round(0.5 * 2) = 1, (60, 90] round(2 * 4) = 8
    assert counts.tolist() == [1] * 8 + [1] * 4 + [8] * 2
    assert np.array_equal(yaw_balanced_index(rows, [1, 1, 1]), yaw_balanced_index(rows))
    for bad in ([1.0, 1.0], [1.0, 0.0, 1.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(ValueError, match=r"data\.yaw_bucket_weights must be 3 positive numbers"):
            yaw_balanced_index(rows, bad)


def test_bucket_weights_need_yaw_balance(synthetic_packed):
    with pytest.raises(ValueError, match=r"yaw_bucket_weights only applies with data\.yaw_balance=true"):
        PackedDataModule(str(synthetic_packed), yaw_bucket_weights=[1, 1, 2])
    weights = [1, 1, 3]
    dm = PackedDataModule(str(synthetic_packed), batch_size=2, yaw_balance=True, yaw_bucket_weights=weights, augment={})
    dm.setup()
    rows = PackedReader(synthetic_packed, split="train").rows
    assert len(dm._sets["train"]) == len(yaw_balanced_index(rows, weights)) > len(yaw_balanced_index(rows))


def test_rows_without_a_pose_name_the_setting():
    with pytest.raises(ValueError, match=r"data\.yaw_balance.*'x1'"):
        yaw_balanced_index([{"id": "x0", "yaw": 3.0}, {"id": "x1"}])


def test_datamodule_balances_the_training_split_only(synthetic_packed):
    plain = PackedDataModule(str(synthetic_packed), batch_size=2)
    plain.setup()
    dm = PackedDataModule(str(synthetic_packed), batch_size=2, yaw_balance=True, augment={})
    dm.setup()
    train_rows = PackedReader(synthetic_packed, split="train").rows
    expected = yaw_balanced_index(train_rows)
    assert len(dm._sets["train"]) == len(expected)
    assert len(dm._sets["val"]) == len(plain._sets["val"]) and dm._sets["val"].rows is None
    ds = dm._sets["train"]
    repeated = np.flatnonzero(np.bincount(expected) > 1)
    assert len(repeated) and len(ds) > len(train_rows)  # the seeded synthetic yaws are not balanced
    r = int(repeated[0])
    first, second = np.flatnonzero(expected == r)[:2]
    assert ds[int(first)]["id"] == ds[int(second)]["id"] == train_rows[r]["id"]
    for j in (0, len(ds) - 1):
        assert ds[j]["id"] == train_rows[int(expected[j])]["id"]


def test_repeats_draw_their_own_augmentation(synthetic_packed):
    from vrn.data.augment import AugmentConfig

    reader = PackedReader(synthetic_packed, split="train")
    ds = VolumeDataset(reader, AugmentConfig(), seed=3, rows=np.array([0, 0, 1]))
    a, b = ds[0], ds[1]
    assert a["id"] == b["id"] and len(ds) == 3
    assert not torch.equal(a["image"], b["image"])
    with pytest.raises(ValueError, match="rows must index"):
        VolumeDataset(reader, rows=np.array([len(reader)]))

"""Resuming ``vrn.train`` from ``last.ckpt``: the same W&B run continues, the run record carries
over, and a run stopped at an epoch boundary and resumed ends with exactly the weights of an
uninterrupted run (deterministic CPU, augmentation on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tests.helpers import compose_config, tiny_train_overrides
from vrn.data.augment import AugmentConfig
from vrn.data.datamodule import VolumeDataset, collate_volumes
from vrn.data.epoch_sampling import EpochShuffleSampler
from vrn.data.packed import PackedReader
from vrn.train import train
from vrn.wandb_logging import CHECKPOINT_RUN_ID_KEY, run_id_from_checkpoint

#: 3 batches of 2 per epoch, augmentation on (the default), validation on 1 batch
_EPOCH_BATCHES = 3


def _overrides(packed: Path, logger: str, *extra: str) -> list[str]:
    return [
        *tiny_train_overrides(packed, logger),
        "trainer.accelerator=cpu",
        "trainer.deterministic=true",
        f"trainer.limit_train_batches={_EPOCH_BATCHES}",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.max_epochs=10",
        "test=false",
        "~callbacks.volume_preview",
        "~callbacks.progress_bar",
        *extra,
    ]


def _run(packed: Path, out: Path, logger: str, *extra: str) -> dict:
    torch.set_num_threads(1)
    cfg = compose_config("train", _overrides(packed, logger, *extra), output_dir=out)
    train(cfg)
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_resume_at_epoch_boundary_gives_the_same_weights(synthetic_packed, tmp_path):
    n = _EPOCH_BATCHES  # stop after one epoch's steps, resume to 2 epochs + 1 step
    full = _run(synthetic_packed, tmp_path / "full", "none", f"trainer.max_steps={2 * n + 1}")
    first = _run(synthetic_packed, tmp_path / "first", "none", f"trainer.max_steps={n}")
    assert first["global_step"] == n
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = _run(
        synthetic_packed, tmp_path / "resumed", "none", f"trainer.max_steps={2 * n + 1}", f"ckpt_path={last}"
    )
    assert resumed["global_step"] == full["global_step"] == 2 * n + 1
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for k, w in full["state_dict"].items():
        assert torch.equal(w, resumed["state_dict"][k]), f"{k} differs after resume"
    # the interrupted part moved the weights: the equality above is not trivially true
    assert any(not torch.equal(w, first["state_dict"][k]) for k, w in full["state_dict"].items())
    # the run record of the resumed run covers the whole training (history kept in the checkpoint)
    rows = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    full_rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][:2] == [n, 2 * n]
    # throughput is wall-clock: every row has it, but it differs between runs
    assert all(r["train/samples_per_sec"] > 0 and r["train/wall_s"] > 0 for r in full_rows)
    assert full_rows[1]["train/wall_s"] > full_rows[0]["train/wall_s"]

    def no_timing(rs: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("train/samples_per_sec", "train/wall_s")} for r in rs]

    assert no_timing(rows) == no_timing(full_rows)
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["metric"] == "val/iou" and summary["validations"] == 2
    assert summary["final"]["step"] == 2 * n


@pytest.mark.slow
@pytest.mark.parametrize("saved_at", ["stop", "batch_end"])
def test_resume_mid_epoch_gives_the_same_weights(synthetic_packed, tmp_path, saved_at):
    """``stop``: max_steps=1 ends training after batch 1 of 3 (last.ckpt at that stop);
    ``batch_end``: a checkpoint written after batch 1 inside a longer run (as every_n_train_steps
    and SIGTERM write them)."""
    n = _EPOCH_BATCHES
    full = _run(synthetic_packed, tmp_path / "full", "none", f"trainer.max_steps={n + 2}")
    if saved_at == "stop":
        first = _run(synthetic_packed, tmp_path / "first", "none", "trainer.max_steps=1")  # 1 of 3 batches
        ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    else:
        every_step = (
            "+callbacks.every_step={_target_: pytorch_lightning.callbacks.ModelCheckpoint, "
            f"dirpath: '{tmp_path / 'steps'}', filename: 'step{{step}}', every_n_train_steps: 1, save_top_k: -1, "
            "auto_insert_metric_name: false}"
        )
        _run(synthetic_packed, tmp_path / "first", "none", "trainer.max_steps=2", every_step)
        ckpt = tmp_path / "steps" / "step1.ckpt"
        first = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert first["global_step"] == 1
    assert first["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 1}]
    resumed = _run(synthetic_packed, tmp_path / "resumed", "none", f"trainer.max_steps={n + 2}", f"ckpt_path={ckpt}")
    assert resumed["global_step"] == full["global_step"] == n + 2
    for k, w in full["state_dict"].items():
        assert torch.equal(w, resumed["state_dict"][k]), f"{k} differs after a mid-epoch resume"


@pytest.mark.slow
def test_resume_continues_the_wandb_run(synthetic_packed, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = _run(synthetic_packed, tmp_path / "a", "wandb", "trainer.max_epochs=1", "trainer.limit_train_batches=1")
    runs_a = list((tmp_path / "a" / "wandb").glob("offline-run-*"))
    assert len(runs_a) == 1
    run_id = runs_a[0].name.rsplit("-", 1)[-1]
    assert first[CHECKPOINT_RUN_ID_KEY] == run_id
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert run_id_from_checkpoint(last) == run_id
    second = _run(
        synthetic_packed,
        tmp_path / "b",
        "wandb",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=1",
        f"ckpt_path={last}",
    )
    runs_b = list((tmp_path / "b" / "wandb").glob("offline-run-*"))
    assert len(runs_b) == 1
    assert runs_b[0].name.rsplit("-", 1)[-1] == run_id  # the same W&B run, continued
    assert second[CHECKPOINT_RUN_ID_KEY] == run_id and second["global_step"] == 2


def test_a_fresh_run_gets_a_new_wandb_run_id(tmp_path):
    assert run_id_from_checkpoint(None) is None
    p = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0}, p)
    assert run_id_from_checkpoint(p) is None


def test_epoch_sampler_order_depends_only_on_seed_and_epoch(synthetic_packed):
    ds = VolumeDataset(PackedReader(synthetic_packed, split="train"))
    epochs = iter([0, 1, 1])
    a = EpochShuffleSampler(ds, seed=3, epoch_fn=lambda: next(epochs))
    order0, order1, order1_again = list(a), list(a), list(a)
    b = EpochShuffleSampler(ds, seed=3)
    b.set_epoch(1)
    assert order1 == order1_again == list(b)
    assert order0 != order1 and sorted(order0) == list(range(len(ds)))
    assert ds.epoch_clock.get() == 1  # the dataset augments with the sampler's epoch
    c = EpochShuffleSampler(ds, seed=4)
    c.set_epoch(1)
    assert list(c) != order1


def test_workers_augment_with_the_samplers_epoch(synthetic_packed):
    """Persistent DataLoader workers see each new epoch (shared-memory clock): the batches they
    produce equal the dataset's own items for (seed, epoch, index), and differ between epochs."""
    ds = VolumeDataset(PackedReader(synthetic_packed, split="train"), AugmentConfig(), seed=9)
    sampler = EpochShuffleSampler(ds, seed=9)
    loader = DataLoader(
        ds, batch_size=4, sampler=sampler, num_workers=1, persistent_workers=True, collate_fn=collate_volumes
    )
    firsts = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        batch = next(iter(loader))
        ds.epoch_clock.set(epoch)
        expected = torch.stack([ds[i]["image"] for i in order[:4]])
        assert torch.equal(batch["image"], expected)
        firsts.append((order[0], batch["image"][0]))
    ds.epoch_clock.set(1)
    again = ds[firsts[0][0]]["image"]
    assert not torch.equal(again, firsts[0][1])  # the same sample is augmented anew in epoch 1


@pytest.mark.parametrize("num_replicas", [2, 3])
def test_epoch_sampler_shards_cover_the_set(synthetic_packed, num_replicas):
    ds = VolumeDataset(PackedReader(synthetic_packed, split="train"))
    shards = []
    for rank in range(num_replicas):
        s = EpochShuffleSampler(ds, seed=5, num_replicas=num_replicas, rank=rank)
        s.set_epoch(2)
        shards.append(list(s))
    assert len({len(x) for x in shards}) == 1
    assert set().union(*shards) == set(range(len(ds)))


def test_batch_len_counts_samples_in_nested_batches():
    from vrn.callbacks import _batch_len

    x = torch.zeros(5, 3)
    assert _batch_len(x) == 5
    assert _batch_len({"id": ["a"] * 5, "image": x}) == 5  # strings skipped, the tensor counts
    assert _batch_len([{"code": torch.zeros(7, 2)}, x]) == 7
    assert _batch_len({"meta": "none"}) == 0

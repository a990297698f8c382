"""DDP that is correct: epoch metrics reduced across ranks, val/test sharded without padding,
one checkpoint set / W&B run / folder per job, and Hydra multirun x DDP (CPU, gloo, 2 processes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import hydra
import pytest
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

from tests.helpers import compose_config, tiny_train_overrides
from vrn.builders import build_trainer, resolve_precision
from vrn.cli_errors import UserError
from vrn.data.sharding import ContiguousShardSampler, eval_shard_sampler, shard_bounds
from vrn.ddp_jobs import _DDP_LAUNCH_ENV
from vrn.ddp_jobs import ddp_children_run_this_job as _ddp_children_run_this_job
from vrn.ddp_jobs import end_ddp_job as _end_ddp_job
from vrn.metrics import GlobalVoxelIoU, SumRatio, front_depth_error_sums, voxel_counts, voxel_iou

ROOT = Path(__file__).resolve().parents[1]


class RankMetricsReport(pl.Callback):
    """Test probe: each rank appends its val / test metrics to ``<out_dir>/rank<r>.jsonl``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def _write(self, trainer: pl.Trainer, stage: str) -> None:
        if trainer.sanity_checking:
            return
        rec = {"rank": trainer.global_rank, "world_size": trainer.world_size, "stage": stage}
        rec["epoch"] = trainer.current_epoch
        rec.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, "test")


def _reports(folder: Path) -> dict[int, list[dict[str, Any]]]:
    return {
        int(p.stem[4:]): [json.loads(line) for line in p.read_text().splitlines()]
        for p in sorted(folder.glob("rank*.jsonl"))
    }


# ---- metric reduction and sharding, no processes ------------------------------------------


def _volumes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random (D, H, W) = (12, 6, 5) prediction / target occupancies of different fill rates."""
    g = torch.Generator().manual_seed(seed)
    fill = torch.linspace(0.05, 0.6, n).view(n, 1, 1, 1)
    pred = torch.rand(n, 12, 6, 5, generator=g) < fill
    target = torch.rand(n, 12, 6, 5, generator=g) < 0.3
    return pred, target


def test_epoch_metrics_summed_over_uneven_shards_equal_one_process():
    pred, target = _volumes(7)
    whole = {"iou": GlobalVoxelIoU(), "mae": SumRatio()}
    whole["iou"].update(pred, target)
    whole["mae"].update(*front_depth_error_sums(pred, target))
    # two "ranks" with 3 and 4 samples, rank 1 in batches of 3 + 1; then the DDP reduction of the states
    ranks = [{"iou": GlobalVoxelIoU(), "mae": SumRatio()} for _ in range(2)]
    for r, batches in enumerate([[slice(0, 3)], [slice(3, 6), slice(6, 7)]]):
        for b in batches:
            ranks[r]["iou"].update(pred[b], target[b])
            ranks[r]["mae"].update(*front_depth_error_sums(pred[b], target[b]))
    for name in ("iou", "mae"):
        ranks[0][name].merge_state(ranks[1][name])  # the reduction dist_reduce_fx declares (sum)
        assert abs(float(ranks[0][name].compute()) - float(whole[name].compute())) < 1e-6
    # definition: global intersection / global union, not the mean of per-sample IoUs
    inter, union = voxel_counts(pred, target)
    assert abs(float(whole["iou"].compute()) - float(inter.sum() / union.sum())) < 1e-6
    assert abs(float(whole["iou"].compute()) - float(voxel_iou(pred, target).mean())) > 1e-3
    # depth MAE: mean over all pixels where both have a surface (pixel-weighted)
    err, n = front_depth_error_sums(pred, target)
    assert abs(float(whole["mae"].compute()) - float(err.sum() / n.sum())) < 1e-6


def test_loss_is_a_sample_weighted_mean_across_uneven_ranks():
    per_sample = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    rank0, rank1 = SumRatio(), SumRatio()
    rank0.update(per_sample[:2].mean() * 2, 2)  # one batch of 2
    rank1.update(per_sample[2:4].mean() * 2, 2)  # a batch of 2 and a last batch of 1
    rank1.update(per_sample[4:].mean() * 1, 1)
    rank0.merge_state(rank1)
    assert abs(float(rank0.compute()) - float(per_sample.mean())) < 1e-6
    # the mean of per-rank means would weigh rank 0's two samples as much as rank 1's three
    assert abs((per_sample[:2].mean() + per_sample[2:].mean()) / 2 - per_sample.mean()) > 1e-3


def test_empty_epoch_values():
    iou, ratio = GlobalVoxelIoU(), SumRatio()
    empty = torch.zeros(2, 4, 3, 3, dtype=torch.bool)
    iou.update(empty, empty)
    assert float(iou.compute()) == 1.0  # both volumes empty: perfect
    assert math.isnan(float(ratio.compute()))


@pytest.mark.parametrize("n, world", [(4, 2), (5, 2), (7, 3), (3, 3)])
def test_contiguous_shards_cover_every_sample_once(n, world):
    shards = [list(ContiguousShardSampler(range(n), world, r)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))  # each sample exactly once, no padding
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(ContiguousShardSampler(range(n), world, r)) for r in range(world)] == list(map(len, shards))
    assert shard_bounds(n, world, 0)[0] == 0 and shard_bounds(n, world, world - 1)[1] == n


def test_shard_sampler_rejects_fewer_samples_than_ranks_and_is_off_in_one_process():
    with pytest.raises(ValueError, match="fewer than the 3 DDP processes"):
        ContiguousShardSampler(range(2), 3, 0, "split 'val'")

    class _Trainer:
        world_size, global_rank = 1, 0

    assert eval_shard_sampler(range(4), _Trainer()) is None
    assert eval_shard_sampler(range(4), None) is None
    _Trainer.world_size, _Trainer.global_rank = 2, 1
    assert list(eval_shard_sampler(range(5), _Trainer())) == [2, 3, 4]


def test_ddp_configs_and_auto_mixed_precision(tmp_path, monkeypatch):
    cpu = compose_config("train", ["trainer=ddp_cpu"], output_dir=tmp_path).trainer
    assert (cpu.accelerator, cpu.devices, cpu.strategy, cpu.sync_batchnorm, cpu.precision) == (
        "cpu",
        2,
        "ddp",
        False,
        "32-true",
    )
    gpu = compose_config("train", ["trainer=ddp"], output_dir=tmp_path).trainer
    assert gpu.strategy == "ddp" and gpu.sync_batchnorm and gpu.precision == "auto-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision(gpu).precision == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision(gpu).precision == "16-mixed"
    assert resolve_precision(OmegaConf.merge(gpu, {"precision": "32-true"})).precision == "32-true"
    assert resolve_precision(OmegaConf.merge(gpu, {"accelerator": "cpu"})).precision == "32-true"


def test_cpu_bf16_falls_back_to_fp32_without_native_bf16(tmp_path, monkeypatch, caplog):
    cpu = compose_config("train", ["trainer=cpu_bf16"], output_dir=tmp_path).trainer
    assert (cpu.accelerator, cpu.precision) == ("cpu", "bf16-mixed")
    monkeypatch.setattr("vrn.builders.cpu_has_native_bf16", lambda: True)
    assert resolve_precision(cpu).precision == "bf16-mixed"
    monkeypatch.setattr("vrn.builders.cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="vrn.builders"):
        assert resolve_precision(cpu).precision == "32-true"
    assert "no native bfloat16" in caplog.text and "trainer.precision=32" in caplog.text
    # a GPU run keeps it: the CPU's bf16 does not matter there
    assert resolve_precision(OmegaConf.merge(cpu, {"accelerator": "gpu"})).precision == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("vrn.builders.cuda_device_count", lambda: 0)
    assert resolve_precision(OmegaConf.merge(cpu, {"accelerator": "auto"})).precision == "32-true"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_ddp_without_gpu_stops_with_one_line(tmp_path):
    """A DDP config without GPUs is pointed at CPU DDP too; a one-GPU config only at trainer=cpu."""
    cfg = compose_config("train", ["trainer=ddp"], output_dir=tmp_path)
    with pytest.raises(UserError, match="no CUDA GPU is available.*trainer=cpu.*trainer=ddp_cpu") as e:
        build_trainer(cfg.trainer)
    assert "\n" not in str(e.value)
    # devices > 1 alone (strategy auto) is DDP as well
    two = OmegaConf.merge(cfg.trainer, {"strategy": "auto", "devices": 2})
    with pytest.raises(UserError, match="trainer=ddp_cpu"):
        build_trainer(two)
    one = OmegaConf.merge(cfg.trainer, {"strategy": "auto", "devices": 1})
    with pytest.raises(UserError, match="no CUDA GPU is available.*trainer=cpu") as e:
        build_trainer(one)
    assert "ddp_cpu" not in str(e.value)


def test_multirun_job_gives_children_a_single_run_and_leaves_no_ddp_state(tmp_path, monkeypatch):
    compose_config("train", ["model.optimizer.lr=1e-4", "trainer=ddp_cpu"], output_dir=tmp_path)
    hc = HydraConfig.get()
    with read_write(hc), open_dict(hc):
        hc.mode = RunMode.MULTIRUN
        hc.runtime.output_dir = str(tmp_path / "sweep" / "3")
    sweep_argv = ["vrn/train.py", "-m", "model.optimizer.lr=1e-4,3e-4", "trainer=ddp_cpu"]
    monkeypatch.setattr(sys, "argv", list(sweep_argv))
    for key in _DDP_LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    try:
        before = _ddp_children_run_this_job()
        # what Lightning re-runs for rank 1: this job only, in this job's folder
        assert sys.argv == ["vrn/train.py", "model.optimizer.lr=1e-4", "trainer=ddp_cpu"]
        assert HydraConfig.get().run.dir == str(tmp_path / "sweep" / "3")
        os.environ.update(LOCAL_RANK="0", WORLD_SIZE="2", NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
        _end_ddp_job(None, before)
        assert [k for k in _DDP_LAUNCH_ENV if k in os.environ] == []  # the next job launches its own ranks
        assert sys.argv == sweep_argv
    finally:  # later tests in this process see a plain run again
        with read_write(hc), open_dict(hc):
            hc.mode = RunMode.RUN


# ---- real DDP runs: 2 CPU processes (gloo) ---------------------------------------------


@pytest.fixture(scope="module")
def uneven_packed(tmp_path_factory) -> Path:
    """A packed dataset whose val (5) and test (3) splits do not divide over 2 ranks: Lightning's
    padding sampler would count one sample twice, so exact metrics need the sharding sampler."""
    from vrn.data.synthetic import SyntheticFaceConfig, generate_packed

    root = tmp_path_factory.mktemp("uneven") / "packed"
    generate_packed(root, SyntheticFaceConfig(), {"train": 8, "val": 5, "test": 3}, seed=7, progress=False)
    return root


def _ddp_overrides(packed: Path, logger: str) -> list[str]:
    """2 epochs of 2 train batches (of 2) on 2 ranks, full val / test splits. ``prior_occupancy=0.5``
    and a small lr: predictions stay mixed, so IoU is not a trivial 0."""
    return [
        *tiny_train_overrides(packed, logger),
        "trainer=ddp_cpu",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.num_sanity_val_steps=0",
        "+model.net.prior_occupancy=0.5",
        "model.optimizer.lr=1e-5",
        "data/augment=none",
        "+callbacks.rank_report._target_=tests.test_ddp.RankMetricsReport",
        "+callbacks.rank_report.out_dir=${paths.output_dir}/rank_reports",
    ]


def _run_train(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": "",
        "NETRC": str(tmp_path / "no-netrc"),
        "VRN_ROOT": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "vrn.train", *args, f"paths.log_dir={tmp_path / 'logs'}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _single_process(packed: Path, tmp_path: Path, ckpt: Path) -> dict[str, float]:
    """val/* and test/* of ``ckpt`` on the whole val / test split, in one process."""
    ddp_only = ("trainer=", "+callbacks.")
    overrides = [o for o in _ddp_overrides(packed, "none") if not o.startswith(ddp_only)]
    overrides += ["trainer=cpu", "callbacks=none"]
    cfg = compose_config("train", overrides, output_dir=tmp_path / "single")
    dm = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    trainer = build_trainer(cfg.trainer, callbacks=[], logger=False)
    out = trainer.validate(model, datamodule=dm, ckpt_path=str(ckpt), weights_only=False, verbose=False)[0]
    out.update(trainer.test(model, datamodule=dm, ckpt_path=str(ckpt), weights_only=False, verbose=False)[0])
    return out


@pytest.mark.slow
def test_ddp_fit_and_test_on_two_cpu_processes(uneven_packed, tmp_path):
    run_dir = tmp_path / "logs" / "run"
    _run_train([*_ddp_overrides(uneven_packed, "wandb"), f"hydra.run.dir={run_dir}"], tmp_path)
    # one output folder (children write in the parent's, no extra run folders, no second .hydra)
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["run"]
    assert sorted(p.name for p in run_dir.glob("**/.hydra")) == [".hydra"]
    # exactly one checkpoint set: one best file + last.ckpt
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(ckpts) == 2 and "last.ckpt" in ckpts, ckpts
    best = next(run_dir / "checkpoints" / n for n in ckpts if n != "last.ckpt")
    # one W&B run
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    # every rank got the same, reduced, metrics
    reports = _reports(run_dir / "rank_reports")
    assert sorted(reports) == [0, 1] and all(r["world_size"] == 2 for r in reports[0])
    assert reports[0] == [{**r, "rank": 0} for r in reports[1]]
    val = [r for r in reports[0] if r["stage"] == "val"]
    test = [r for r in reports[0] if r["stage"] == "test"]
    assert len(val) == 2 and len(test) == 1
    best_epoch = int(best.name.split("_")[1].split("-")[0])
    assert best.name.endswith(f"iou_{val[best_epoch]['val/iou']:.4f}.ckpt")
    # ... equal to one process validating / testing the best checkpoint on the whole split
    single = _single_process(uneven_packed, tmp_path, best)
    assert 0.01 < single["val/iou"] < 0.99  # a non-trivial value
    for key in ("val/iou", "val/loss", "val/depth_mae"):
        assert abs(val[best_epoch][key] - single[key]) < 1e-6, (key, val[best_epoch][key], single[key])
    for key in ("test/iou", "test/loss", "test/depth_mae"):
        assert abs(test[0][key] - single[key]) < 1e-6, (key, test[0][key], single[key])
    print("DDP vs one process:", {k: (val[best_epoch].get(k, test[0].get(k)), v) for k, v in single.items()})


@pytest.mark.slow
def test_multirun_of_ddp_jobs(synthetic_packed, tmp_path):
    sweep = tmp_path / "logs" / "sweep"
    args = ["-m", *_ddp_overrides(synthetic_packed, "many"), "model.optimizer.lr=1e-4,3e-4", "test=false"]
    args += [f"hydra.sweep.dir={sweep}", "trainer.max_epochs=1"]
    out = _run_train(args, tmp_path)
    # two jobs, no sweep started again by a child rank, nothing outside the sweep folder
    assert (out.stdout + out.stderr).count("Launching 2 jobs") == 1
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["sweep"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    lrs = set()
    for job in (sweep / "0", sweep / "1"):
        assert sorted(p.name for p in job.glob("**/.hydra")) == [".hydra"]
        lrs.add(OmegaConf.load(job / ".hydra" / "config.yaml").model.optimizer.lr)
        # both ranks of this job ran in this job's folder, as one 2-process job
        reports = _reports(job / "rank_reports")
        assert sorted(reports) == [0, 1]
        assert all(r["world_size"] == 2 for rs in reports.values() for r in rs)
        assert reports[0][0]["val/iou"] == reports[1][0]["val/iou"]
        # one W&B run and one metrics file per job
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1
        metrics = list(job.glob("csv/version_*/metrics.csv"))
        assert len(metrics) == 1 and "val/iou" in metrics[0].read_text().splitlines()[0]
    assert lrs == {1e-4, 3e-4}

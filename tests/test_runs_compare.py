"""Comparing runs: W&B groups / names / flat config / best summary of a multirun, the per-run
record (metrics.jsonl, summary.json) and ``python -m vrn.runs compare``."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from tests.helpers import tiny_train_overrides
from vrn.cli_errors import UserError
from vrn.runs import compare, find_runs, format_table, main, metric_mode, varying_overrides
from vrn.runs import load_run as load_run_folder
from vrn.wandb_logging import flatten_config, run_name_from_overrides, swept_keys

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# reading an offline W&B run (the .wandb file: LevelDB-style log of protobuf records)
# --------------------------------------------------------------------------------------


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a ``run-<id>.wandb`` file: 32 KiB blocks of chunks with a 7-byte header
    (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) after a 7-byte file header."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, block, parts, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 0:
            break
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            out.append(parts)
    return out


def _wandb_run_info(run_dir: Path) -> dict:
    """group, name, config (flat keys) and summary updates of an offline W&B run folder."""
    from wandb.proto import wandb_internal_pb2 as pb

    info: dict = {"config": {}, "summary": {}}
    (log,) = run_dir.glob("run-*.wandb")
    for raw in _wandb_records(log):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            info.update(id=rec.run.run_id, group=rec.run.run_group, name=rec.run.display_name)
        elif kind == "config":
            info["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "summary":
            info["summary"].update({u.key: json.loads(u.value_json) for u in rec.summary.update if u.key})
    return info


# --------------------------------------------------------------------------------------
# end to end: a 2-job multirun, then the comparison
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_multirun_groups_names_and_comparison(synthetic_packed, tmp_path):
    sweep = tmp_path / "sweep_a"
    env = {**os.environ, "WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc"), "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        "-m",
        "vrn.train",
        "-m",
        "model.optimizer.lr=1e-12,3e-3",
        *tiny_train_overrides(synthetic_packed, "wandb"),
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=2",
        "trainer.num_sanity_val_steps=0",
        "test=false",
        "~callbacks.volume_preview",
        # ranked by val loss: a dozen steps move the tiny model's loss (0.30 -> 0.28 at lr 3e-3,
        # flat at 1e-12) long before any voxel crosses 0.5 (val IoU 0 for both on some CPUs)
        "optimized_metric=val/loss",
        "callbacks.model_checkpoint.monitor=val/loss",
        "callbacks.model_checkpoint.mode=min",
        "callbacks.run_summary.mode=min",
        f"hydra.sweep.dir={sweep}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]

    # W&B: one group for the sweep, each job named by its swept override, config flat, best in the summary
    infos = [_wandb_run_info(next((sweep / j / "wandb").glob("offline-run-*"))) for j in ("0", "1")]
    assert [i["group"] for i in infos] == ["train-sweep_a", "train-sweep_a"]
    assert [i["name"] for i in infos] == ["lr=1e-12", "lr=0.003"]
    assert [i["config"]["model.optimizer.lr"] for i in infos] == [1e-12, 3e-3]
    assert "model" not in infos[0]["config"]  # flat, not nested
    for j, info in zip(("0", "1"), infos):
        summary = json.loads((sweep / j / "summary.json").read_text())
        assert summary["metric"] == "val/loss" and summary["mode"] == "min"
        assert info["summary"]["best/val_loss"] == pytest.approx(summary["best"]["value"])
        assert info["summary"]["best/epoch"] == summary["best"]["epoch"]
        assert info["summary"]["best/step"] == summary["best"]["step"]

    # the per-run record: one line per validation
    rows = [json.loads(x) for x in (sweep / "1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [6, 12] and [r["epoch"] for r in rows] == [0, 1]
    best = {j: json.loads((sweep / j / "summary.json").read_text())["best"]["value"] for j in ("0", "1")}
    assert best["1"] < best["0"] - 0.005, best  # lr=3e-3 learns, lr=1e-12 does not move

    cmp = subprocess.run(
        [sys.executable, "-m", "vrn.runs", "compare", str(sweep)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    table = [ln for ln in cmp.stdout.splitlines() if ln.startswith("| ") and "rank" not in ln]
    assert len(table) == 2, cmp.stdout
    assert "model.optimizer.lr=0.003" in table[0] and "model.optimizer.lr=1e-12" in table[1]
    png = sweep / "comparison.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 300
        colours = len(set(im.convert("RGB").getdata()))
    assert colours > 50  # axes, text and two coloured curves, not a blank image


# --------------------------------------------------------------------------------------
# the comparison on hand-made run folders (fast)
# --------------------------------------------------------------------------------------


def _fake_run(folder: Path, overrides: list[str], vals: list[float | None], metric: str = "val/iou") -> Path:
    (folder / ".hydra").mkdir(parents=True)
    cfg = {
        "optimized_metric": metric,
        "callbacks": {"run_summary": {"monitor": metric, "mode": "max"}},
    }
    OmegaConf.save(OmegaConf.create(cfg), folder / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")
    lines = [
        json.dumps({"epoch": i, "step": 10 * (i + 1), metric: v, "val/loss": 1.0 - (v or 0)})
        for i, v in enumerate(vals)
    ]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_compare_ranks_best_first_and_plots(tmp_path):
    sweep = tmp_path / "multi"
    _fake_run(sweep / "0", ["model.optimizer.lr=1e-4", "data=folder"], [0.1, 0.2, 0.15])
    _fake_run(sweep / "1", ["model.optimizer.lr=1e-3", "data=folder"], [0.3, 0.5, 0.4])
    _fake_run(sweep / "2", ["model.optimizer.lr=1e-2", "data=folder"], [None, None])
    rows, metric, mode, png = compare([sweep])
    assert (metric, mode) == ("val/iou", "max")
    assert [r["run"] for r in rows] == ["1", "0", "2"]  # best first, no values last
    assert rows[0]["best"] == 0.5 and rows[0]["best_epoch"] == 1 and rows[0]["best_step"] == 20
    assert rows[0]["final"] == 0.4 and rows[2]["best"] is None
    assert [r["label"] for r in rows] == [
        "model.optimizer.lr=1e-3",
        "model.optimizer.lr=1e-4",
        "model.optimizer.lr=1e-2",
    ]
    assert png == sweep / "comparison.png" and Image.open(png).format == "PNG"
    table = format_table(rows, metric, mode).splitlines()
    assert len(table) == 5 and "0.5" in table[2] and table[4].count("-") >= 4
    # a lower-is-better metric ranks the other way
    rows, _, mode, _ = compare([sweep / "0", sweep / "1"], metric="val/loss", out=tmp_path / "loss.png")
    assert mode == "min" and [r["run"] for r in rows] == ["1", "0"] and (tmp_path / "loss.png").is_file()
    rows, _, _, _ = compare([sweep], mode="min", out=tmp_path / "min.png")
    assert [r["run"] for r in rows][:2] == ["0", "1"]


def test_compare_falls_back_to_the_csv_logger(tmp_path):
    run = tmp_path / "runs" / "2026-01-01_00-00-00"
    _fake_run(run, ["model.optimizer.lr=1e-3"], [])
    (run / "metrics.jsonl").unlink()
    csv_dir = run / "csv" / "version_0"
    csv_dir.mkdir(parents=True)
    (csv_dir / "metrics.csv").write_text(
        "epoch,step,train/loss,val/iou,val/loss\n0,4,0.5,,\n0,5,,0.25,0.7\n1,11,,0.35,0.6\n"
    )
    run_rec = load_run_folder(run)
    assert run_rec.curve("val/iou") == ([5, 11], [0.25, 0.35])
    rows, *_ = compare([tmp_path / "runs"], out=tmp_path / "c.png")
    assert rows[0]["best"] == 0.35 and rows[0]["best_epoch"] == 1


def test_compare_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no training run"):
        find_runs([tmp_path / "empty"])
    with pytest.raises(UserError, match="is not a folder"):
        find_runs([tmp_path / "missing"])
    _fake_run(tmp_path / "r", ["a=1"], [0.1])
    with pytest.raises(UserError, match="none of the 1 runs has values of val/nope"):
        compare([tmp_path / "r"], metric="val/nope")
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path / "empty")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vrn.runs: error:")


def test_varying_overrides_and_mode_rule(tmp_path):
    a = load_run_folder(_fake_run(tmp_path / "a", ["x.lr=1", "data=folder", "seed=1"], [0.1]))
    b = load_run_folder(_fake_run(tmp_path / "b", ["x.lr=2", "data=folder"], [0.1]))
    assert varying_overrides([a, b]) == ["x.lr", "seed"]
    assert varying_overrides([a]) == ["x.lr", "data", "seed"]
    assert (
        metric_mode("val/iou") == "max" and metric_mode("val/loss") == "min" and metric_mode("val/depth_mae") == "min"
    )
    cfg = OmegaConf.create({"callbacks": {"ck": {"monitor": "val/loss", "mode": "max"}}})
    assert metric_mode("val/loss", cfg) == "max"  # the run's own callback decides


# --------------------------------------------------------------------------------------
# naming rules
# --------------------------------------------------------------------------------------


def test_run_names_and_flat_config():
    assert swept_keys(["model.optimizer.lr=1e-4,3e-4", "data=folder", "seed=range(1,3)"]) == [
        "model.optimizer.lr",
        "seed",
    ]
    assert swept_keys(["a=1"], ["model.optimizer.lr"]) == ["model.optimizer.lr"]
    ov = ["model.optimizer.lr=0.003", "data=folder", "seed=2", "model.net.lr=5"]
    assert run_name_from_overrides(ov, ["model.optimizer.lr", "seed"]) == "lr=0.003,seed=2"
    # two keys ending alike are shown in full
    assert (
        run_name_from_overrides(ov, ["model.optimizer.lr", "model.net.lr"]) == "model.optimizer.lr=0.003,model.net.lr=5"
    )
    assert run_name_from_overrides(ov, ["nothing"]) == ""
    flat = flatten_config({"model": {"optimizer": {"lr": 1e-3}, "net": {}}, "tags": ["a"], "seed": 1})
    assert flat == {"model.optimizer.lr": 1e-3, "model.net": {}, "tags": ["a"], "seed": 1}

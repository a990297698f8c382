"""scripts/gpu_check.sh and scripts/bench_gpu.py: the prepared GPU check, run here on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import load_script
from vrn.conventions import DEPTH_BINS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bg():
    return load_script("bench_gpu")


def test_gpu_check_sh_parses_and_is_strict():
    sh = ROOT / "scripts" / "gpu_check.sh"
    proc = subprocess.run(["bash", "-n", str(sh)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = sh.read_text()
    assert "set -euo pipefail" in text
    assert 'pip install --quiet -e ".[dev]"' in text and "VRN_SKIP_INSTALL" in text
    assert "timeout " in text and "scripts/bench_gpu.py --device cuda" in text
    assert "${VRN_ASSETS_DIR:-../shared/assets}" in text


def test_centre_crop_batch_matches_full_targets(bg, synthetic_packed):
    from vrn.volume.codec import decode_torch

    cpu = torch.device("cpu")
    full = bg.device_batch(synthetic_packed, 3, cpu)
    crop = bg.device_batch(synthetic_packed, 3, cpu, crop=64)
    assert full["image"].shape == (3, 3, 192, 192) and crop["image"].shape == (3, 3, 64, 64)
    vf = decode_torch(full["lo"], full["hi"], full["extra"], 200)
    vc = decode_torch(crop["lo"], crop["hi"], crop["extra"], 200)
    assert vc.any()
    assert torch.equal(vf[..., 64:128, 64:128], vc)
    assert torch.equal(full["image"][..., 64:128, 64:128], crop["image"])


def test_a_failing_measurement_is_a_row(bg):
    rows = []
    budget = bg.Budget(60)

    def boom():
        raise RuntimeError("torch.compile is not available\nsecond line")

    bg.guarded(rows, "train x", budget, boom)
    bg.guarded(rows, "train y", bg.Budget(0), lambda: bg.Row("train y", 1, 2.0))
    assert rows[0].name == "train x" and rows[0].note.startswith("error: RuntimeError: torch.compile is not available")
    assert "\n" not in rows[0].note
    assert rows[1].note.startswith("skipped: time budget") and rows[1].samples_per_s is None
    table = bg.markdown_table(rows)
    assert table.count("\n") == 3 and "| train x |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_gpu_says_so():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 2
    assert "sees no CUDA device" in proc.stderr and "--device cpu" in proc.stderr


@pytest.mark.slow
def test_quick_cpu_run_prints_every_row(bg, synthetic_packed, tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--device",
        "cpu",
        "--quick",
        "--budget-s",
        "1200",
        "--packed",
        str(synthetic_packed),
        "--aflw",
        str(synthetic_packed),
        "--aflw-steps",
        "2",
        "--json",
        str(out),
        "--work",
        str(tmp_path / "work"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "machine: device=cpu" in proc.stdout and "torch=" in proc.stdout
    assert "| row | batch | samples/s | peak GPU mem (GiB) | wall (s) | note |" in proc.stdout
    names = bg.row_names(bg.Plan.make(True, None))
    for name in names:
        assert f"| {name} |" in proc.stdout, name
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == names
    for name, r in rows.items():
        assert not r["note"].startswith(("error", "skipped")), (name, r["note"])
    for name in names:
        if name.startswith(("train", "dataloader")):
            assert rows[name]["samples_per_s"] > 0, name
    assert "compile backend=eager" in rows["train bf16-mixed+channels_last+compile bs2"]["note"]
    assert rows["aflw_real"]["samples_per_s"] > 0
    assert "1 faces" in rows["demo batched"]["note"]
    assert (tmp_path / "work" / "fast_dev_run.log").is_file()


def test_device_aflw_real_stages_parts_merges_and_trains_on_cpu(synthetic_packed, tmp_path):
    """scripts/device_aflw_real.sh end to end with CPU overrides: two parts staged (moved), the
    probe trains on the first, ``train`` merges both, trains from warm-start weights and leaves
    the run record and slim weights in $OUT."""
    import os

    from vrn.checkpoint import load_network, save_network
    from vrn.data.packed import PackedReader, write_subset
    from vrn.models import create_model

    counts = {"train": 8, "val": 2}
    parts = [write_subset(synthetic_packed, tmp_path / f"p{k}", counts, seed=4, part=(k, 2)) for k in range(2)]
    init = save_network(
        tmp_path / "init.ckpt", create_model(name="vrn_tiny"), {"name": "vrn_tiny", "depth_bins": DEPTH_BINS}
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3 = this interpreter
        "VRN_DEVICE_DATA": str(tmp_path / "staged"),
        "VRN_DEVICE_RUN": str(tmp_path / "runs"),
        "OUT": str(tmp_path / "out"),
    }
    cpu = [
        "model=vrn_tiny",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "data.num_workers=0",
        "data.pin_memory=false",
        "data.batch_size=2",
        "trainer.max_steps=4",
        "trainer.limit_train_batches=2",
        "~callbacks.volume_preview",
    ]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(ROOT / "scripts" / "device_aflw_real.sh"), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "device_aflw_real.sh")]).returncode == 0
    for p in parts:
        r = run("stage", str(p))
        assert r.returncode == 0, r.stderr[-2000:]
        assert not p.exists() and (tmp_path / "staged" / p.name / "meta.json").is_file()
    r = run("probe", *cpu)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    probe_rows = [json.loads(x) for x in (tmp_path / "out" / "probe_metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in probe_rows] == [2, 4] and all(row["train/samples_per_sec"] > 0 for row in probe_rows)
    r = run("train", *cpu, f"model.init_weights={init}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    merged = PackedReader(tmp_path / "staged" / "merged")
    assert len(merged) == 10 and merged.meta["splits"] == counts
    out = tmp_path / "out"
    assert {"train_metrics.jsonl", "train_summary.json", "train_best.ckpt", "train_last.ckpt"} <= {
        p.name for p in out.iterdir()
    }
    net, spec, _ = load_network(out / "train_last.ckpt")
    assert spec["name"] == "vrn_tiny"
    # a second call resumes the first run (its folder kept) in a new folder
    first = tmp_path / "runs" / "train" / "checkpoints" / "last.ckpt"
    r = run(
        "train", *[o for o in cpu if not o.startswith("trainer.max_steps")], "trainer.max_steps=6", f"ckpt_path={first}"
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "run folder: " + str(tmp_path / "runs" / "train_2") in r.stdout
    resumed = torch.load(
        tmp_path / "runs" / "train_2" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert resumed["global_step"] == 6
    r = run("nonsense")
    assert r.returncode == 2 and "unknown mode" in r.stderr


def test_prepare_device_carry_writes_parts_and_sizes_each_call(synthetic_packed, tmp_path):
    from vrn.data.packed import PackedReader

    out = tmp_path / "carry"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "prepare_device_carry.py"),
            str(synthetic_packed),
            "--out",
            str(out),
            "--parts",
            "3",
            "--train",
            "9",
            "--val",
            "3",
            "--jpeg-quality",
            "0",
            "--no-wheels",
            "--init",
            str(ROOT / "vrn" / "pretrained" / "vrn_medium_aflw.ckpt"),
            "--manifest-fields",
            "landmarks",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    ids = [{row["id"] for row in PackedReader(out / f"p{k}").rows} for k in range(3)]
    assert sum(len(i) for i in ids) == 12 and len(set().union(*ids)) == 12  # disjoint parts, all kept
    # slim rows: only the landmarks asked for (the guided models train on them)
    assert all(set(row) == {"id", "split", "index", "landmarks"} for row in PackedReader(out / "p0").rows)
    assert all(len(row["landmarks"]) == 68 for row in PackedReader(out / "p0").rows)
    assert (out / "init" / "init.ckpt").is_file()
    calls = [ln for ln in r.stdout.splitlines() if ln.startswith("call ")]
    assert len(calls) == 3 and all(ln.endswith("MiB OK") for ln in calls)


def test_rows_model_and_batches_select_what_runs(bg, synthetic_packed, tmp_path):
    """--model / --batches / --rows: only the chosen training rows, with that model and batches
    (how docs/benchmarks.md measures CPU bf16 against fp32)."""
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--packed", str(synthetic_packed)]
    cmd += ["--model", "vrn_tiny", "--batches", "1,3", "--rows", "train fp32", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["train fp32 bs1", "train fp32 bs3"]
    assert all(r["samples_per_s"] > 0 and r["note"].startswith("vrn_tiny") for r in rows)

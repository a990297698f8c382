"""Cluster runs through submitit (issue 9 item 3): the SLURM job the launcher would submit,
real local submitit jobs, and resuming from a run's own last.ckpt (the requeue case)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import submitit
import torch
from omegaconf import OmegaConf
from pytorch_lightning import Callback
from pytorch_lightning.plugins.environments import SLURMEnvironment

from tests.helpers import compose_config, tiny_train_overrides
from vrn.cli_errors import UserError
from vrn.data.datamodule import SyntheticDataModule
from vrn.train import resume_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]


# ---- the SLURM job: cluster=slurm renders the expected submitit / sbatch parameters -------------


def _slurm_cfg(tmp_path: Path, *extra: str):
    return compose_config(
        "train",
        [
            "cluster=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=acme",
            "hydra.launcher.timeout_min=720",
            "trainer.num_nodes=2",
            "trainer.devices=4",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *extra,
        ],
    )


def test_slurm_config_ties_the_job_to_the_trainer(tmp_path):
    cfg = _slurm_cfg(tmp_path)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert (launcher["partition"], launcher["account"], launcher["timeout_min"]) == ("gpu", "acme", 720)
    assert launcher["max_num_timeout"] > 0  # requeues on timeout / preemption
    assert launcher["submitit_folder"] == f"{tmp_path / 'sweep'}/.submitit/%j"
    assert cfg.hydra.mode.name == "MULTIRUN"
    # Lightning takes the ranks from SLURM but leaves the requeueing to submitit
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy) == (2, 4, "ddp")
    (env,) = [hydra.utils.instantiate(p) for p in cfg.trainer.plugins]
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
    # the run resumes by itself after a requeue
    assert cfg.resume == "auto"


def test_plain_plugin_launcher_still_composes(tmp_path):
    """``hydra/launcher=submitit_slurm`` alone: the plugin's own defaults, nothing tied to trainer.*."""
    cfg = compose_config("train", ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"])
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.nodes == 1
    assert cfg.hydra.launcher.max_num_timeout == 0


def test_slurm_launcher_writes_the_expected_sbatch_script(tmp_path, monkeypatch):
    """The real launcher builds its submitit executor; the sbatch script is captured, not submitted."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit checks that SLURM is installed
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    seen = {}

    def capture(self, fn, *args):
        seen["script"] = self._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
        seen["max_num_timeout"] = self._executor.max_num_timeout
        seen["jobs"] = list(zip(*args))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    cfg = _slurm_cfg(tmp_path, "hydra.launcher.mem_gb=200", "hydra.launcher.cpus_per_task=6")
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    launcher.launch([["seed=1"], ["seed=2"]], initial_job_idx=0)
    lines = set(seen["script"].splitlines())
    for expected in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=720",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=acme",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --mem=200GB",
        "#SBATCH --signal=USR2@120",
    ):
        assert expected in lines, (expected, seen["script"])
    assert seen["max_num_timeout"] == cfg.hydra.launcher.max_num_timeout
    assert [j[0] for j in seen["jobs"]] == [["seed=1"], ["seed=2"]]
    assert f"#SBATCH --output={tmp_path / 'sweep'}/.submitit/%j/%j_0_log.out" in lines


# ---- resume: a run whose folder already has last.ckpt continues from it ------------------------


class StartStep(Callback):
    """Records the global step each fit starts from."""

    starts: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        StartStep.starts.append(trainer.global_step)


def _resume_cfg(packed: Path, out: Path, *extra: str):
    overrides = [
        *tiny_train_overrides(packed, "none"),
        "trainer.accelerator=cpu",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "test=false",
        "~callbacks.volume_preview",
        "~callbacks.lr_monitor",
        "+callbacks.start_step._target_=tests.test_cluster.StartStep",
        *extra,
    ]
    return compose_config("train", overrides, output_dir=out)


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


@pytest.mark.slow  # three short trainings: ~45 s on 2 busy cores
def test_resume_continues_from_the_runs_own_last_ckpt(synthetic_packed, tmp_path):
    StartStep.starts.clear()
    last = tmp_path / "checkpoints" / "last.ckpt"
    train(_resume_cfg(synthetic_packed, tmp_path, "trainer.max_epochs=1", "resume=true"))
    assert StartStep.starts == [0] and _step(last) == 2  # a fresh folder starts at 0
    # the same folder again (a requeued job): continues at step 2, not 0
    train(_resume_cfg(synthetic_packed, tmp_path, "trainer.max_epochs=2", "resume=true"))
    assert StartStep.starts == [0, 2] and _step(last) == 4
    # resume=false: the same folder starts afresh
    train(_resume_cfg(synthetic_packed, tmp_path, "trainer.max_epochs=1", "resume=false"))
    assert StartStep.starts == [0, 2, 0]


def test_resume_choice(synthetic_packed, tmp_path):
    """``auto`` resumes only in a submitit job; ``ckpt_path`` wins; a bad value is one line."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    cfg = _resume_cfg(synthetic_packed, tmp_path)
    assert resume_checkpoint(cfg) is None  # auto, fresh folder
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    assert resume_checkpoint(cfg) is None  # auto under Hydra's basic launcher: a plain run
    assert resume_checkpoint(_resume_cfg(synthetic_packed, tmp_path, "resume=true")) == str(last)
    local = _resume_cfg(synthetic_packed, tmp_path, "cluster=local")
    assert resume_checkpoint(local) == str(last)  # auto in a submitit job
    assert resume_checkpoint(_resume_cfg(synthetic_packed, tmp_path, "cluster=local", "resume=false")) is None
    other = tmp_path / "other.ckpt"
    assert resume_checkpoint(_resume_cfg(synthetic_packed, tmp_path, "resume=true", f"ckpt_path={other}")) == str(other)
    with pytest.raises(UserError, match="resume=sometimes is not one of auto, true, false"):
        resume_checkpoint(_resume_cfg(synthetic_packed, tmp_path, "resume=sometimes"))


# ---- parallel jobs share the synthetic data cache ----------------------------------------------


def _prepare_synthetic(cache_dir: str) -> None:
    SyntheticDataModule(cache_dir, num_train=3, num_val=1, num_test=1, batch_size=1).prepare_data()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file lock")
def test_parallel_jobs_build_one_synthetic_cache(tmp_path):
    """Jobs of a parallel sweep (cluster=local, SLURM arrays) start together on the same cache:
    one generates it, the other waits, neither fails on the other's half-written folder."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_prepare_synthetic, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    (cache,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert (cache / "meta.json").is_file() and not list(tmp_path.glob("*.partial"))


# ---- real submitit jobs on this machine (hydra/launcher=submitit_local) -----------------------


def _local_sweep_cmd(packed: Path, sweep: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vrn.train",
        "cluster=local",
        *tiny_train_overrides(packed, "csv"),
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "test=false",
        "~callbacks.volume_preview",
        f"hydra.sweep.dir={sweep}",
        *extra,
    ]


def _env() -> dict[str, str]:
    assets = Path(os.environ.get("VRN_ASSETS_DIR", ROOT.parent / "shared" / "assets"))
    return {
        **os.environ,
        "VRN_ROOT": str(ROOT),
        "VRN_ASSETS_DIR": str(assets if assets.is_absolute() else (ROOT / assets).resolve()),
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
    }


@pytest.mark.slow
def test_submitit_local_sweep_runs_each_job(synthetic_packed, tmp_path):
    """A 2-job sweep through the submitit launcher: two job folders, each trained and checkpointed."""
    sweep = tmp_path / "sweep"
    cmd = _local_sweep_cmd(synthetic_packed, sweep, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "seed=1,2")
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for job, seed in ((0, 1), (1, 2)):
        folder = sweep / str(job)
        assert _step(folder / "checkpoints" / "last.ckpt") == 2
        assert f"seed={seed}" in (folder / ".hydra" / "overrides.yaml").read_text()
        metrics = (folder / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
        assert "val/iou" in metrics[0] and len(metrics) > 1
        hydra_cfg = OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra
        assert hydra_cfg.launcher._target_.endswith("LocalLauncher")
    # one submitit job each, both done, each returning the optimized metric (val/iou)
    results = sorted((sweep / ".submitit").glob("*/*_0_result.pkl"))
    assert len(results) == 2
    for res in results:
        status, ret = pickle.loads(res.read_bytes())
        assert status == "success" and 0.0 <= ret.return_value <= 1.0


def _children(pid: int) -> list[int]:
    """All descendant process ids of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job's process in /proc")
def test_preempted_local_job_is_requeued_and_resumes(synthetic_packed, tmp_path):
    """submitit's preemption signal (SIGUSR2) mid-training: the launcher requeues the job, which
    runs again in the same folder and continues from its last.ckpt up to max_steps."""
    sweep = tmp_path / "sweep"
    max_steps = 60
    cmd = _local_sweep_cmd(
        synthetic_packed,
        sweep,
        f"trainer.max_steps={max_steps}",
        "trainer.max_epochs=100",
        "trainer.limit_train_batches=4",
        "trainer.check_val_every_n_epoch=100",
        "callbacks.last_checkpoint.every_n_train_steps=1",
    )
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 600
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert last.is_file(), "the job wrote no last.ckpt"
        tasks = [p for p in _children(proc.pid) if "submitit.core._submit" in _cmdline(p)]
        assert len(tasks) == 1, tasks
        os.kill(tasks[0], signal.SIGUSR2)  # what SLURM sends signal_delay_s before the limit
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_0_log.*"))
    assert "Requeued job" in logs
    train_log = (sweep / "0" / "train.log").read_text()
    assert "resume=auto: continuing from this run's" in train_log
    assert _step(last) == max_steps

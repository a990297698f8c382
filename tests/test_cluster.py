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
from types import SimpleNamespace

import hydra
import pytest
import submitit
import torch
from omegaconf import OmegaConf
from pytorch_lightning import Callback
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.trainer.states import TrainerFn

from tests.helpers import compose_config, tiny_train_overrides
from vrn.callbacks import LastCheckpoint, TrainingStopped
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


# ---- SIGUSR2 (submitit's requeue signal): save the current step first, then hand over ---------

USR2 = getattr(signal, "SIGUSR2", None)
needs_usr2 = pytest.mark.skipif(USR2 is None, reason="no SIGUSR2 on this platform")


class FakeSubmititHandler:
    """Stands in for submitit's ``checkpoint_and_try_requeue``: records each call and whether
    last.ckpt was complete by then; ``exits``: raise SystemExit(-1) like submitit's rank 0."""

    def __init__(self, last: Path, exits: bool) -> None:
        self.last, self.exits = last, exits
        self.calls: list[tuple[int, bytes | None]] = []

    def __call__(self, signum: int, frame) -> None:
        self.calls.append((signum, self.last.read_bytes() if self.last.is_file() else None))
        if self.exits:
            raise SystemExit(-1)


def _fake_trainer(step: int, world_size: int = 1, others_noted: int = 0) -> SimpleNamespace:
    """What LastCheckpoint uses of a Trainer; ``save_checkpoint`` writes ``step=<n>``. Under
    "DDP" (world_size > 1) the all-reduce returns the max of this rank's and ``others_noted``."""
    reduced: list[str] = []

    def reduce(t: torch.Tensor, reduce_op: str) -> torch.Tensor:
        reduced.append(reduce_op)
        return torch.maximum(t, torch.tensor([others_noted], dtype=t.dtype))

    return SimpleNamespace(
        fast_dev_run=False,
        sanity_checking=False,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        is_global_zero=True,
        world_size=world_size,
        global_step=step,
        save_checkpoint=lambda path: Path(path).write_bytes(f"step={step}".encode()),
        strategy=SimpleNamespace(barrier=lambda name: None, root_device=torch.device("cpu"), reduce=reduce),
        reduced=reduced,
    )


@pytest.fixture
def usr2_handler():
    """Restores the process's SIGUSR2 handler after the test."""
    before = signal.getsignal(USR2)
    yield
    signal.signal(USR2, before)


@needs_usr2
@pytest.mark.parametrize("exits", [True, False], ids=["rank0-exits", "rank1-returns"])
def test_usr2_saves_the_current_step_then_hands_over(tmp_path, usr2_handler, exits):
    cb = LastCheckpoint(tmp_path, every_n_train_steps=500)
    fake = FakeSubmititHandler(cb.path, exits=exits)
    signal.signal(USR2, fake)
    cb.on_train_start(_fake_trainer(0), None)
    assert signal.getsignal(USR2) == cb._on_signal
    signal.raise_signal(USR2)
    # noted only: the job neither exits nor requeues in the middle of the batch
    assert cb.signum == USR2 and fake.calls == [] and not cb.path.exists()
    trainer = _fake_trainer(7)  # step 7: no every_n_train_steps save due
    if exits:  # submitit's rank 0: requeue, sys.exit
        with pytest.raises(SystemExit):
            cb.on_train_batch_end(trainer, None, None, None, 6)
    else:  # submitit's other ranks return: this rank stops (exit 140)
        with pytest.raises(TrainingStopped) as e:
            cb.on_train_batch_end(trainer, None, None, None, 6)
        assert (e.value.signum, e.value.ckpt_path, e.value.exit_code) == (USR2, str(cb.path), 140)
    # the handler ran once, after last.ckpt of step 7 was complete (tmp + rename)
    assert fake.calls == [(USR2, b"step=7")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    cb.teardown(trainer, None, "fit")
    assert signal.getsignal(USR2) is fake


@needs_usr2
def test_usr2_without_a_previous_handler_is_left_alone(tmp_path, usr2_handler):
    for disposition in (signal.SIG_DFL, signal.SIG_IGN):
        signal.signal(USR2, disposition)
        cb = LastCheckpoint(tmp_path)
        cb.on_train_start(_fake_trainer(0), None)
        assert signal.getsignal(USR2) == disposition
        cb.teardown(_fake_trainer(0), None, "fit")
    signal.raise_signal(USR2)  # ignored (SIG_IGN): not noted, training goes on
    assert cb.signum is None
    cb.on_train_batch_end(_fake_trainer(3), None, None, None, 2)
    assert not cb.path.exists()


@needs_usr2
def test_usr2_after_training_goes_straight_to_the_previous_handler(tmp_path, usr2_handler):
    cb = LastCheckpoint(tmp_path)
    fake = FakeSubmititHandler(cb.path, exits=False)
    signal.signal(USR2, fake)
    cb.on_train_start(_fake_trainer(0), None)
    cb.on_train_end(_fake_trainer(9), None)  # no signal pending: nothing saved
    assert not cb.path.exists()
    signal.raise_signal(USR2)  # no batch end comes any more: submitit acts at once
    assert fake.calls == [(USR2, None)] and cb.signum is None


@needs_usr2
def test_usr2_noted_after_the_last_batch_is_saved_and_handed_over_at_train_end(tmp_path, usr2_handler):
    cb = LastCheckpoint(tmp_path)
    fake = FakeSubmititHandler(cb.path, exits=True)
    signal.signal(USR2, fake)
    cb.on_train_start(_fake_trainer(0), None)
    signal.raise_signal(USR2)
    with pytest.raises(SystemExit):
        cb.on_train_end(_fake_trainer(12), None)
    assert fake.calls == [(USR2, b"step=12")]


@needs_usr2
def test_ddp_ranks_agree_on_the_step_to_stop_at(tmp_path, usr2_handler):
    """A rank whose SIGUSR2 has not arrived yet stops at the same step as one that has it (the
    all-reduce), so every rank reaches the save's barrier. The ranks agree every
    ``signal_sync_every_n_steps`` steps only (the all-reduce is a host sync)."""
    cb = LastCheckpoint(tmp_path, signal_sync_every_n_steps=5)
    fake = FakeSubmititHandler(cb.path, exits=False)
    signal.signal(USR2, fake)
    cb.on_train_start(_fake_trainer(0, world_size=2), None)
    quiet = _fake_trainer(5, world_size=2, others_noted=0)
    cb.on_train_batch_end(quiet, None, None, None, 4)  # no rank noted a signal: go on
    assert quiet.reduced == ["max"] and cb.signum is None and not cb.path.exists()
    between = _fake_trainer(7, world_size=2, others_noted=int(USR2))
    cb.on_train_batch_end(between, None, None, None, 6)  # not an agreement step: no all-reduce
    assert between.reduced == [] and cb.signum is None
    with pytest.raises(TrainingStopped):
        cb.on_train_batch_end(_fake_trainer(10, world_size=2, others_noted=int(USR2)), None, None, None, 9)
    assert cb.signum == USR2 and fake.calls == [(USR2, b"step=10")]
    with pytest.raises(ValueError, match="signal_sync_every_n_steps=0"):
        LastCheckpoint(tmp_path, signal_sync_every_n_steps=0)


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


class PreemptionProbe(Callback):
    """For the requeue test, inside the job: appends the global step each fit starts from to
    ``log`` (one line each); the first time the batch that ends at global step ``at + 1``
    begins, writes ``<log>.ready`` (this process id) and waits until LastCheckpoint noted the
    test's SIGUSR2 (a process without the fix is requeued by submitit during that wait)."""

    def __init__(self, log: str, at: int) -> None:
        self.starts, self.at = Path(log), int(at)

    def on_train_start(self, trainer, pl_module) -> None:
        with self.starts.open("a") as f:
            f.write(f"{trainer.global_step}\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ready = self.starts.with_name(self.starts.name + ".ready")
        if trainer.global_step != self.at or ready.exists() or not trainer.is_global_zero:
            return
        ready.write_text(str(os.getpid()))
        (last,) = [cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)]
        deadline = time.monotonic() + 600
        while last.signum is None and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.mark.slow  # two job starts: ~40 s on 2 busy cores
@pytest.mark.skipif(USR2 is None or not Path("/proc").is_dir(), reason="SIGUSR2; finds the job's process in /proc")
def test_preempted_local_job_is_requeued_and_resumes_from_the_signals_step(synthetic_packed, tmp_path):
    """submitit's preemption signal (SIGUSR2) mid-epoch, long before any periodic save: the job
    saves last.ckpt at the end of the batch it arrived in, the launcher requeues it, and it runs
    again in the same folder from exactly that step up to max_steps (without the hand-over it
    would start again at step 0: nothing saved yet)."""
    sweep = tmp_path / "sweep"
    probe = tmp_path / "starts.txt"
    at, max_steps = 3, 8  # 12 samples, batch 2: epoch 0 ends at step 6
    cmd = _local_sweep_cmd(
        synthetic_packed,
        sweep,
        f"trainer.max_steps={max_steps}",
        "trainer.max_epochs=100",
        "trainer.check_val_every_n_epoch=100",
        "callbacks.last_checkpoint.every_n_train_steps=500",
        "+callbacks.probe._target_=tests.test_cluster.PreemptionProbe",
        f"+callbacks.probe.log={probe}",
        f"+callbacks.probe.at={at}",
    )
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready = tmp_path / "starts.txt.ready"
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 600
        while not ready.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.is_file(), "the job never reached the probe's step"
        assert not last.exists(), "a periodic save came first: the test proves nothing"
        # the job's task process, as a user finds it (docs/cluster.md), is the one that trains
        tasks = [p for p in _children(proc.pid) if "submitit.core._submit" in _cmdline(p)]
        assert tasks == [int(ready.read_text())], tasks
        os.kill(tasks[0], signal.SIGUSR2)  # what SLURM sends signal_delay_s before the limit
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_0_log.*"))
    assert "Requeued job" in logs
    train_log = (sweep / "0" / "train.log").read_text()
    assert "handing over to the job's own SIGUSR2 handler" in train_log
    assert "resume=auto: continuing from this run's" in train_log
    # the requeued run starts at the step the signal arrived in (that batch finished), not at 0
    assert [int(x) for x in probe.read_text().split()] == [0, at + 1]
    assert _step(last) == max_steps
    (result,) = (sweep / ".submitit").glob("*/*_0_result.pkl")
    status, ret = pickle.loads(result.read_bytes())
    assert status == "success" and ret.status.name == "COMPLETED", ret

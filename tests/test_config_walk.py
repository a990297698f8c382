"""Every shipped option of every config group of ``conf/train.yaml`` runs (issue 9 item 7).

The options are discovered from conf/ with Hydra's own repository (the groups of train.yaml's
defaults list and their subgroups, e.g. ``data/augment``), so a new file is walked without
touching this test. Each option is composed alone, the rest default, on tiny data:
``trainer.fast_dev_run=true`` (one batch of each stage), batch size 1, ``model=vrn_tiny`` and
``logger=none`` unless the option itself picks the model / logger (an experiment, ``debug=default``).

What each option must do on this CPU-only machine:

* asks for a GPU (``trainer=gpu``, ``trainer=ddp``, ``cluster=slurm``, GPU experiments): the
  one-line :class:`~vrn.cli_errors.UserError` of the trainer's check, before any work;
* a packed dataset that is not here (``data=300w_lp``): composed and instantiated up to the
  one-line missing-data message;
* multi-process DDP on CPU (``trainer=ddp_cpu``): a real ``python -m vrn.train`` (Lightning
  re-launches the script, which must not be pytest);
* a multirun-only option (``hparams_search=*``, ``cluster=local``): every swept key exists in the
  config and its single job config runs and returns ``optimized_metric``;
* everything else: ``vrn.train.train`` in-process gives a finite loss and a val IoU in [0, 1].
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.types import RunMode
from omegaconf import OmegaConf

from tests.helpers import CONF_DIR, compose_config
from vrn.cli_errors import UserError, cuda_device_count
from vrn.train import train

ROOT = Path(__file__).resolve().parents[1]
#: groups that are Hydra's own (run folders, logging), not a choice of the run
NOT_WALKED = {"hydra"}
#: the stand-ins of the walk where the option does not pick these groups itself
TINY = {"model": "vrn_tiny", "logger": "none"}
#: models that take seconds per CPU step at full size (192x192x200): the slow tier
SMALL_MODELS = {"vrn_tiny"}
_ABSENT = object()


def _train_groups() -> list[tuple[str, list[str]]]:
    """(group, its options) of every group of train.yaml's defaults list and their subgroups."""
    top = [
        next(iter(d))
        for d in OmegaConf.load(CONF_DIR / "train.yaml").defaults
        if isinstance(d, dict) or OmegaConf.is_dict(d)
    ]
    GlobalHydra.instance().clear()
    out: list[tuple[str, list[str]]] = []
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        loader = GlobalHydra.instance().config_loader()
        todo = [g for g in top if g not in NOT_WALKED]
        while todo:
            group = todo.pop(0)
            out.append((group, list(loader.get_group_options(group, results_filter=ObjectType.CONFIG))))
            todo += [f"{group}/{sub}" for sub in loader.get_group_options(group, results_filter=ObjectType.GROUP)]
    GlobalHydra.instance().clear()
    return out


@dataclass
class Case:
    """One option of the walk and what it must do here."""

    group: str
    option: str | None
    #: the option's own group choices after composition (hydra.runtime.choices)
    choices: dict[str, str] = field(default_factory=dict)
    accelerator: str = "auto"
    multiprocess: bool = False
    multirun: bool = False

    @property
    def override(self) -> list[str]:
        return [] if self.option is None else [f"{self.group}={self.option}"]

    @property
    def needs_gpu(self) -> bool:
        return self.accelerator.lower() in ("gpu", "cuda") and cuda_device_count() == 0

    @property
    def id(self) -> str:
        return "defaults" if self.option is None else f"{self.group}={self.option}"

    def tiny(self, default_choices: dict[str, str]) -> list[str]:
        """``model=vrn_tiny`` / ``logger=none`` where the option leaves the default."""
        return [f"{g}={v}" for g, v in TINY.items() if self.choices.get(g) == default_choices.get(g)]

    def model(self, default_choices: dict[str, str]) -> str:
        return TINY["model"] if self.choices.get("model") == default_choices.get("model") else self.choices["model"]


def _describe(group: str, option: str | None) -> Case:
    cfg = compose_config("train", [] if option is None else [f"{group}={option}"])
    t = cfg.trainer
    devices = t.get("devices", 1)
    many = (devices if isinstance(devices, int) else 1) * int(t.get("num_nodes", 1) or 1) > 1
    return Case(
        group,
        option,
        choices={k: str(v) for k, v in cfg.hydra.runtime.choices.items()},
        accelerator=str(t.get("accelerator", "auto")),
        multiprocess=many and str(t.get("strategy", "auto")).startswith("ddp"),
        multirun=cfg.hydra.mode == RunMode.MULTIRUN,
    )


def _cases() -> list:
    default = _describe("", None)
    base = {**default.choices, **TINY}
    params = [pytest.param(default, id=default.id)]
    for group, options in _train_groups():
        for option in options:
            if option == base.get(group):
                continue  # the defaults case
            case = _describe(group, option)
            heavy = not case.needs_gpu and (case.multiprocess or case.model(default.choices) not in SMALL_MODELS)
            params.append(pytest.param(case, id=case.id, marks=[pytest.mark.slow] if heavy else []))
    GlobalHydra.instance().clear()
    return params


CASES = _cases()
DEFAULT_CHOICES = CASES[0].values[0].choices


def test_walk_discovers_every_group_and_file():
    """The walk is the conf/ folder: each yaml of a train group is a case (or the defaults case)."""
    walked = {c.values[0].id for c in CASES}
    on_disk = set()
    for group, _ in _train_groups():
        for f in (CONF_DIR / group).glob("*.yaml"):
            on_disk.add(f"{group}={f.stem}")
    base = {**DEFAULT_CHOICES, **TINY}
    missing = {o for o in on_disk if o not in walked and base.get(o.split("=")[0]) != o.split("=")[1]}
    assert not missing
    groups = {g for g, _ in _train_groups()}
    assert {"trainer", "logger", "callbacks", "model", "data", "data/augment", "debug", "experiment"} <= groups
    assert "hparams_search" in groups and "trainer=gpu" in walked
    # logger=none is the walk's stand-in: the defaults case runs it
    assert "logger=none" in CASES[0].values[0].tiny(DEFAULT_CHOICES)


def _data_overrides(case: Case, packed: Path, data_dir: Path) -> list[str] | None:
    """Tiny data for the case; None: the option's own packed folder is absent (missing-data case)."""
    data = case.choices.get("data", "")
    if data == "synthetic":
        return [
            f"paths.data_dir={data_dir}",
            # 2 val / test faces: one per process of trainer=ddp_cpu
            "data.num_train=4",
            "data.num_val=2",
            "data.num_test=2",
            "data.num_gen_workers=0",
        ]
    cfg = compose_config("train", case.override)
    root = cfg.data.get("root", "???") if not OmegaConf.is_missing(cfg.data, "root") else "???"
    if case.group == "data" and root != "???" and not (Path(str(root)).expanduser() / "meta.json").is_file():
        return None  # e.g. data=300w_lp without the prepared 300W-LP here
    return [f"data.root={packed}"]


@pytest.mark.parametrize("case", CASES)
def test_option_runs(case: Case, synthetic_packed, tmp_path, tmp_path_factory, one_thread):
    data = _data_overrides(case, synthetic_packed, tmp_path_factory.getbasetemp() / "walk_data")
    overrides = [
        *case.override,
        *case.tiny(DEFAULT_CHOICES),
        *(data or []),
        "data.num_workers=0",
        "data.batch_size=1",
        "trainer.fast_dev_run=true",
    ]
    cfg = compose_config("train", overrides, output_dir=tmp_path)
    if case.needs_gpu:
        with pytest.raises(UserError, match="no CUDA GPU is available") as e:
            train(cfg)
        assert "\n" not in str(e.value)
        return
    if data is None:
        with pytest.raises(FileNotFoundError, match=r"data\.root=.* is not a packed dataset") as e:
            train(cfg)
        assert "\n" not in str(e.value) and "data_pipeline.run" in str(e.value)
        return
    if case.multirun:
        # what the sweep claims: each swept key is in the config (``+key`` adds one)
        for key in (cfg.hydra.sweeper.get("params") or {}).keys():
            assert key.startswith("+") or OmegaConf.select(cfg, key.lstrip("~"), default=_ABSENT) is not _ABSENT, key
        assert OmegaConf.select(cfg, "optimized_metric")
        # ... and its single job config runs
        overrides.append("hydra.mode=RUN")
        cfg = compose_config("train", overrides, output_dir=tmp_path)
    if case.multiprocess:
        _run_subprocess(overrides, tmp_path)
        return
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"])
    # overfit_batches under fast_dev_run: one step of an overfit_batches-long epoch, no validation
    if not cfg.trainer.get("overfit_batches"):
        assert 0.0 <= metrics["val/iou"] <= 1.0
    if case.multirun:
        assert cfg.optimized_metric in metrics


def _run_subprocess(overrides: list[str], out: Path) -> None:
    """``python -m vrn.train`` (DDP re-launches the script: it must not be pytest)."""
    env = {**os.environ, "VRN_ROOT": str(ROOT), "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vrn.train", *overrides, f"hydra.run.dir={out}", "test=false"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture
def one_thread():
    """One torch thread: the 2-core CI box stays responsive, the full-size models' steps stay bounded."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

"""DDP under Hydra: the ranks > 0 that Lightning starts join this Hydra job (also in a multirun),
and a job leaves no DDP state to the next job of the same process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

log = logging.getLogger(__name__)

__all__ = ["ddp_children_run_this_job", "end_ddp_job"]


#: environment variables that Lightning's subprocess launcher sets in the launching process
_DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def ddp_children_run_this_job() -> dict[str, Any]:
    """Make Lightning's DDP launcher start this Hydra job's ranks > 0 as a single run of this job.

    Lightning starts ranks > 0 by re-running ``sys.argv`` with ``hydra.run.dir=<HydraConfig
    run.dir>`` appended (``_hydra_subprocess_cmd``). Under ``-m`` (multirun) ``sys.argv`` is the
    whole sweep, so each child would start a sweep of its own, and ``run.dir`` is not this job's
    sweep folder. Under multirun this sets ``sys.argv`` to this job's own overrides (no ``-m``)
    and ``hydra.run.dir`` to this job's output folder: the children join this job and write in
    its folder (Lightning adds ``hydra.output_subdir=null``: they write no ``.hydra`` of their own).

    Returns:
        what :func:`end_ddp_job` needs to undo the job's DDP state (``sys.argv``, which launcher
        environment variables and whether a process group existed before the job).
    """
    before = {
        "argv": list(sys.argv),
        "env": {k: os.environ.get(k) for k in _DDP_LAUNCH_ENV},
        "group": torch.distributed.is_available() and torch.distributed.is_initialized(),
    }
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hc = HydraConfig.get()
        with read_write(hc), open_dict(hc):
            hc.run.dir = hc.runtime.output_dir
        sys.argv = [sys.argv[0], *hc.overrides.task]
    return before


def end_ddp_job(trainer: pl.Trainer | None, before: dict[str, Any]) -> None:
    """Leave no DDP state to the next job of this process (Hydra multirun runs jobs in one process).

    Waits for the ranks > 0 this process started (killed after 120 s), destroys the process group
    the job created and removes the launcher's environment variables: a left-over ``LOCAL_RANK``
    would make the next job's Lightning believe its processes were started externally and wait
    for ranks that are gone. Restores ``sys.argv``.
    """
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    for proc in getattr(launcher, "procs", None) or []:
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            log.warning(f"DDP rank process {proc.pid} did not end 120 s after this one: killing it")
            proc.kill()
    if not before["group"] and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in before["env"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    sys.argv = before["argv"]

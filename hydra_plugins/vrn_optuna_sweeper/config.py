"""Config of the Optuna sweeper, registered as ``hydra/sweeper=vrn_optuna`` (Hydra's ConfigStore).

Pick it with ``defaults: [override /hydra/sweeper: vrn_optuna]`` in a config (see
conf/hparams_search/vrn_optuna.yaml) and set ``hydra.mode: MULTIRUN`` (or pass ``--multirun``).
"""

# no `from __future__ import annotations`: Hydra's plugin scan runs this module outside
# sys.modules, where dataclasses cannot read string annotations
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

__all__ = ["VrnOptunaSweeperConf"]


def _tpe() -> dict[str, Any]:
    return {"_target_": "optuna.samplers.TPESampler", "seed": 123}


@dataclass
class VrnOptunaSweeperConf:
    """Fields of ``hydra.sweeper`` (docs/sweeps.md)."""

    _target_: str = "hydra_plugins.vrn_optuna_sweeper.sweeper.VrnOptunaSweeper"
    # the sampler config is instantiated by the sweeper itself (GridSampler gets its grid from params)
    _recursive_: bool = False
    # "maximize" or "minimize" the number the task function returns
    direction: str = "maximize"
    # name of the study in the storage; the same name (and storage) resumes it
    study_name: str = "${hydra.job.name}"
    # Optuna storage URL; null: sqlite file optuna.db in the parent folder of hydra.sweep.dir
    storage: str | None = None
    # continue a study of that name if the storage has one (false: stop with an error instead)
    load_if_exists: bool = True
    # the sweep ends when the study holds this many COMPLETE trials (earlier runs' trials count)
    n_trials: int = 20
    # trials asked at once and handed to the launcher as one batch
    n_jobs: int = 1
    # this run stops after this many failed trials (exception, missing or non-finite value); null: n_trials
    max_failures: int | None = None
    # any Optuna sampler (`_target_` plus its arguments); TPE with a fixed seed by default
    sampler: dict[str, Any] = field(default_factory=_tpe)
    # search space: key -> Hydra sweep string (choice(...), range(...), interval(...), tag(log, ...))
    params: dict[str, Any] | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="vrn_optuna", node=VrnOptunaSweeperConf, provider="vrn")

"""A Hydra sweeper that searches hyperparameters with Optuna's ask-and-tell interface.

Each round asks the study for ``n_jobs`` trials, turns their sampled values into overrides, runs
them through the configured Hydra launcher (one job per trial, in ``<sweep dir>/<trial number>``)
and tells the study what each job returned. A job that raises, or returns nothing, or a value that
is not a finite number, is told as FAIL and the sweep goes on (up to ``max_failures`` per run).

The study lives in an Optuna storage (by default the sqlite file ``optuna.db`` beside the sweep
folders), so running the same command again resumes it: ``n_trials`` is the number of COMPLETE
trials the study should hold in the end, earlier runs' trials included. A run that is stopped
(Ctrl-C, an error) marks its unfinished trials FAIL before it exits.

At the end the sweeper writes ``optimization_results.yaml`` (best value, parameters and overrides,
trial counts, study name and storage) into the sweep folder and logs the best trial.

Design after Hydra's own basic sweeper and the idea of hydra-optuna-sweeper (our own code, over
current Optuna; Optuna: Akiba et al., KDD 2019).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.vrn_optuna_sweeper.search_space import SearchSpace, parse_search_space, trial_overrides

if TYPE_CHECKING:
    import optuna

__all__ = ["RESULTS_FILE", "VrnOptunaSweeper", "job_value"]

log = logging.getLogger(__name__)

#: written into the sweep folder at the end of a sweep
RESULTS_FILE = "optimization_results.yaml"
DIRECTIONS = ("maximize", "minimize")


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError as e:
        raise ImportError(
            "hydra/sweeper=vrn_optuna needs optuna: pip install 'optuna>=4,<6' (or pip install -e '.[sweep]')"
        ) from e
    return optuna


def job_value(result: JobReturn) -> tuple[float | None, str]:
    """The finite number a job returned, or None and why not (it raised, returned nothing, NaN, ...)."""
    try:
        value = result.return_value
    except Exception as e:  # noqa: BLE001 - any failure of the job is a failed trial
        return None, f"raised {type(e).__name__}: {e}"
    if value is None:
        return None, "returned None (is the optimized metric logged by the task?)"
    if hasattr(value, "item") and callable(value.item):  # a 0-d tensor / numpy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        return None, f"returned {value!r}, not a number"
    value = float(value)
    if not math.isfinite(value):
        return None, f"returned {value}"
    return value, ""


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder (no half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class VrnOptunaSweeper(Sweeper):
    """Optuna search over Hydra overrides (fields: ``config.VrnOptunaSweeperConf``)."""

    def __init__(
        self,
        direction: str,
        study_name: str,
        storage: str | None,
        load_if_exists: bool,
        n_trials: int,
        n_jobs: int,
        max_failures: int | None,
        sampler: DictConfig | dict[str, Any],
        params: DictConfig | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"hydra.sweeper.direction={direction!r}: use one of {DIRECTIONS}")
        for name, value in (("n_trials", n_trials), ("n_jobs", n_jobs)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"hydra.sweeper.{name}={value!r}: give a whole number >= 1")
        self.direction = direction
        self.study_name = str(study_name)
        self.storage = storage
        self.load_if_exists = bool(load_if_exists)
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failures = n_trials if max_failures is None else int(max_failures)
        self.sampler_cfg = OmegaConf.to_container(sampler, resolve=True) if isinstance(sampler, DictConfig) else sampler
        self.params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else params
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ------------------------------------------------------------------ pieces

    def storage_url(self, sweep_dir: Path) -> str:
        """The configured storage, or ``sqlite:///<parent of the sweep folder>/optuna.db``."""
        if self.storage:
            return str(self.storage)
        parent = sweep_dir.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{parent / 'optuna.db'}"

    def make_sampler(self, space: SearchSpace) -> optuna.samplers.BaseSampler:
        """The configured sampler; a GridSampler without ``search_space`` gets the grid of the choices."""
        optuna = _import_optuna()
        cfg = dict(self.sampler_cfg or {})
        target = cfg.get("_target_")
        if not target:
            raise ValueError("hydra.sweeper.sampler needs a _target_ (e.g. optuna.samplers.TPESampler)")
        cls = get_class(target)
        if issubclass(cls, optuna.samplers.GridSampler) and "search_space" not in cfg:
            grid = {}
            for key, dist in space.distributions.items():
                if not isinstance(dist, optuna.distributions.CategoricalDistribution):
                    raise ValueError(f"GridSampler needs choice(...) values; {key} is {type(dist).__name__}")
                grid[key] = list(dist.choices)
            cfg["search_space"] = grid
        try:
            sampler = instantiate(cfg)
        except Exception as e:  # noqa: BLE001 - a wrong argument name or value of the configured sampler
            cause = e.__cause__ or e
            raise ValueError(f"hydra.sweeper.sampler: cannot build {target} from {cfg}: {cause}") from e
        if not isinstance(sampler, optuna.samplers.BaseSampler):
            raise ValueError(f"hydra.sweeper.sampler._target_={target} is not an Optuna sampler")
        return sampler

    def open_study(self, storage: str, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
        """Create the study, or load the stored one of that name (its direction must match)."""
        optuna = _import_optuna()
        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            sampler=sampler,
            direction=self.direction,
            load_if_exists=self.load_if_exists,
        )
        stored = study.direction.name.lower()
        if stored != self.direction:
            raise ValueError(
                f"study {self.study_name!r} in {storage} was created to {stored}, not {self.direction}: "
                f"give another hydra.sweeper.study_name or the same direction"
            )
        return study

    # ------------------------------------------------------------------ sweep

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        """Run trials until the study holds ``n_trials`` COMPLETE ones; returns each batch's job returns."""
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        _import_optuna()
        from optuna.trial import TrialState

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space = parse_search_space(self.params, arguments, parser)
        if not space.distributions:
            raise ValueError(
                "hydra/sweeper=vrn_optuna has nothing to search: give hydra.sweeper.params "
                "(e.g. model.optimizer.lr: tag(log, interval(1e-5, 1e-2))) or a sweep override on the command line"
            )
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        storage = self.storage_url(sweep_dir)
        study = self.open_study(storage, self.make_sampler(space))
        complete = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
        log.info(
            f"Optuna study {self.study_name!r} in {storage}: {len(study.trials)} stored trials, {complete} complete; "
            f"running until {self.n_trials} complete ({self.direction})"
        )
        log.info("Search space: " + ", ".join(f"{k}: {d}" for k, d in space.distributions.items()))

        returns: list[Sequence[JobReturn]] = []
        launched = failed = 0
        stopped_by_sampler = False
        while complete < self.n_trials and failed < self.max_failures and not stopped_by_sampler:
            trials = [study.ask(space.distributions) for _ in range(min(self.n_jobs, self.n_trials - complete))]
            batch = [[*space.fixed, *trial_overrides(t.params)] for t in trials]
            for t, overrides in zip(trials, batch):
                t.set_user_attr("overrides", overrides)
            try:
                self.validate_batch_is_legal(batch)
                results = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            except BaseException:  # Ctrl-C, a config error, a launcher failure: leave no trial RUNNING
                for t in trials:
                    self._tell(study, t, None, TrialState.FAIL)
                raise
            launched += len(trials)
            for t, result in zip(trials, results):
                value, why = job_value(result)
                job_dir = self._job_dir(result)
                if job_dir:
                    t.set_user_attr("job_dir", job_dir)
                if value is None:
                    failed += 1
                    log.warning(f"Trial {t.number} failed ({why}): {' '.join(t.user_attrs['overrides'])}")
                    stopped_by_sampler |= self._tell(study, t, None, TrialState.FAIL)
                else:
                    complete += 1
                    log.info(f"Trial {t.number}: {value:.6g} <- {' '.join(trial_overrides(t.params))}")
                    stopped_by_sampler |= self._tell(study, t, value, TrialState.COMPLETE)
            returns.append(results)
        if stopped_by_sampler:
            log.info("The sampler has tried its whole search space: the sweep ends here")
        if failed >= self.max_failures and complete < self.n_trials:
            log.warning(f"Stopping after {failed} failed trials (hydra.sweeper.max_failures={self.max_failures})")
        self.write_results(study, storage, sweep_dir, launched=launched, failed=failed)
        return returns

    @staticmethod
    def _tell(study: optuna.Study, trial: optuna.Trial, value: float | None, state: Any) -> bool:
        """Tell the study; True when the sampler asked to stop (GridSampler / BruteForceSampler exhausted).

        Outside ``study.optimize`` a sampler's ``study.stop()`` raises RuntimeError after the trial's
        state is stored; that means "the search space is used up", not an error.
        """
        try:
            study.tell(trial, value, state=state)
        except RuntimeError as e:
            if "Study.stop" not in str(e):
                raise
            return True
        return False

    @staticmethod
    def _job_dir(result: JobReturn) -> str | None:
        try:
            return str(result.hydra_cfg.hydra.runtime.output_dir)
        except Exception:  # noqa: BLE001 - a launcher that returns no Hydra config
            return result.working_dir

    def write_results(self, study: optuna.Study, storage: str, sweep_dir: Path, launched: int, failed: int) -> dict:
        """Write ``optimization_results.yaml`` into the sweep folder and log the best trial; returns its content."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
        results: dict[str, Any] = {
            "study_name": self.study_name,
            "storage": storage,
            "direction": self.direction,
            "n_trials": {"total": len(trials), **{k: v for k, v in counts.items() if v}},
            "this_run": {"launched": launched, "failed": failed},
        }
        if counts.get("complete", 0):
            best = study.best_trial
            results |= {
                "best_value": float(best.value),
                "best_params": dict(best.params),
                "best_overrides": trial_overrides(best.params),
                "best_trial": best.number,
                "best_job_dir": best.user_attrs.get("job_dir"),
                # every override the best job ran with (fixed ones included)
                "best_job_overrides": best.user_attrs.get("overrides"),
            }
            log.info(
                f"Best trial {best.number} of study {self.study_name!r}: {best.value:.6g} <- "
                f"{' '.join(results['best_overrides'])} ({results['best_job_dir']})"
            )
        else:
            results |= {"best_value": None, "best_params": None, "best_overrides": None}
            log.warning(f"Study {self.study_name!r} has no complete trial yet")
        _atomic_write_text(sweep_dir / RESULTS_FILE, yaml.safe_dump(results, sort_keys=False))
        log.info(f"Results: {sweep_dir / RESULTS_FILE}")
        return results

"""The Optuna sweeper plugin (hydra_plugins/vrn_optuna_sweeper, ``hparams_search=vrn_optuna``).

The search-space parser on its own; Hydra finding the plugin; sweeps of a tiny Hydra app in a
subprocess (resume from the sqlite study, failed trials, GridSampler); and one real
``python -m vrn.train`` sweep that must find the better of two planted learning rates.
"""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.vrn_optuna_sweeper import search_space
from hydra_plugins.vrn_optuna_sweeper.search_space import (
    format_value,
    parse_search_space,
    trial_overrides,
)
from hydra_plugins.vrn_optuna_sweeper.sweeper import RESULTS_FILE
from tests.helpers import compose_config, tiny_train_overrides

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "hydra_plugins" / "vrn_optuna_sweeper"


# ----------------------------------------------------------------------------- search space


def _space(*lines: str, params: dict | None = None):
    return parse_search_space(params, list(lines))


def test_sweep_syntax_maps_to_optuna_distributions() -> None:
    space = _space(
        "lr=tag(log, interval(1e-5, 1e-2))",
        "momentum=interval(0, 0.95)",
        "layers=tag(int, interval(1, 4))",
        "bs=choice(2, 4, 8)",
        "act=relu,gelu",
        "depth=range(2, 10, 2)",
        "scale=range(0.5, 2.0, 0.5)",
        "width=tag(log, range(8, 65))",
        "+new.key=choice(a, 'b c')",
        "trainer.max_epochs=3",
    )
    d = space.distributions
    assert d["lr"] == FloatDistribution(1e-5, 1e-2, log=True)
    assert d["momentum"] == FloatDistribution(0.0, 0.95)
    assert d["layers"] == IntDistribution(1, 4)
    assert d["bs"] == CategoricalDistribution([2, 4, 8])
    assert d["act"] == CategoricalDistribution(["relu", "gelu"])
    assert d["depth"] == IntDistribution(2, 8, step=2)  # stop excluded, as in range()
    assert d["scale"] == FloatDistribution(0.5, 1.5, step=0.5)
    assert d["width"] == IntDistribution(8, 64, log=True)
    assert d["+new.key"] == CategoricalDistribution(["a", "b c"])
    assert space.fixed == ["trainer.max_epochs=3"]


def test_command_line_replaces_or_pins_a_configured_param() -> None:
    params = {"lr": "tag(log, interval(1e-5, 1e-2))", "bs": "choice(2, 4)", "momentum": "interval(0, 0.9)"}
    space = _space("lr=choice(1e-12, 3e-3)", "bs=2", params=params)
    assert space.distributions == {
        "lr": CategoricalDistribution([1e-12, 3e-3]),
        "momentum": FloatDistribution(0.0, 0.9),
    }
    assert space.fixed == ["bs=2"]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("a=tag(cosine, interval(0, 1))", "unknown tag"),
        ("a=tag(log, choice(1, 2))", "do not apply to choice"),
        ("a=interval(2, 1)", "low must be below high"),
        ("a=range(5, 5)", "is empty"),
        ("a=tag(log, interval(0, 1))", r"search space a="),  # Optuna: log scale needs low > 0
        ("a=tag(int, interval(0.5, 3))", "whole-number"),
        ("a=choice([1, 2], [3])", "numbers, strings"),
    ],
)
def test_bad_search_space_is_named(line: str, match: str) -> None:
    # the class as the module holds it now: Hydra's plugin scan (any earlier compose) re-executes
    # the plugin's modules in place, so a class imported at collection time is a stale copy
    with pytest.raises(search_space.SearchSpaceError, match=match):
        _space(line)


@pytest.mark.parametrize("value", [1e-12, 0.003, 3, -2, True, False, None, "relu", "a b", "null", "it's", "x=1,2"])
def test_trial_values_round_trip_through_hydra(value) -> None:
    override = OverridesParser.create().parse_override(trial_overrides({"k": value})[0])
    assert not override.is_sweep_override()
    back = override.value()
    assert back == value and type(back) is type(value), format_value(value)


# ----------------------------------------------------------------------------- the plugin in Hydra


def _runtime_imports(path: Path) -> list[tuple[str, bool]]:
    """(module, run at import time?) of every import statement of a file; imports under
    ``if TYPE_CHECKING:`` are left out (they never run)."""
    tree = ast.parse(path.read_text(), str(path))
    type_only = {
        id(c)
        for n in tree.body
        if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING"
        for c in ast.walk(n)
    }
    top = {
        id(c) for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom | ast.If | ast.Try) for c in ast.walk(n)
    }
    out = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", id(node) in top))
    return out


@pytest.mark.parametrize("path", sorted(PLUGIN.rglob("*.py")), ids=lambda p: p.name)
def test_plugin_is_generic_and_imports_optuna_lazily(path: Path) -> None:
    """No vrn / data_pipeline import (the plugin is generic); optuna only inside functions, because
    Hydra imports every plugin module whenever any Hydra app (vrn.train, vrn.demo, ...) starts."""
    imports = _runtime_imports(path)
    assert not [m for m, _ in imports if m.split(".")[0] in ("vrn", "data_pipeline", "tddfa_v2")]
    assert not [m for m, top in imports if top and m.split(".")[0] == "optuna"]


def test_hydra_finds_the_plugin_without_importing_optuna() -> None:
    code = (
        "import sys\n"
        "from hydra.core.plugins import Plugins\n"
        "from hydra.plugins.sweeper import Sweeper\n"
        "from hydra.core.config_store import ConfigStore\n"
        "names = [c.__name__ for c in Plugins.instance().discover(Sweeper)]\n"
        "print(names, ConfigStore.instance().list('hydra/sweeper'), 'optuna' in sys.modules)\n"
    )
    # from another folder: the installed (editable) package must be found, not the checkout on sys.path
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout
    assert "VrnOptunaSweeper" in out and "vrn_optuna.yaml" in out
    assert out.strip().endswith("False"), out


def test_vrn_optuna_config_composes_with_a_valid_search_space(tmp_path: Path) -> None:
    cfg = compose_config("train", ["hparams_search=vrn_optuna"], output_dir=tmp_path)
    assert cfg.hydra.mode.name == "MULTIRUN"
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.vrn_optuna_sweeper.sweeper.VrnOptunaSweeper"
    assert sweeper.direction == "maximize" and cfg.optimized_metric == "val/iou"
    space = parse_search_space(sweeper.params, [])
    assert space.distributions["model.optimizer.lr"].log
    assert set(space.distributions) == {
        "model.optimizer.lr",
        "model.optimizer.momentum",
        "model.pos_weight",
        "data.batch_size",
    }
    for key in space.distributions:  # every searched key exists in the composed training config
        parent, leaf = key.rsplit(".", 1)
        assert leaf in OmegaConf.select(cfg, parent), key


# ----------------------------------------------------------------------------- sweeps of a tiny app

APP = textwrap.dedent(
    """
    import math

    import hydra


    @hydra.main(version_base="1.3", config_path=".", config_name="app")
    def main(cfg):
        if cfg.mode == "raise":
            raise RuntimeError("planted failure")
        if cfg.mode == "exit":  # as vrn.train ends on Ctrl-C / SIGTERM / a user error
            raise SystemExit(130)
        if cfg.mode == "not_a_number":
            return math.nan
        return -((cfg.x - 0.7) ** 2)


    if __name__ == "__main__":
        main()
    """
)

APP_CONF = textwrap.dedent(
    """
    defaults:
      - override hydra/sweeper: vrn_optuna
      - _self_
    x: 0.0
    mode: ok
    hydra:
      mode: MULTIRUN
      sweeper:
        study_name: toy
        n_trials: 3
        sampler: {_target_: optuna.samplers.TPESampler, seed: 0}
        params:
          x: interval(0, 1)
    """
)


@pytest.fixture
def toy_app(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "app.yaml").write_text(APP_CONF)
    return tmp_path


def _run_app(app: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, str(app / "app.py"), *overrides], cwd=app, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _results(sweep_dir: Path) -> dict:
    return yaml.safe_load((sweep_dir / RESULTS_FILE).read_text())


def test_sweep_resumes_its_stored_study(toy_app: Path) -> None:
    _run_app(toy_app, f"hydra.sweep.dir={toy_app / 'first'}")
    first = _results(toy_app / "first")
    db = toy_app / "optuna.db"  # default storage: beside the sweep folders
    assert first["storage"] == f"sqlite:///{db}" and db.is_file()
    assert first["n_trials"] == {"total": 3, "complete": 3} and first["this_run"]["launched"] == 3
    study = optuna.load_study(study_name="toy", storage=first["storage"])
    before = [t.params["x"] for t in study.trials]
    # the job folders are numbered by trial; the best trial points to its own folder
    assert sorted(p.name for p in (toy_app / "first").iterdir() if p.is_dir()) == ["0", "1", "2"]
    assert first["best_job_dir"] == str(toy_app / "first" / str(first["best_trial"]))
    assert first["best_value"] == pytest.approx(-((first["best_params"]["x"] - 0.7) ** 2))
    assert first["best_overrides"] == [f"x={first['best_params']['x']!r}"]

    # the same command with n_trials=5 runs only the 2 missing trials, in a new sweep folder
    _run_app(toy_app, f"hydra.sweep.dir={toy_app / 'second'}", "hydra.sweeper.n_trials=5")
    second = _results(toy_app / "second")
    assert second["n_trials"] == {"total": 5, "complete": 5} and second["this_run"]["launched"] == 2
    study = optuna.load_study(study_name="toy", storage=second["storage"])
    assert [t.params["x"] for t in study.trials[:3]] == before
    assert sorted(p.name for p in (toy_app / "second").iterdir() if p.is_dir()) == ["3", "4"]
    values = [t.value for t in study.trials]
    assert second["best_value"] == max(values) and second["best_value"] >= first["best_value"]

    # a finished study launches nothing and still reports its best
    _run_app(toy_app, f"hydra.sweep.dir={toy_app / 'third'}", "hydra.sweeper.n_trials=5")
    third = _results(toy_app / "third")
    assert third["this_run"]["launched"] == 0 and third["best_trial"] == second["best_trial"]


def test_failed_trials_are_told_fail_and_the_grid_ends_the_sweep(toy_app: Path) -> None:
    """A trial that raises or returns NaN is FAIL, the others go on; GridSampler gets its grid
    from the choices and ends the sweep when every point is tried (here before 3 complete)."""
    sweep = toy_app / "grid"
    proc = _run_app(
        toy_app,
        f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.sampler._target_=optuna.samplers.GridSampler",
        "mode=choice(ok, raise, not_a_number)",
        "x=0.5",
    )
    res = _results(sweep)
    assert res["n_trials"] == {"total": 3, "complete": 1, "fail": 2}
    assert res["best_params"] == {"mode": "ok"} and res["best_value"] == pytest.approx(-0.04)
    logged = proc.stdout + proc.stderr  # Hydra logs to stdout
    assert "failed (raised RuntimeError: planted failure)" in logged and "failed (returned nan)" in logged
    study = optuna.load_study(study_name="toy", storage=res["storage"])
    failed = {t.params["mode"] for t in study.trials if t.state == TrialState.FAIL}
    assert failed == {"raise", "not_a_number"}
    assert all(t.user_attrs["overrides"][0] == "x=0.5" for t in study.trials)  # fixed overrides reach every trial


def test_a_trial_that_ends_the_process_stops_the_sweep_and_leaves_no_trial_running(toy_app: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "app.py", f"hydra.sweep.dir={toy_app / 'exit'}", "mode=exit"],
        cwd=toy_app,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 130, proc.stderr[-2000:]
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{toy_app / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL]  # one trial launched, marked, no more


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["x=tag(log, interval(0, 1))"], "search space x="),
        (
            [
                "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler",
                "+hydra.sweeper.sampler.n_startup_trials=5",
            ],
            "hydra.sweeper.sampler: cannot build optuna.samplers.RandomSampler",
        ),
    ],
    ids=["search_space", "sampler"],
)
def test_a_bad_setting_stops_before_any_trial(toy_app: Path, overrides: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "app.py", f"hydra.sweep.dir={toy_app / 'bad'}", *overrides],
        cwd=toy_app,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (toy_app / "bad" / RESULTS_FILE).exists()
    assert not (toy_app / "optuna.db").exists()  # no study was created


# ----------------------------------------------------------------------------- the real training


@pytest.mark.slow
def test_vrn_train_sweep_finds_the_better_of_two_planted_lrs(synthetic_packed: Path, tmp_path: Path) -> None:
    """3 trials of a few-step vrn_tiny training: lr 1e-12 leaves the network at its (seeded)
    initialisation, lr 3e-3 lowers the validation loss within 3 steps; the sweep must pick 3e-3."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "vrn.train",
        "hparams_search=vrn_optuna",
        *tiny_train_overrides(synthetic_packed, "csv"),
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "callbacks=none",
        "test=false",
        # the planted pair; the other searched values pinned (pos_weight changes the loss scale)
        "model.optimizer.lr=choice(1e-12, 3e-3)",
        "model.optimizer.momentum=0.0",
        "model.pos_weight=null",
        "optimized_metric=val/loss",
        "hydra.sweeper.direction=minimize",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={sweep}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _results(sweep)
    assert res["storage"] == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert res["n_trials"] == {"total": 3, "complete": 3}
    study = optuna.load_study(study_name=res["study_name"], storage=res["storage"])
    by_lr = {t.params["model.optimizer.lr"]: t.value for t in study.trials}
    assert set(by_lr) == {1e-12, 3e-3}, "the seeded sampler must try both planted values"
    assert all(math.isfinite(v) for v in by_lr.values())
    assert by_lr[3e-3] < 0.95 * by_lr[1e-12], by_lr  # clearly apart, not a tie broken by chance
    assert res["best_params"] == {"model.optimizer.lr": 3e-3}
    assert res["best_overrides"] == ["model.optimizer.lr=0.003"]
    assert res["best_job_overrides"][0] == "hparams_search=vrn_optuna"
    assert res["best_job_overrides"][-1] == "model.optimizer.lr=0.003"
    assert {"model.pos_weight=null", "optimized_metric=val/loss"} <= set(res["best_job_overrides"])
    assert Path(res["best_job_dir"]).is_dir() and (Path(res["best_job_dir"]) / "csv").is_dir()

"""The whole pipeline: crop -> fit -> voxelize -> reap -> pack.

``python -m data_pipeline.run input_dir=<photos> output_dir=<out> [detector=tddfa] [fitter=tddfa] [n_jobs=4]``

Each stage runs in its own subfolder of ``output_dir`` (``crop/``, ``fit/``,
``voxelize/``, ``reap/``, ``packed/``); every stage skips what is already done, so the
same command resumes an interrupted run. ``--config-name 300w_lp`` is the 300W-LP /
AFLW2000-3D preset (landmarks and fits from the ``.mat`` files).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from data_pipeline.runner import run_stage
from data_pipeline.stage import PipelineInputError, PipelineRunError, Stage, StageConfigError

log = logging.getLogger("data_pipeline")

__all__ = ["STAGES", "STAGE_DIRS", "build_stage", "run_single_stage", "run_pipeline", "ConfigError"]

STAGES = ("crop", "fit", "voxelize", "reap", "pack")
#: subfolder of the run's output_dir per stage
STAGE_DIRS = {"crop": "crop", "fit": "fit", "voxelize": "voxelize", "reap": "reap", "pack": "packed"}


class ConfigError(ValueError):
    """A bad config value; the message names the key and what to do."""


def _instantiate(node: DictConfig, key: str, **kw: Any) -> Any:
    try:
        return hydra.utils.instantiate(node, **kw)
    except Exception as e:  # hydra wraps the constructor's error: show the root cause with the key
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ImportError):
            raise ConfigError(f"{key}: {cause}") from e
        raise ConfigError(f"{key}: cannot build {node.get('_target_')}: {cause}") from e


def build_stage(cfg: DictConfig, name: str) -> Stage:
    """The stage object ``name`` from a composed pipeline config."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}' in stages; known: {', '.join(STAGES)}")
    if name not in cfg:
        raise ConfigError(f"config has no '{name}' section")
    if name == "crop":
        return _instantiate(cfg.crop, "crop", detector=_instantiate(cfg.detector, "detector"))
    if name == "fit":
        return _instantiate(cfg.fit, "fit", fitter=_instantiate(cfg.fitter, "fitter"))
    return _instantiate(cfg[name], name)


def _require(cfg: DictConfig, key: str, example: str) -> str:
    if key not in cfg or OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
        raise ConfigError(f"{key} is required: {example}")
    return str(cfg[key])


def _runner_kwargs(cfg: DictConfig) -> dict[str, Any]:
    n_jobs = int(cfg.get("n_jobs", 1))
    if n_jobs < 1:
        raise ConfigError(f"n_jobs must be >= 1, got {n_jobs}")
    return {
        "n_jobs": n_jobs,
        "progress": bool(cfg.get("progress", True)),
        "overwrite": bool(cfg.get("overwrite", False)),
        "retry_failed": bool(cfg.get("retry_failed", False)),
        "torch_threads": cfg.get("torch_threads"),
    }


def _stage_kwargs(cfg: DictConfig, stage: Stage) -> dict[str, Any]:
    kw = _runner_kwargs(cfg)
    if stage.kind == "reduce":
        kw = {"progress": kw["progress"], "overwrite": kw["overwrite"]}
    return kw


def run_single_stage(cfg: DictConfig, name: str, exit_on_error: bool = True) -> dict[str, Any]:
    """Entry point of ``python -m data_pipeline.<name>``: validate, build, run."""
    try:
        prev = STAGES[STAGES.index(name) - 1] if name != "crop" else None
        what = "a folder of photos" if prev is None else f"the output_dir of the '{prev}' stage"
        inp = _require(
            cfg,
            "input_dir",
            f"pass input_dir=<{what}>, e.g. python -m data_pipeline.{name} input_dir=... output_dir=...",
        )
        out = _require(cfg, "output_dir", f"pass output_dir=<folder for the {name} stage's outputs>")
        stage = build_stage(cfg, name)
        kw = _stage_kwargs(cfg, stage)
        return run_stage(stage, inp, out, **kw)
    except (ConfigError, PipelineInputError, StageConfigError, ImportError) as e:
        if not exit_on_error:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except PipelineRunError as e:  # a run fault: one line, non-zero exit, a rerun resumes
        if not exit_on_error:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.stages`` in order; returns ``{stage: manifest or summary}``."""
    inp = _require(
        cfg,
        "input_dir",
        "pass input_dir=<a folder of photos>, e.g. python -m data_pipeline.run input_dir=photos/ output_dir=out/",
    )
    out = Path(_require(cfg, "output_dir", "pass output_dir=<folder for all stage outputs>"))
    names = list(cfg.get("stages", STAGES))
    for n in names:
        if n not in STAGES:
            raise ConfigError(f"stages: unknown stage '{n}'; known: {', '.join(STAGES)}")
    order = [n for n in STAGES if n in names]
    if order != names:
        raise ConfigError(f"stages must keep the pipeline order {list(STAGES)}, got {names}")
    stages = {n: build_stage(cfg, n) for n in names}  # fail on config errors before any work
    results: dict[str, Any] = {}
    for n in names:
        i = STAGES.index(n)
        src = Path(inp) if i == 0 else out / STAGE_DIRS[STAGES[i - 1]]
        log.info(f"=== {n}: {src} -> {out / STAGE_DIRS[n]}")
        results[n] = run_stage(stages[n], src, out / STAGE_DIRS[n], **_stage_kwargs(cfg, stages[n]))
    return results


@hydra.main(version_base="1.3", config_path="../conf/pipeline", config_name="run")
def main(cfg: DictConfig) -> None:
    try:
        run_pipeline(cfg)
    except (ConfigError, PipelineInputError, StageConfigError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except PipelineRunError as e:  # a run fault: one line, non-zero exit, a rerun resumes
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

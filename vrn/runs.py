"""Compare training runs offline: ``python -m vrn.runs compare <multirun folder | run folders...>``.

Each run folder of ``vrn.train`` holds its Hydra record (``.hydra/overrides.yaml``,
``.hydra/config.yaml``) and its validation history: ``metrics.jsonl`` written by
:class:`vrn.callbacks.RunSummary` whatever logger is configured (else the CSV logger's
``csv/version_*/metrics.csv``). This command prints one table row per run -- the overrides that
differ between the runs, the best value of the ranked metric, its epoch and step, and the final
value -- sorted best first, and writes ``comparison.png`` with the validation curves (metric vs
optimizer step) of all runs overlaid.

The ranked metric is ``--metric`` or the runs' ``optimized_metric`` (``val/iou``); its direction
is ``--mode`` or the ``mode`` of the run's :class:`~vrn.callbacks.RunSummary` /
``ModelCheckpoint`` watching it, else ``min`` for losses and errors and ``max`` otherwise.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig, OmegaConf

from vrn.atomic_write import atomic_write
from vrn.cli_errors import UserError, run_cli

__all__ = [
    "RunRecord",
    "compare",
    "find_runs",
    "format_table",
    "load_run",
    "main",
    "metric_mode",
    "plot_curves",
    "varying_overrides",
]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "comparison.png"
#: metric names ranked low-is-better when neither --mode nor the run's config says
_LOWER_IS_BETTER = ("loss", "mae", "nme", "error", "err")


@dataclass
class RunRecord:
    """One training run as read from its folder.

    Attributes:
        path: the run folder.
        overrides: the job's Hydra overrides (``key=value`` strings, command-line order).
        config: the job's composed config (``.hydra/config.yaml``).
        history: one dict per validation, ``{"epoch": int, "step": int, "<metric>": float | None}``,
            in training order.
    """

    path: Path
    overrides: list[str]
    config: DictConfig
    history: list[dict[str, Any]] = field(default_factory=list)

    def curve(self, metric: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``metric`` over the validations that have a value."""
        pts = [(int(r["step"]), float(r[metric])) for r in self.history if _number(r.get(metric)) is not None]
        return [s for s, _ in pts], [v for _, v in pts]

    def best(self, metric: str, mode: str) -> dict[str, Any] | None:
        """``{"value", "epoch", "step"}`` of the best validation (the earliest on ties), or None."""
        rows = [r for r in self.history if _number(r.get(metric)) is not None]
        if not rows:
            return None
        sign = 1.0 if mode == "max" else -1.0
        top = max(rows, key=lambda r: sign * float(r[metric]))
        return {"value": float(top[metric]), "epoch": top.get("epoch"), "step": top.get("step")}

    def final(self, metric: str) -> float | None:
        """The value of ``metric`` at the last validation that has one."""
        _, values = self.curve(metric)
        return values[-1] if values else None


def _number(v: Any) -> float | None:
    """``v`` as a finite-or-infinite float, None for missing / empty / NaN."""
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _is_run(folder: Path) -> bool:
    return (folder / ".hydra" / "config.yaml").is_file()


def _run_sort_key(p: Path) -> tuple[int, int | str]:
    return (0, int(p.name)) if p.name.isdigit() else (1, str(p))


def find_runs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The run folders in ``paths``: each path is a run folder itself (``.hydra/config.yaml``)
    or a folder holding runs at any depth (a multirun folder, ``outputs/train/runs``).
    Numbered jobs come in job order.

    Raises:
        UserError: a path does not exist, or holds no run.
    """
    runs: list[Path] = []
    for given in paths:
        p = Path(given).expanduser()
        if not p.is_dir():
            raise UserError(
                f"{p} is not a folder: give a multirun folder (outputs/train/multiruns/<date>) or run folders"
            )
        found = (
            [p] if _is_run(p) else sorted({c.parent.parent for c in p.rglob(".hydra/config.yaml")}, key=_run_sort_key)
        )
        if not found:
            raise UserError(
                f"{p} holds no training run (no <run>/.hydra/config.yaml below it): "
                "give a folder written by `python -m vrn.train` (-m)"
            )
        runs += [r for r in found if r not in runs]
    return runs


def _history_from_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def _history_from_csv(run_dir: Path) -> list[dict[str, Any]]:
    """Validation rows of the CSV logger (the newest ``csv/version_*``): rows with a ``val/`` value."""
    versions = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not versions:
        return []
    out = []
    with versions[-1].open(newline="") as f:
        for row in csv.DictReader(f):
            vals = {k: _number(v) for k, v in row.items() if k.startswith("val/")}
            if any(v is not None for v in vals.values()):
                out.append(
                    {"epoch": int(float(row.get("epoch") or 0)), "step": int(float(row.get("step") or 0)), **vals}
                )
    return out


def load_run(run_dir: str | os.PathLike) -> RunRecord:
    """Read one run folder (see the module docstring for the files).

    Raises:
        UserError: the folder has no ``.hydra/config.yaml``, or a file cannot be parsed.
    """
    d = Path(run_dir)
    if not _is_run(d):
        raise UserError(f"{d} is not a run folder of vrn.train (no .hydra/config.yaml)")
    try:
        config = OmegaConf.load(d / ".hydra" / "config.yaml")
        ov_path = d / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(ov_path)] if ov_path.is_file() else []
        history = _history_from_jsonl(d / METRICS_FILE) if (d / METRICS_FILE).is_file() else _history_from_csv(d)
    except (OSError, ValueError) as e:  # yaml / json errors are ValueErrors
        raise UserError(f"{d}: cannot read the run's files ({type(e).__name__}: {e})") from e
    assert isinstance(config, DictConfig)
    return RunRecord(d, overrides, config, history)


def metric_mode(metric: str, config: DictConfig | None = None) -> str:
    """``max`` or ``min`` for ``metric``: the ``mode`` of a callback in ``config`` that watches it
    (``callbacks.*.monitor``), else ``min`` for losses / errors, else ``max``."""
    for cb in ((config or {}).get("callbacks") or {}).values():
        if isinstance(cb, DictConfig) and cb.get("monitor") == metric and cb.get("mode") in ("max", "min"):
            return str(cb.mode)
    name = metric.rsplit("/", 1)[-1].lower()
    return "min" if any(t in name for t in _LOWER_IS_BETTER) else "max"


def _split(o: str) -> tuple[str, str]:
    k, _, v = o.partition("=")
    return k.lstrip("+~"), v


def varying_overrides(runs: Sequence[RunRecord]) -> list[str]:
    """Override keys whose value differs between ``runs`` (or that some runs lack), in first-seen
    order; all of a single run's keys."""
    per_run = [dict(_split(o) for o in r.overrides) for r in runs]
    keys: list[str] = []
    for d in per_run:
        keys += [k for k in d if k not in keys]
    if len(runs) <= 1:
        return keys
    return [k for k in keys if len({d.get(k) for d in per_run}) > 1]


def _label(run: RunRecord, keys: Sequence[str]) -> str:
    d = dict(_split(o) for o in run.overrides)
    parts = [f"{k}={d[k]}" for k in keys if k in d]
    return " ".join(parts) if parts else run.path.name


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], metric: str, mode: str) -> str:
    """A Markdown table of ``rows`` (dicts from :func:`compare`), already in rank order."""
    head = ["rank", "run", "overrides", f"best {metric} ({mode})", "best epoch", "best step", f"final {metric}"]
    body = [
        [
            str(i + 1),
            r["run"],
            r["label"],
            _fmt(r["best"]),
            _fmt(r["best_epoch"]),
            _fmt(r["best_step"]),
            _fmt(r["final"]),
        ]
        for i, r in enumerate(rows)
    ]
    widths = [max(len(h), *(len(b[j]) for b in body)) if body else len(h) for j, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def plot_curves(runs: Sequence[RunRecord], labels: Sequence[str], metric: str, mode: str, out: Path) -> Path:
    """Write a PNG of ``metric`` vs optimizer step, one line per run labelled by ``labels``."""
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for run, label in zip(runs, labels):
        steps, values = run.curve(metric)
        if steps:
            ax.plot(steps, values, marker="o", markersize=3, linewidth=1.5, label=label)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(out, buf.getvalue(), fsync=False)


def compare(
    paths: Sequence[str | os.PathLike],
    metric: str | None = None,
    mode: str | None = None,
    out: str | os.PathLike | None = None,
) -> tuple[list[dict[str, Any]], str, str, Path]:
    """Read the runs under ``paths``, rank them and plot their curves.

    Args:
        paths: a multirun folder, or run folders (see :func:`find_runs`).
        metric: ranked metric; None: the first run's ``optimized_metric``.
        mode: ``max`` / ``min``; None: :func:`metric_mode`.
        out: the PNG; None: ``comparison.png`` in the given folder (several: their common folder).

    Returns:
        (rows best first, metric, mode, png path). Each row: ``run`` (folder name), ``path``,
        ``label`` (differing overrides), ``best``, ``best_epoch``, ``best_step``, ``final``,
        ``validations``. Runs without a value of the metric come last.

    Raises:
        UserError: no runs, or no run has a value of the metric.
    """
    if mode is not None and mode not in ("max", "min"):
        raise UserError(f"--mode {mode} must be max or min")
    runs = [load_run(p) for p in find_runs(paths)]
    metric = metric or str(runs[0].config.get("optimized_metric") or "val/iou")
    mode = mode or metric_mode(metric, runs[0].config)
    if not any(r.curve(metric)[0] for r in runs):
        raise UserError(
            f"none of the {len(runs)} runs has values of {metric} (no metrics.jsonl or csv logger rows with it): "
            "pick another with --metric, or check that the runs validated at least once"
        )
    keys = varying_overrides(runs)
    labels = [_label(r, keys) for r in runs]
    rows = []
    for r, label in zip(runs, labels):
        b = r.best(metric, mode)
        rows.append(
            {
                "run": r.path.name,
                "path": str(r.path),
                "label": label,
                "best": b["value"] if b else None,
                "best_epoch": b["epoch"] if b else None,
                "best_step": b["step"] if b else None,
                "final": r.final(metric),
                "validations": len(r.curve(metric)[0]),
            }
        )
    sign = -1.0 if mode == "max" else 1.0
    rows.sort(key=lambda row: (row["best"] is None, sign * row["best"] if row["best"] is not None else 0.0))
    if out is None:
        given = [Path(p).expanduser().resolve() for p in paths]
        out = (Path(os.path.commonpath(given)) if len(given) > 1 else given[0]) / PLOT_FILE
    png = plot_curves(runs, labels, metric, mode, Path(out))
    return rows, metric, mode, png


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vrn.runs", description="Inspect training runs of vrn.train.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "compare",
        help="table of the runs' overrides vs best / final metric, and their learning curves (PNG)",
        description="Rank training runs by a validation metric and plot their curves.",
    )
    c.add_argument("paths", nargs="+", help="a multirun folder (outputs/train/multiruns/<date>) or run folders")
    c.add_argument("--metric", default=None, help="metric to rank by (default: the runs' optimized_metric)")
    c.add_argument("--mode", choices=("max", "min"), default=None, help="direction (default: from the run config)")
    c.add_argument("--out", default=None, help="PNG path (default: <folder>/comparison.png)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> int:
        rows, metric, mode, png = compare(args.paths, args.metric, args.mode, args.out)
        print(format_table(rows, metric, mode))
        print(f"\nlearning curves: {png}")
        return 0

    return run_cli("vrn.runs", body)


if __name__ == "__main__":
    sys.exit(main())

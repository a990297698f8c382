"""Paired comparison of two evaluations on the same faces: is checkpoint B better than A?

``python -m vrn.eval_comparison NEW/results.json OLD/results.json [--metric nme_icp] [--json OUT]``

Two :mod:`vrn.evaluate` runs on the same data score the same faces; their rows (``results.json``'s
``samples``) are matched by ``id`` and, per yaw bucket (:func:`vrn.nme.rows_by_yaw_bucket`), the
difference of a metric is averaged face by face: ``first - second``, with its standard error
``std(d, ddof=1) / sqrt(n)``. Paired differences are far less noisy than the difference of two
bucket means (the faces' own difficulty cancels), which is how small changes between two
checkpoints can be told from noise. The bucket-balanced line is the difference of the mean of the
three bucket means (3DDFA's "mean"), its standard error ``sqrt(sum se_b^2) / 3``.

Each side is ``PATH`` or ``PATH:METRIC`` (``--metric`` for those without one), so one run can also
be compared with itself on two columns, e.g. the model against the posed mean face on the same faces:
``python -m vrn.eval_comparison R/results.json:bench_surf_vrn R/results.json:bench_surf_posed_mean_face``.
Percent metrics are shown in percent (the report's own scale).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vrn.aflw_benchmark import BENCHMARK_COLUMNS
from vrn.atomic_write import atomic_write
from vrn.cli_errors import UserError, run_cli
from vrn.evaluate import METRICS
from vrn.nme import YAW_BUCKETS, bucket_names, rows_by_yaw_bucket

__all__ = ["BucketDifference", "Side", "compare_rows", "load_side", "markdown", "main"]

#: report scale of each metric (100 = shown in percent): vrn.evaluate's own table definitions
#: (any other row key, e.g. confidence_mean, is shown as stored)
_SCALE: dict[str, float] = {**{m[0]: m[2] for m in METRICS}, **{c[0]: c[3] for c in BENCHMARK_COLUMNS}}


@dataclass(frozen=True)
class Side:
    """One side of the comparison: the rows of one ``results.json`` and the metric read from them."""

    label: str
    metric: str
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class BucketDifference:
    """``first - second`` over the faces scored by both, in the metric's report scale.

    ``se`` is None below 2 faces (``diff`` alone is then no evidence)."""

    bucket: str
    n: int
    first: float | None
    second: float | None
    diff: float | None
    se: float | None


def load_side(spec: str, default_metric: str) -> Side:
    """``PATH`` or ``PATH:METRIC`` -> :class:`Side`.

    Raises:
        UserError: the file is missing, not a vrn.evaluate ``results.json``, or no row has the metric.
    """
    path_s, metric = spec, default_metric
    if ":" in spec and not Path(spec).is_file():
        path_s, metric = spec.rsplit(":", 1)
    path = Path(path_s)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise UserError(f"{path}: no such file; give a vrn.evaluate run folder or its results.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e}); give a vrn.evaluate results.json") from e
    rows = data.get("samples") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise UserError(f"{path}: has no 'samples' list; is it a vrn.evaluate results.json?")
    if not any(r.get(metric) is not None for r in rows):
        have = sorted(
            {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
        raise UserError(f"{path}: no row has metric {metric!r}; numeric keys there: {', '.join(have)}")
    return Side(label=f"{path}:{metric}", metric=metric, rows=rows)


def _value(row: dict[str, Any], metric: str) -> float:
    v = row.get(metric)
    return float(v) if v is not None and math.isfinite(float(v)) else math.nan


def compare_rows(first: Side, second: Side) -> dict[str, Any]:
    """Paired ``first - second`` per yaw bucket, over all faces and bucket-balanced.

    Returns:
        ``{"buckets": [BucketDifference...] (YAW_BUCKETS order, then "all"), "balanced":
        BucketDifference (n = faces in all buckets; None values unless all three buckets have
        faces), "only_first": ids, "only_second": ids, "unpaired_missing": faces in both whose
        metric is missing on a side}``.

    Raises:
        UserError: the two sides share no face id, or a shared face has two different yaws
        (not the same data).
    """
    by_id = {str(r["id"]): r for r in second.rows}
    common = [r for r in first.rows if str(r["id"]) in by_id]
    if not common:
        raise UserError(f"{first.label} and {second.label} share no face id: not evaluations of the same data")
    for r in common:
        ya, yb = r.get("yaw"), by_id[str(r["id"])].get("yaw")
        if ya is not None and yb is not None and abs(float(ya) - float(yb)) > 1e-6:
            raise UserError(
                f"face {r['id']!r} has yaw {ya} in {first.label} but {yb} in {second.label}: not the same data"
            )
    first_ids = {str(r["id"]) for r in first.rows}
    scale = _SCALE.get(first.metric, 1.0) if _SCALE.get(first.metric) == _SCALE.get(second.metric) else 1.0

    def diff_of(rows: list[dict[str, Any]], name: str) -> tuple[BucketDifference, int]:
        a = np.array([_value(r, first.metric) for r in rows], np.float64)
        b = np.array([_value(by_id[str(r["id"])], second.metric) for r in rows], np.float64)
        ok = np.isfinite(a) & np.isfinite(b)
        n = int(ok.sum())
        if n == 0:
            return BucketDifference(name, 0, None, None, None, None), len(rows)
        d = (a[ok] - b[ok]) * scale
        se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else None
        return (
            BucketDifference(name, n, float(a[ok].mean() * scale), float(b[ok].mean() * scale), float(d.mean()), se),
            len(rows) - n,
        )

    groups = rows_by_yaw_bucket(common)
    buckets, missing = [], 0
    for name in [*bucket_names(), *[g for g in groups if g not in bucket_names()]]:
        bd, m = diff_of(groups.get(name, []), name)
        buckets.append(bd)
        missing += m
    overall, _ = diff_of(common, "all")
    per = [b for b in buckets if b.bucket in bucket_names()]
    if all(b.n > 1 for b in per) and len(per) == len(YAW_BUCKETS):
        k = len(per)
        balanced = BucketDifference(
            "balanced",
            sum(b.n for b in per),
            sum(b.first for b in per) / k,  # type: ignore[misc]
            sum(b.second for b in per) / k,  # type: ignore[misc]
            sum(b.diff for b in per) / k,  # type: ignore[misc]
            math.sqrt(sum(b.se**2 for b in per)) / k,  # type: ignore[operator]
        )
    else:
        balanced = BucketDifference("balanced", sum(b.n for b in per), None, None, None, None)
    return {
        "buckets": [*buckets, overall],
        "balanced": balanced,
        "only_first": sorted(first_ids - set(by_id)),
        "only_second": sorted(set(by_id) - first_ids),
        "unpaired_missing": missing,
    }


def _cell(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(first: Side, second: Side, result: dict[str, Any]) -> str:
    """The comparison as a Markdown table (one row per yaw bucket, all, balanced)."""
    digits = 2 if _SCALE.get(first.metric, 1.0) != 1.0 else 4
    lines = [
        f"first: `{first.label}`",
        f"second: `{second.label}`",
        "",
        "| yaw | paired faces | first | second | first - second (paired, +- SE) |",
        "|---|---:|---:|---:|---|",
    ]
    for b in [*result["buckets"], result["balanced"]]:
        d = "-" if b.diff is None else f"{b.diff:+.{digits}f}" + ("" if b.se is None else f" +- {b.se:.{digits}f}")
        lines.append(f"| {b.bucket} | {b.n} | {_cell(b.first, digits)} | {_cell(b.second, digits)} | {d} |")
    extra = []
    if result["only_first"] or result["only_second"]:
        extra.append(f"faces only in first: {len(result['only_first'])}, only in second: {len(result['only_second'])}")
    if result["unpaired_missing"]:
        extra.append(f"faces in both with the metric missing on a side: {result['unpaired_missing']}")
    return "\n".join(lines + ([""] + extra if extra else [])) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m vrn.eval_comparison", description=__doc__.split("\n\n")[0])
    p.add_argument("first", help="results.json (or its run folder) of the new run, optionally :METRIC")
    p.add_argument("second", help="results.json of the run to compare against, optionally :METRIC")
    p.add_argument("--metric", default="nme_icp", help="metric for sides without :METRIC (default nme_icp)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)

    def body() -> dict[str, Any]:
        first, second = load_side(args.first, args.metric), load_side(args.second, args.metric)
        result = compare_rows(first, second)
        print(markdown(first, second, result), end="", flush=True)
        if args.json is not None:
            out = {
                "first": first.label,
                "second": second.label,
                **{k: v for k, v in result.items() if k not in ("buckets", "balanced")},
                "buckets": [asdict(b) for b in result["buckets"]],
                "balanced": asdict(result["balanced"]),
            }
            atomic_write(args.json, json.dumps(out, indent=2).encode())
        return result

    return run_cli("vrn.eval_comparison", body)


if __name__ == "__main__":
    main()

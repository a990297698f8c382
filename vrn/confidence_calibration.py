"""Does a face's mean confidence flag its bad reconstructions? Face-level calibration statistics.

Each reconstructed face gets ``confidence_mean``, the mean of its vertices' confidence
(:mod:`vrn.volume.confidence`). :func:`vrn.evaluate` scores it against the face's error (the
surface NME) with :func:`confidence_vs_error`:

* ``spearman``: rank correlation of confidence and error over the faces; negative means
  lower-confidence faces tend to have larger errors (a useful signal), 0 none.
* ``low_in_worst``: of the ``k = ceil(n * fraction)`` lowest-confidence faces, the share that
  are among the ``k`` faces with the largest error. A confidence that carries no information
  scores about ``fraction`` (the chance level); a perfect one scores 1.
* ``error_low`` / ``error_rest``: mean error of those ``k`` faces and of the others.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import spearmanr

__all__ = ["ConfidenceCalibration", "confidence_vs_error", "DEFAULT_FRACTION", "MIN_FACES"]

#: the share of faces in the "lowest confidence" and "largest error" groups (a decile)
DEFAULT_FRACTION = 0.1

#: fewer faces than this give no statistics (a decile of fewer than 2 faces means little)
MIN_FACES = 20


@dataclass(frozen=True)
class ConfidenceCalibration:
    """Face confidence against face error (module doc); floats are NaN when undefined."""

    n: int
    fraction: float
    spearman: float
    low_in_worst: float
    error_low: float
    error_rest: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def confidence_vs_error(
    confidence: np.ndarray, error: np.ndarray, fraction: float = DEFAULT_FRACTION
) -> ConfidenceCalibration:
    """Calibration of per-face confidence against per-face error.

    Args:
        confidence: (N,) float face confidence (higher = surer); NaN entries are dropped
            together with their errors.
        error: (N,) float face error (higher = worse), e.g. the surface NME; NaN dropped.
        fraction: the share of faces in the "lowest confidence" and "largest error" groups.
    Returns:
        the statistics; with fewer than :data:`MIN_FACES` valid faces every float is NaN.
    Raises:
        ValueError: ``confidence`` and ``error`` differ in length, or ``fraction`` not in (0, 0.5].
    """
    c = np.asarray(confidence, np.float64).ravel()
    e = np.asarray(error, np.float64).ravel()
    if c.shape != e.shape:
        raise ValueError(f"confidence ({c.shape[0]}) and error ({e.shape[0]}) need one value per face")
    if not 0.0 < fraction <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5], got {fraction}")
    ok = np.isfinite(c) & np.isfinite(e)
    c, e = c[ok], e[ok]
    n = int(len(c))
    nan = float("nan")
    if n < MIN_FACES:
        return ConfidenceCalibration(n, fraction, nan, nan, nan, nan)
    k = int(math.ceil(n * fraction))
    low = np.argsort(c, kind="stable")[:k]  # the k lowest-confidence faces
    worst = np.argsort(-e, kind="stable")[:k]  # the k largest errors
    rest = np.ones(n, bool)
    rest[low] = False
    rho = float(spearmanr(c, e).statistic) if np.ptp(c) > 0 and np.ptp(e) > 0 else nan
    return ConfidenceCalibration(
        n=n,
        fraction=fraction,
        spearman=rho,
        low_in_worst=len(np.intersect1d(low, worst)) / k,
        error_low=float(e[low].mean()),
        error_rest=float(e[rest].mean()),
    )

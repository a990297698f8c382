"""Face-level confidence calibration (vrn.confidence_calibration) and its report section."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vrn.confidence_calibration import MIN_FACES, confidence_vs_error
from vrn.evaluate import confidence_section


def test_a_perfect_confidence_finds_every_worst_face() -> None:
    err = np.linspace(0.01, 0.2, 40)
    st = confidence_vs_error(1.0 - err, err)  # confidence falls exactly as the error grows
    assert st.n == 40 and st.spearman == pytest.approx(-1.0)
    assert st.low_in_worst == 1.0
    # k = 4: the 4 largest errors vs the mean of the other 36
    assert st.error_low == pytest.approx(err[-4:].mean()) and st.error_rest == pytest.approx(err[:-4].mean())


def test_hand_counted_overlap_and_means() -> None:
    """20 faces, k = 2: the two lowest confidences are faces 0 and 1; the two largest errors are
    faces 0 and 5, so one of the two is found."""
    conf = np.arange(20, dtype=float) + 1.0
    err = np.full(20, 1.0)
    err[0], err[5], err[1] = 9.0, 8.0, 2.0
    st = confidence_vs_error(conf, err)
    assert st.low_in_worst == 0.5
    assert st.error_low == pytest.approx((9.0 + 2.0) / 2)
    assert st.error_rest == pytest.approx((8.0 + 17 * 1.0) / 18)


def test_an_uninformative_confidence_scores_chance() -> None:
    rng = np.random.default_rng(0)
    st = confidence_vs_error(rng.random(20000), rng.random(20000))
    assert abs(st.spearman) < 0.03 and abs(st.low_in_worst - 0.1) < 0.02
    assert st.error_low == pytest.approx(st.error_rest, abs=0.02)


def test_nans_are_dropped_and_small_sets_give_nan() -> None:
    err = np.linspace(0.0, 1.0, MIN_FACES + 2)
    conf = -err.copy()
    conf[0], err[1] = np.nan, np.nan
    assert confidence_vs_error(conf, err).n == MIN_FACES
    small = confidence_vs_error(conf[:5], err[:5])
    assert small.n == 3 and math.isnan(small.spearman) and small.to_dict()["spearman"] is None


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"confidence \(3\) and error \(2\)"):
        confidence_vs_error(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 0.5\], got 0.7"):
        confidence_vs_error(np.ones(30), np.ones(30), fraction=0.7)


def test_report_section_per_bucket_in_order() -> None:
    rng = np.random.default_rng(1)
    rows = []
    for yaw, n in ((75.0, 30), (-10.0, 40), (45.0, 10)):  # (60, 90], [0, 30], (30, 60]
        e = rng.random(n)
        rows += [{"yaw": yaw, "bench_surf_vrn": x, "nme_icp": 5.0, "confidence_mean": -x} for x in e.tolist()]
    rows.append({"yaw": 3.0, "bench_surf_vrn": None, "confidence_mean": None})  # an empty prediction
    md, js = confidence_section(rows)
    assert js["error"] == "bench_surf_vrn"  # the benchmark's surface metric wins over nme_icp
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| yaw")]
    assert [ln.split(" | ")[0] for ln in table] == ["| [0, 30]", "| (30, 60]", "| (60, 90]", "| all"]
    assert js["[0, 30]"]["n"] == 40 and js["(30, 60]"]["spearman"] is None  # 10 faces: too few
    assert js["all"]["n"] == 80 and js["(60, 90]"]["spearman"] == pytest.approx(-1.0)
    assert "| (30, 60] | 10 | - | - | - | - |" in md
    assert confidence_section([{"yaw": 0.0, "nme_icp": 0.1}]) == ("", {})  # no confidence


def test_score_sample_records_the_face_confidence(synthetic_packed) -> None:
    """A perfect (binary) prediction: every vertex sits on a sharp step, so confidence is high."""
    from vrn.evaluate import PackedEvalDataset, score_sample
    from vrn.volume.codec import decode

    s = PackedEvalDataset(synthetic_packed, split="test")[0]
    sharp = score_sample(s, decode(s.gt_code).astype(np.float32))
    assert sharp["confidence_mean"] > 0.9
    # the same occupancy smeared into a soft ramp: the same surface, much lower confidence
    from scipy.ndimage import gaussian_filter

    soft = score_sample(s, gaussian_filter(decode(s.gt_code).astype(np.float32), 3.0))
    assert soft["confidence_mean"] < sharp["confidence_mean"] - 0.2

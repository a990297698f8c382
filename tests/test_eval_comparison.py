"""vrn.eval_comparison: paired differences of two evaluations, checked against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from vrn.cli_errors import UserError
from vrn.eval_comparison import _SCALE, compare_rows, load_side, main, markdown


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"summary": {}, "samples": rows}))
    return path


def _rows(values, yaws, key="nme_icp", ids=None):
    ids = ids or [f"f{i}" for i in range(len(values))]
    return [{"id": i, "yaw": y, key: v} for i, y, v in zip(ids, yaws, values, strict=True)]


# two faces per bucket: yaws 10, 20 | 40, 50 | 70, 80
YAWS = [10.0, 20.0, 40.0, 50.0, 70.0, 80.0]


def test_paired_differences_by_bucket_match_hand_values(tmp_path):
    new = _write(tmp_path / "new" / "results.json", _rows([0.010, 0.020, 0.030, 0.050, 0.060, 0.100], YAWS))
    _write(tmp_path / "old" / "results.json", _rows([0.012, 0.020, 0.040, 0.050, 0.080, 0.090], YAWS))
    r = compare_rows(load_side(str(new), "nme_icp"), load_side(str(tmp_path / "old"), "nme_icp"))
    b = {x.bucket: x for x in r["buckets"]}
    # [0, 30]: d = (-0.2, 0.0) % -> mean -0.1, sd = sqrt(0.02) -> se = 0.1
    assert b["[0, 30]"].n == 2
    assert b["[0, 30]"].first == pytest.approx(1.5) and b["[0, 30]"].second == pytest.approx(1.6)
    assert b["[0, 30]"].diff == pytest.approx(-0.1) and b["[0, 30]"].se == pytest.approx(0.1)
    # (30, 60]: d = (-1, 0) -> -0.5 +- 0.5
    assert b["(30, 60]"].diff == pytest.approx(-0.5) and b["(30, 60]"].se == pytest.approx(0.5)
    # (60, 90]: d = (-2, +1) -> -0.5 +- 1.5
    assert b["(60, 90]"].diff == pytest.approx(-0.5) and b["(60, 90]"].se == pytest.approx(1.5)
    # all six: d = (-0.2, 0, -1, 0, -2, 1), mean -0.3667
    assert b["all"].n == 6 and b["all"].diff == pytest.approx(-2.2 / 6)
    bal = r["balanced"]
    assert bal.diff == pytest.approx((-0.1 - 0.5 - 0.5) / 3)
    assert bal.se == pytest.approx(math.sqrt(0.1**2 + 0.5**2 + 1.5**2) / 3)
    assert r["only_first"] == [] and r["only_second"] == [] and r["unpaired_missing"] == 0


def test_unmatched_and_missing_faces_are_left_out_and_counted(tmp_path):
    new = _write(tmp_path / "a.json", _rows([0.01, None, 0.03, 0.04], [10, 20, 40, 70], ids=["a", "b", "c", "d"]))
    old = _write(tmp_path / "b.json", _rows([0.02, 0.02, 0.01, 0.05], [10, 20, 40, 85], ids=["a", "b", "c", "e"]))
    r = compare_rows(load_side(str(new), "nme_icp"), load_side(str(old), "nme_icp"))
    b = {x.bucket: x for x in r["buckets"]}
    assert b["[0, 30]"].n == 1 and b["[0, 30]"].diff == pytest.approx(-1.0) and b["[0, 30]"].se is None
    assert b["(30, 60]"].diff == pytest.approx(2.0)
    assert b["(60, 90]"].n == 0 and b["(60, 90]"].diff is None
    assert r["only_first"] == ["d"] and r["only_second"] == ["e"] and r["unpaired_missing"] == 1
    assert r["balanced"].diff is None  # not every bucket has two paired faces
    text = markdown(load_side(str(new), "nme_icp"), load_side(str(old), "nme_icp"), r)
    assert "only in first: 1, only in second: 1" in text and "metric missing on a side: 1" in text


def test_two_columns_of_one_run(tmp_path):
    rows = [
        {"id": f"i{k}", "yaw": y, "bench_surf_vrn": v, "bench_surf_posed_mean_face": m}
        for k, (y, v, m) in enumerate(
            zip(YAWS, [0.05, 0.06, 0.07, 0.07, 0.09, 0.08], [0.06, 0.06, 0.07, 0.08, 0.08, 0.08], strict=True)
        )
    ]
    f = _write(tmp_path / "r" / "results.json", rows)
    r = compare_rows(
        load_side(f"{f}:bench_surf_vrn", "nme_icp"), load_side(f"{f}:bench_surf_posed_mean_face", "nme_icp")
    )
    b = {x.bucket: x for x in r["buckets"]}
    assert b["[0, 30]"].diff == pytest.approx(-0.5) and b["(30, 60]"].diff == pytest.approx(-0.5)
    assert b["(60, 90]"].diff == pytest.approx(0.5) and b["(60, 90]"].se == pytest.approx(0.5)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_side(str(tmp_path / "nope.json"), "nme_icp")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not JSON"):
        load_side(str(tmp_path / "bad.json"), "nme_icp")
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(UserError, match="no 'samples' list"):
        load_side(str(tmp_path / "other.json"), "nme_icp")
    f = _write(tmp_path / "x.json", _rows([0.1], [10]))
    with pytest.raises(UserError, match="no row has metric 'iou'.*nme_icp"):
        load_side(str(f), "iou")
    g = _write(tmp_path / "y.json", _rows([0.1], [10], ids=["zz"]))
    with pytest.raises(UserError, match="share no face id"):
        compare_rows(load_side(str(f), "nme_icp"), load_side(str(g), "nme_icp"))
    h = _write(tmp_path / "z.json", _rows([0.1], [55]))
    with pytest.raises(UserError, match="not the same data"):
        compare_rows(load_side(str(f), "nme_icp"), load_side(str(h), "nme_icp"))


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    new = _write(tmp_path / "n.json", _rows([0.010, 0.020, 0.030, 0.050, 0.060, 0.100], YAWS))
    old = _write(tmp_path / "o.json", _rows([0.012, 0.020, 0.040, 0.050, 0.080, 0.090], YAWS))
    main([str(new), str(old), "--json", str(tmp_path / "cmp.json")])
    out = capsys.readouterr().out
    assert "| (60, 90] | 2 | 8.00 | 8.50 | -0.50 +- 1.50 |" in out
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["balanced"]["diff"] == pytest.approx(-1.1 / 3)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing.json"), str(old)])
    assert e.value.code == 2
    assert "vrn.eval_comparison: error:" in capsys.readouterr().err


def test_every_report_metric_is_shown_in_the_reports_scale(tmp_path):
    """The scales come from vrn.evaluate's table definitions, so a metric added there (nme_lmk_surf)
    is compared in percent too, not as a raw fraction."""
    from vrn.evaluate import METRICS

    a = _write(tmp_path / "a.json", _rows([0.02, 0.03], [10, 20], key="nme_lmk_surf"))
    b = _write(tmp_path / "b.json", _rows([0.03, 0.03], [10, 20], key="nme_lmk_surf"))
    r = compare_rows(load_side(str(a), "nme_lmk_surf"), load_side(str(b), "nme_lmk_surf"))
    assert r["buckets"][0].diff == pytest.approx(-0.5)  # percent points
    assert {m[0] for m in METRICS} <= set(_SCALE)

"""The 3DDFA_V2 port (third_party/3ddfa_v2/tddfa_v2) is an independent package, and vrn's
BFM adapter (vrn.face_models.bfm.load_bfm) picks and caches the model files."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vrn.assets import available
from vrn.face_models.bfm import BFM_SOURCES, default_bfm_source, load_bfm

PORT = Path(__file__).resolve().parents[1] / "third_party" / "3ddfa_v2" / "tddfa_v2"
FORBIDDEN = ("vrn", "data_pipeline")


def _imported_modules(tree: ast.AST) -> list[str]:
    """Top-level names of every absolute import in ``tree`` (relative imports skipped)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_tddfa_port_imports_nothing_from_the_project():
    files = sorted(PORT.rglob("*.py"))
    assert len(files) >= 5, PORT
    bad = []
    for f in files:
        tree = ast.parse(f.read_text(), filename=str(f))
        bad += [f"{f.name}: {m}" for m in _imported_modules(tree) if m.split(".")[0] in FORBIDDEN]
        # no sys.path patching either
        bad += [
            f"{f.name}: sys.path"
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute)
            and n.attr == "path"
            and isinstance(n.value, ast.Name)
            and n.value.id == "sys"
        ]
    assert not bad, bad


def test_load_bfm_auto_choice_and_cache():
    expected = "bfm_noneck_v3" if available(BFM_SOURCES["bfm_noneck_v3"]) else "offline_standin"
    assert default_bfm_source() == expected
    bfm = load_bfm("auto")
    assert bfm.source == expected
    assert load_bfm(expected) is bfm  # "auto" and its choice share one cached model
    assert bfm.w_shp.shape[1] == 40 and bfm.w_exp.shape[1] == 10
    assert bfm.tri.shape == (76073, 3) and bfm.n_vertices == 38365
    with pytest.raises(ValueError, match="unknown BFM source"):
        load_bfm("nope")

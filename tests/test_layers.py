"""The layer rule of docs/architecture.md, checked on the source (no imports executed).

Layers, bottom to top; a module may import its own layer or a lower one, never a higher one:

0. base        conventions, image I/O, atomic writes, assets, benchmark timer
1. domain      geometry (incl. the crop rule), volume, models, detectors, face models,
               metrics / losses / NME, renderer, W&B logging
2. data        vrn.data (packed datasets, synthetic faces, augmentation, datamodules)
3. run         training (lit module, builders, callbacks, train) and inference (checkpoint, Reconstructor)
4. apps        demo, evaluation
5. pipeline    data_pipeline (uses vrn, never the reverse)

``tddfa_v2`` (our 3DDFA_V2 port in third_party/3ddfa_v2) is independent: it imports neither
``vrn`` nor ``data_pipeline``. Imports inside functions are allowed only for optional or
heavy third-party packages (:data:`LAZY_OK`); everything else is imported at module top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["vrn.conventions", "vrn.image_io", "vrn.atomic_write", "vrn.assets", "vrn.bench_timing", "vrn.video_io"]),
    (
        "domain",
        [
            "vrn.geometry",
            "vrn.volume",
            "vrn.models",
            "vrn.detectors",
            "vrn.face_models",
            "vrn.losses",
            "vrn.metrics",
            "vrn.nme",
            "vrn.render",
            "vrn.wandb_logging",
            "vrn.tracking",
            "vrn.pose_landmarks",
        ],
    ),
    ("data", ["vrn.data"]),
    (
        "run",
        [
            "vrn.lit_module",
            "vrn.builders",
            "vrn.callbacks",
            "vrn.train",
            "vrn.resume",
            "vrn.ddp_jobs",
            "vrn.checkpoint",
            "vrn.inference",
            "vrn.cli_errors",
            "vrn.export",
        ],
    ),
    (
        "apps",
        [
            "vrn.demo",
            "vrn.demo_writer",
            "vrn.demo_video",
            "vrn.evaluate",
            "vrn.eval_datasets",
            "vrn.aflw_benchmark",
            "vrn.runs",
            "vrn",
        ],
    ),
    ("pipeline", ["data_pipeline"]),
]

#: third-party packages that may be imported inside functions (optional extras, or slow to import)
LAZY_OK = {
    "wandb",
    "face_alignment",
    "dlib",
    "face_recognition_models",
    "trimesh",
    "skimage",
    "eos",
    "onnxruntime",
    "onnx",
    "torchfile",
    "submitit",
    "optuna",
    "fcntl",
}
#: modules allowed a lazy internal import, with the reason
LAZY_EXEMPT = {
    "vrn": "the package root re-exports Reconstructor on first use, so `import vrn.conventions` "
    "in a pipeline worker does not load torch, the models and the detectors"
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[:2] == ["third_party", "3ddfa_v2"]:
        parts = parts[2:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> list[Path]:
    out = []
    for top in ("vrn", "data_pipeline", "third_party/3ddfa_v2/tddfa_v2"):
        out += sorted((ROOT / top).rglob("*.py"))
    return out


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module top?, line) for every import statement of a file."""
    tree = ast.parse(path.read_text(), str(path))
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    top_level = {id(n) for n in tree.body}
    # imports under `if TYPE_CHECKING:` / try at the top count as top level
    for n in tree.body:
        if isinstance(n, (ast.If, ast.Try)):
            top_level |= {id(c) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top_level, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((name, id(node) in top_level, node.lineno))
    return out


def _layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for i, (_name, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def test_every_module_has_a_layer() -> None:
    missing = [
        _module_name(p)
        for p in _sources()
        if _module_name(p).split(".")[0] in ("vrn", "data_pipeline") and _layer_of(_module_name(p)) is None
    ]
    assert not missing, f"modules with no layer (add them to LAYERS and docs/architecture.md): {missing}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: _module_name(p))
def test_imports_point_down(path: Path) -> None:
    mod = _module_name(path)
    bad = []
    for name, _top, line in _imports(path):
        root = name.split(".")[0]
        if mod.startswith("tddfa_v2"):
            if root in ("vrn", "data_pipeline"):
                bad.append(f"line {line}: the 3DDFA_V2 port imports {name}")
            continue
        if root not in ("vrn", "data_pipeline"):
            continue
        here, there = _layer_of(mod), _layer_of(name)
        if there is None:
            bad.append(f"line {line}: {name} has no layer")
        elif there > here:
            bad.append(f"line {line}: {mod} ({LAYERS[here][0]}) imports {name} ({LAYERS[there][0]}), a higher layer")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: _module_name(p))
def test_imports_at_module_top(path: Path) -> None:
    if _module_name(path) in LAZY_EXEMPT:
        return
    lazy = [
        f"line {line}: {name}"
        for name, top, line in _imports(path)
        if not top and name.split(".")[0] not in LAZY_OK and name != "__future__"
    ]
    assert not lazy, (
        f"{_module_name(path)} imports inside functions (move them to the top, or add the package to "
        f"LAZY_OK if it is an optional or heavy third-party one):\n" + "\n".join(lazy)
    )


def test_rule_catches_a_violation(tmp_path: Path) -> None:
    """The checker itself: an upward import and a lazy internal import are both found."""
    assert _layer_of("vrn.geometry.crop") == 1 and _layer_of("vrn.demo") == 4 and _layer_of("data_pipeline.fit") == 5
    assert _layer_of("vrn.data.packed") == 2 and _layer_of("vrn") == 4
    src = ROOT / "vrn" / "geometry" / "_probe_for_test.py"
    src.write_text(
        "import numpy\nfrom vrn.inference import Reconstructor\n\ndef f():\n    from vrn.volume import codec\n"
    )
    try:
        with pytest.raises(AssertionError, match="higher layer"):
            test_imports_point_down(src)
        with pytest.raises(AssertionError, match="vrn.volume"):
            test_imports_at_module_top(src)
    finally:
        src.unlink()
